"""The upstream Self Forcing oracle (tests/upstream/harness.py): it runs upstream's own causal
sampler on tiny random weights, feeds it exactly the noise we give, and leaves no trace behind."""

from __future__ import annotations

import dataclasses
import hashlib
import sys

import pytest
import torch

from sftools.wan.config import WanConfig
from sftools.wan.tiny import random_state_dict
from upstream.harness import (
    UPSTREAM_COMMIT,
    UPSTREAM_DIR,
    VENDORED_BLOBS,
    patched_upstream,
    run_upstream_causal_inference,
    run_upstream_causal_inference_traced,
    sdpa_flash_attention,
    upstream_modules,
)

GENERIC = ("wan", "utils", "pipeline", "demo_utils")
_LEAKED_BEFORE = {name for name in GENERIC if name in sys.modules}
_RANDN_LIKE = torch.randn_like

CONFIG = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, freq_dim=256)
CFG = {k: getattr(CONFIG, k) for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim",
                                        "text_dim", "freq_dim")}
FRAME_TOKENS = 16  # 8x8 latents, 2x2 patches
WARPED = [1000.0, 937.5, 833.3333, 625.0]
STEPS = [1000, 750, 500, 250]
_S = torch.linspace(1.0, 0.0, 1001)[:-1]
GRID_SIGMAS = 5.0 * _S / (1 + 4.0 * _S)  # the shift-5 grid; t = 1000 * sigma


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The hand-run model calls below, like the harness, on one thread (tiny model, shared 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_state_dict(CONFIG, seed=0)


def inputs(frames: int, steps: int = 4, seed: int = 0, prompt_len: int = 7):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(1, prompt_len, CONFIG.text_dim, generator=g)
    noise = torch.randn(1, 16, frames, 8, 8, generator=g)
    renoise = torch.randn(steps - 1, 1, 16, frames, 8, 8, generator=g)
    return prompt, noise, renoise


def test_vendored_files_and_isolation(state):
    assert UPSTREAM_COMMIT == "33593df3e81fa3ec10239271dd2c100facac6de1"
    assert (UPSTREAM_DIR / "LICENSE").read_text().startswith(" " * 33 + "Apache License")
    notice = (UPSTREAM_DIR / "NOTICE.md").read_text()
    assert UPSTREAM_COMMIT in notice
    vendored = {p.relative_to(UPSTREAM_DIR).as_posix() for p in UPSTREAM_DIR.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    assert vendored == set(VENDORED_BLOBS) | {"NOTICE.md"}
    for path, blob in VENDORED_BLOBS.items():  # verbatim copies: the git blob ids of upstream's files
        data = (UPSTREAM_DIR / path).read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, path
        assert f"`{path}`" in notice
    mods = upstream_modules()
    assert mods.causal_model.__name__.startswith("_sftools_upstream_self_forcing.")
    prompt, noise, renoise = inputs(3)
    before = torch.random.get_rng_state()
    run_upstream_causal_inference(state, CFG, prompt, noise, renoise)
    # The caller's RNG, the generic module names and every run-time patch are as they were.
    assert torch.equal(torch.random.get_rng_state(), before)
    assert {name for name in GENERIC if name in sys.modules} == _LEAKED_BEFORE
    assert torch.randn_like is _RANDN_LIKE
    assert mods.attention.flash_attention is not sdpa_flash_attention
    assert mods.model.flash_attention is not sdpa_flash_attention
    assert mods.attention.FLASH_ATTN_2_AVAILABLE is False
    assert "from_pretrained" not in mods.causal_model.CausalWanModel.__dict__
    from diffusers import WanTransformer3DModel  # diffusers still imports normally
    assert WanTransformer3DModel.__module__.startswith("diffusers.")


def test_shape_deterministic_and_independent_of_global_rng(state):
    prompt, noise, renoise = inputs(9)
    torch.manual_seed(1)
    a = run_upstream_causal_inference(state, CFG, prompt, noise, renoise)
    torch.manual_seed(2)
    b = run_upstream_causal_inference(state, dataclasses.asdict(CONFIG), prompt, noise, renoise)
    assert a.shape == (1, 16, 9, 8, 8) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.abs().max() > 0
    assert torch.equal(a, b)


def test_draws_calls_and_warped_timesteps(state):
    prompt, noise, renoise = inputs(9)
    run = run_upstream_causal_inference_traced(state, CFG, prompt, noise, renoise)
    assert run.draws == [(b, s) for b in range(3) for s in range(3)]
    torch.testing.assert_close(run.denoising_step_list, torch.tensor(WARPED), rtol=0, atol=1e-4)
    assert run.denoising_step_list.dtype == torch.float32
    # Per block: 4 denoising calls at the warped t, then the refresh at t = context_noise = 0 on the
    # block's x0 (no noise added); all at current_start = first frame of the block x frame tokens.
    assert len(run.calls) == 15
    for b in range(3):
        block = run.calls[5 * b:5 * b + 5]
        assert [c["current_start"] for c in block] == [b * 3 * FRAME_TOKENS] * 5
        assert [c["timestep"].shape for c in block] == [(1, 3)] * 5
        ts = [[t] for t in run.denoising_step_list.tolist()] + [[0.0]]
        assert [c["timestep"].unique().tolist() for c in block] == ts
        assert torch.equal(block[4]["input"], block[3]["x0"])
        assert torch.equal(run.latents[:, :, 3 * b:3 * b + 3], block[3]["x0"])
        assert torch.equal(block[0]["input"], noise[:, :, 3 * b:3 * b + 3])
        # re-noise: x_{s+1} = (1 - sigma) x0_s + sigma * renoise[s][block b], sigma of the next warped t
        for s in range(3):
            sigma = GRID_SIGMAS[1000 - STEPS[s + 1]]
            expected = (1 - sigma) * block[s]["x0"] + sigma * renoise[s][:, :, 3 * b:3 * b + 3]
            assert torch.equal(block[s + 1]["input"], expected)
    assert run.kv_index_log[4] == [(48, 48)] * 2 and run.kv_index_log[-1] == [(144, 144)] * 2

    # context_noise only sets the refresh call's timestep: its input stays the clean x0, no extra draw.
    ctx = run_upstream_causal_inference_traced(state, CFG, prompt, noise, renoise, context_noise=100)
    assert ctx.draws == run.draws
    assert [c["timestep"].unique().tolist() for c in ctx.calls[4::5]] == [[100.0]] * 3
    assert all(torch.equal(ctx.calls[i]["input"], ctx.calls[i - 1]["x0"]) for i in (4, 9, 14))
    assert torch.equal(ctx.latents[:, :, :3], run.latents[:, :, :3])
    assert not torch.allclose(ctx.latents[:, :, 3:], run.latents[:, :, 3:])

    plain = run_upstream_causal_inference_traced(state, CFG, prompt, noise, renoise, warp_denoising_step=False)
    assert plain.denoising_step_list.tolist() == [1000, 750, 500, 250]
    assert not torch.allclose(plain.latents, run.latents)


def test_output_depends_on_renoise_slices(state):
    prompt, noise, renoise = inputs(9)
    base = run_upstream_causal_inference(state, CFG, prompt, noise, renoise)
    last_block = renoise.clone()
    last_block[:, :, :, 6:9] = torch.randn(3, 1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    out = run_upstream_causal_inference(state, CFG, prompt, noise, last_block)
    assert torch.equal(out[:, :, :6], base[:, :, :6])  # causal: earlier blocks never see it
    assert not torch.allclose(out[:, :, 6:], base[:, :, 6:])
    first_block_step1 = renoise.clone()
    first_block_step1[1, :, :, 0:3] += 0.5
    out = run_upstream_causal_inference(state, CFG, prompt, noise, first_block_step1)
    for b in range(3):  # block 0 changes, and through the KV cache every later block
        assert not torch.allclose(out[:, :, 3 * b:3 * b + 3], base[:, :, 3 * b:3 * b + 3])


def test_rolling_window_with_sink(state):
    prompt, noise, renoise = inputs(12)
    glob = run_upstream_causal_inference_traced(state, CFG, prompt, noise, renoise)
    run = run_upstream_causal_inference_traced(state, CFG, prompt, noise, renoise, local_attn_size=7, sink_size=1)
    assert run.kv_cache_size == 7 * FRAME_TOKENS
    assert run.draws == [(b, s) for b in range(4) for s in range(3)]
    assert [run.kv_index_log[5 * b + 4][0] for b in range(4)] == [(48, 48), (96, 96), (144, 112), (192, 112)]
    # Nothing is evicted before block 2, so blocks 0-1 match the global cache's run.
    torch.testing.assert_close(run.latents[:, :, :6], glob.latents[:, :, :6], rtol=0, atol=0)
    assert not torch.allclose(run.latents[:, :, 6:], glob.latents[:, :, 6:])
    f = FRAME_TOKENS
    for layer in range(CONFIG.num_layers):
        for kv in range(2):
            b1, b2, b3 = (run.kv_after_block[i][layer][kv] for i in (1, 2, 3))
            # block 2 (frames 6-8) arrives: frames 1-2 are evicted, frame 0 (sink) stays, 3-5 shift left
            assert torch.equal(b2[:, :f], b1[:, :f])
            assert torch.equal(b2[:, f:4 * f], b1[:, 3 * f:6 * f])
            # block 3 (frames 9-11): frames 3-5 are evicted, 6-8 shift left, sink stays
            assert torch.equal(b3[:, :f], b1[:, :f])
            assert torch.equal(b3[:, f:4 * f], b2[:, 4 * f:7 * f])


def test_one_frame_per_block(state):
    prompt, noise, renoise = inputs(4)
    run = run_upstream_causal_inference_traced(state, CFG, prompt, noise, renoise, num_frame_per_block=1)
    assert run.latents.shape == (1, 16, 4, 8, 8)
    assert run.draws == [(b, s) for b in range(4) for s in range(3)]
    assert [c["current_start"] for c in run.calls[::5]] == [0, 16, 32, 48]
    three = run_upstream_causal_inference(state, CFG, prompt, noise[:, :, :3], renoise[:, :, :, :3])
    assert not torch.allclose(three, run.latents[:, :, :3])


def hand_first_block(state: dict, prompt, noise, renoise, steps, nf: int = 3) -> torch.Tensor:
    """Block 0 by hand: upstream's CausalWanModel (empty cache at the start), x0 = x_t - sigma*flow, and
    re-noising from renoise[s][:, :, :nf]; sigma and t from the shift-5 grid, warped."""
    sigmas = GRID_SIGMAS
    idx = [1000 - step for step in steps]
    with torch.no_grad(), patched_upstream() as mods:
        model = mods.causal_model.CausalWanModel(model_type="t2v", text_len=512, eps=1e-6, **CFG).eval()
        model.load_state_dict(state, strict=True)
        tokens, heads, hd = noise.shape[2] * FRAME_TOKENS, CONFIG.num_heads, CONFIG.head_dim
        cache = [{"k": torch.zeros(1, tokens, heads, hd), "v": torch.zeros(1, tokens, heads, hd),
                  "global_end_index": torch.tensor([0]), "local_end_index": torch.tensor([0])}
                 for _ in range(CONFIG.num_layers)]
        xcache = [{"k": None, "v": None, "is_init": False} for _ in range(CONFIG.num_layers)]
        x = noise[:, :, :nf]
        for i, j in enumerate(idx):
            t = torch.full((1, nf), float(sigmas[j] * 1000))
            flow = model(x, t=t, context=prompt, seq_len=32760, kv_cache=cache, crossattn_cache=xcache,
                         current_start=0)
            x0 = (x.double() - sigmas[j].double() * flow.double()).float()
            if i + 1 < len(idx):
                sig = sigmas[idx[i + 1]]
                x = (1 - sig) * x0 + sig * renoise[i][:, :, :nf]
    return x0


def test_first_block_matches_model_forward_by_hand(state):
    # One step: block 0's output is the first model call on an empty cache, x0 = noise - 1.0 * flow.
    prompt, noise, renoise = inputs(9, steps=1)
    assert renoise.shape[0] == 0
    run = run_upstream_causal_inference_traced(state, CFG, prompt, noise, renoise, denoising_step_list=(1000,))
    assert run.draws == []
    torch.testing.assert_close(run.latents[:, :, :3], hand_first_block(state, prompt, noise, renoise, [1000]),
                               rtol=1e-6, atol=1e-6)
    # Four steps: the loop, the warped sigmas and the re-noise layout (channel-first slices).
    prompt, noise, renoise = inputs(9)
    out = run_upstream_causal_inference(state, CFG, prompt, noise, renoise)
    torch.testing.assert_close(out[:, :, :3], hand_first_block(state, prompt, noise, renoise, [1000, 750, 500, 250]),
                               rtol=1e-6, atol=1e-6)
    # The weights are really used and loaded strictly.
    zeroed = dict(state, **{"blocks.1.cross_attn.o.weight": torch.zeros(32, 32)})
    assert not torch.allclose(out, run_upstream_causal_inference(zeroed, CFG, prompt, noise, renoise))
    with pytest.raises(RuntimeError, match="Missing key"):
        run_upstream_causal_inference({k: v for k, v in state.items() if k != "head.modulation"},
                                      CFG, prompt, noise, renoise)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        run_upstream_causal_inference(dict(state, extra=torch.zeros(1)), CFG, prompt, noise, renoise)


def test_stray_random_draw_is_caught(state, monkeypatch):
    mods = upstream_modules()
    forward = mods.model.WanT2VCrossAttention.forward

    def noisy_forward(self, *args, **kwargs):
        torch.rand(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(mods.model.WanT2VCrossAttention, "forward", noisy_forward)
    prompt, noise, renoise = inputs(3)
    with pytest.raises(AssertionError, match="global RNG"):
        run_upstream_causal_inference(state, CFG, prompt, noise, renoise)


def test_rejects_bad_inputs(state):
    prompt, noise, renoise = inputs(9)
    with pytest.raises(ValueError, match="renoise"):
        run_upstream_causal_inference(state, CFG, prompt, noise, renoise[:2])
    with pytest.raises(ValueError, match="multiple"):
        run_upstream_causal_inference(state, CFG, prompt, noise[:, :, :8], renoise[:, :, :, :, :8])
    with pytest.raises(ValueError, match="prompt_embeds"):
        run_upstream_causal_inference(state, CFG, torch.zeros(1, 513, 32), noise, renoise)
