"""The causal KV-cache sampler, value by value: against a recompute, against diffusers' own forward,
and against upstream Self Forcing's pipeline run on the same tiny weights and draws."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from draws import Draws
from sftools.models.causal_wan import CausalWanModel
from sftools.sampling.causal import CausalSampler, blocks, pad_context
from sftools.sampling.load import load_transformer
from sftools.sampling.noise import SeededNoise
from sftools.sampling.schedules import few_step_schedule
from sftools.sampling.settings import PRESETS, SampleSettings, from_preset
from sftools.wan.config import TINY, WanConfig
from sftools.wan.tiny import random_state_dict, write_checkpoint

# head_dim 128 as in the real models (RoPE split 44/42/42); TINY has head_dim 16 (split 8/4/4).
HEAD128 = WanConfig(dim=256, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, freq_dim=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    state = random_state_dict(TINY, seed=3)
    path = write_checkpoint(str(tmp_path_factory.mktemp("m") / "tiny.safetensors"), state, "original")
    model, config = load_transformer(path)
    return state, path, CausalWanModel(model), config


def settings(latent_frames=9, **kw) -> SampleSettings:
    return SampleSettings(frames=4 * (latent_frames - 1) + 1, height=64, width=64, **kw)


def embeds(seed=2, text_dim=32):
    return torch.randn(1, 7, text_dim, generator=torch.Generator().manual_seed(seed))


def test_schedules_are_self_forcings_and_comfyuis_values():
    sf = few_step_schedule(4, 5.0)
    assert [s.timestep for s in sf] == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-4)
    lightx2v = few_step_schedule(4, 8.0)
    assert [s.sigma for s in lightx2v] == pytest.approx([1.0, 0.96, 0.888889, 0.727273], abs=1e-6)
    causvid = few_step_schedule(3, 8.0, warp=False, step_list=[1000, 757, 522])
    assert [s.timestep for s in causvid] == [1000.0, 757.0, 522.0]
    assert all(abs(s.sigma * 1000 - s.timestep) < 1.0 for s in causvid)  # the nearest grid sigma


class BlockCausalMask(WanAttnProcessor):
    """diffusers' own processor with an attention mask: the recompute the cache must equal."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        mask = self.mask if encoder_hidden_states is None else None
        return super().__call__(attn, hidden_states, encoder_hidden_states, mask, rotary_emb)


def recompute(model: CausalWanModel, s: SampleSettings, context, draws, visible, negative=None) -> torch.Tensor:
    """Sample with NO cache: every call runs the whole sequence so far (clean x0 of earlier blocks at
    t = 0, the current block at its t) through diffusers' forward with per-frame timesteps and the
    mask `visible(query_block_start, frames, key_frame)`."""
    transformer, tokens = model.transformer, s.frame_tokens
    schedule = few_step_schedule(s.steps, s.shift, s.warp)
    done = []
    for start, frames in blocks(s):
        total = start + frames
        allowed = torch.zeros(total, total, dtype=torch.bool)
        for q_start, q_frames in blocks(replace(s, frames=4 * (total - 1) + 1)):
            for f in range(total):
                allowed[q_start:q_start + q_frames, f] = visible(q_start, q_frames, f)
        mask = allowed.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)
        processors = transformer.attn_processors
        transformer.set_attn_processor(BlockCausalMask(mask))
        try:
            x = draws.initial(start, frames)
            for i, step in enumerate(schedule):
                seq = torch.cat([*done, x], dim=2)
                t = torch.tensor([[0.0] * start + [step.timestep] * frames])
                flow = model.bidirectional(seq, t, pad_context(context))[:, :, start:]
                if negative is not None:
                    uncond = model.bidirectional(seq, t, pad_context(negative))[:, :, start:]
                    flow = uncond + s.cfg * (flow - uncond)
                x0 = (x.double() - step.sigma * flow.double()).float()
                if i + 1 < len(schedule):
                    x = (1 - schedule[i + 1].sigma) * x0 + schedule[i + 1].sigma * draws.renoise(i, start, frames)
        finally:
            transformer.set_attn_processor(processors)
        done.append(x0)
    return torch.cat(done, dim=2)


def test_kv_cached_generation_equals_a_block_causal_recompute(tiny):
    _, _, model, config = tiny
    s = settings(9)
    draws = Draws(s)
    cached = CausalSampler(model, config, s).sample(embeds(), draws)
    with torch.no_grad():
        again = recompute(model, s, embeds(), draws, lambda q, n, f: f < q + n)
    assert torch.allclose(cached, again, atol=2e-5, rtol=0), (cached - again).abs().max()


@pytest.mark.parametrize("window,sink", [(7, 1), (6, 0), (5, 2)])
def test_the_rolling_cache_equals_a_recompute_over_the_same_window_and_sink(tiny, window, sink):
    _, _, model, config = tiny
    s = settings(12, local_attn_frames=window, sink_frames=sink)
    draws = Draws(s)
    rolled = CausalSampler(model, config, s).sample(embeds(), draws)

    def visible(q, n, f):
        end = q + n
        return f < end and (end <= window or f < sink or f >= end - (window - sink))

    with torch.no_grad():
        again = recompute(model, s, embeds(), draws, visible)
    assert torch.allclose(rolled, again, atol=2e-5, rtol=0), (rolled - again).abs().max()
    full = CausalSampler(model, config, settings(12)).sample(embeds(), draws)
    assert not torch.allclose(rolled[:, :, 6:], full[:, :, 6:], atol=1e-3)  # the window did cut history
    before = (window // 3) * 3  # the blocks that fit in the window whole are sampled before any eviction
    assert torch.equal(rolled[:, :, :before], full[:, :, :before])


def test_a_block_does_not_depend_on_later_blocks_and_short_noise_is_a_prefix(tiny):
    _, _, model, config = tiny
    short = CausalSampler(model, config, settings(6)).sample(embeds(), SeededNoise(5, 16, 8, 8))
    long = CausalSampler(model, config, settings(12)).sample(embeds(), SeededNoise(5, 16, 8, 8))
    assert torch.equal(short, long[:, :, :6])


def test_all_frames_at_once_equals_diffusers_own_forward_in_the_same_loop(tiny):
    _, _, model, config = tiny
    s = settings(5, frames_per_block=None, shift=8.0)
    draws = Draws(s)
    ours = CausalSampler(model, config, s).sample(embeds(), draws)
    x, schedule = draws.initial(0, 5), few_step_schedule(4, 8.0)
    with torch.no_grad():
        for i, step in enumerate(schedule):
            flow = model.transformer(hidden_states=x, timestep=torch.tensor([step.timestep]),
                                     encoder_hidden_states=pad_context(embeds()), return_dict=False)[0]
            x0 = (x.double() - step.sigma * flow.double()).float()
            if i + 1 < len(schedule):
                x = (1 - schedule[i + 1].sigma) * x0 + schedule[i + 1].sigma * draws.renoise(i, 0, 5)
    assert torch.allclose(ours, x0, atol=1e-6, rtol=0), (ours - x0).abs().max()


def test_wrapped_original_and_diffusers_files_give_identical_latents(tmp_path):
    # head_dim 128, as in every real Wan model: a .pt carries no config, and its head count is
    # read from the width as ComfyUI does (dim / 128).
    state = random_state_dict(HEAD128, seed=4)
    outs = []
    for layout, name in (("self-forcing", "sf.pt"), ("original", "o.safetensors"), ("diffusers", "d")):
        path = write_checkpoint(str(tmp_path / name), state, layout, HEAD128)
        model, config = load_transformer(path)
        outs.append(CausalSampler(CausalWanModel(model), config, settings(6)).sample(embeds(), SeededNoise(1, 16, 8, 8)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def test_cfg_with_its_own_uncond_cache_equals_a_guided_recompute(tiny):
    _, _, model, config = tiny
    s = settings(9, cfg=3.0)
    draws = Draws(s)
    guided = CausalSampler(model, config, s).sample(embeds(), draws, negative=embeds(9))
    with torch.no_grad():
        again = recompute(model, s, embeds(), draws, lambda q, n, f: f < q + n, negative=embeds(9))
    assert torch.allclose(guided, again, atol=5e-5, rtol=0), (guided - again).abs().max()


def test_cfg_uses_the_negative_branch_with_its_own_cache(tiny):
    _, _, model, config = tiny
    noise = SeededNoise(2, 16, 8, 8)
    plain = CausalSampler(model, config, settings(6)).sample(embeds(), noise, negative=embeds(9))
    guided = CausalSampler(model, config, settings(6, cfg=3.0)).sample(embeds(), noise, negative=embeds(9))
    assert set(model.state.self_kv) == {"cond", "uncond"}
    assert torch.equal(plain, CausalSampler(model, config, settings(6)).sample(embeds(), noise))  # cfg 1 ignores it
    assert not torch.allclose(plain, guided, atol=1e-3)


def upstream_config(config: WanConfig) -> dict:
    return dict(dim=config.dim, ffn_dim=config.ffn_dim, num_heads=config.num_heads, num_layers=config.num_layers,
                in_dim=16, out_dim=16, text_dim=config.text_dim, freq_dim=config.freq_dim)


@pytest.mark.parametrize("config", [TINY, HEAD128], ids=["head_dim16", "head_dim128"])
@pytest.mark.parametrize("latent_frames,per_block,window,sink", [(9, 3, None, 0), (12, 3, 7, 1), (6, 1, None, 0),
                                                                 (12, 3, 6, 0)])
def test_latents_equal_upstream_self_forcing_on_the_same_weights_and_draws(tmp_path, config, latent_frames,
                                                                           per_block, window, sink):
    from upstream.harness import run_upstream_causal_inference

    state = random_state_dict(config, seed=3)
    # A real Self Forcing .pt where the head count can be read from the width; else a file with its config.
    layout = "self-forcing" if config.head_dim == 128 else "original"
    path = write_checkpoint(str(tmp_path / "model"), state, layout, config)
    model, loaded = load_transformer(path)
    s = settings(latent_frames, frames_per_block=per_block, local_attn_frames=window, sink_frames=sink)
    draws, context = Draws(s), embeds(text_dim=config.text_dim)
    ours = CausalSampler(CausalWanModel(model), loaded, s).sample(context, draws)
    theirs = run_upstream_causal_inference(state, upstream_config(config), context, draws.noise, draws.draws,
                                           num_frame_per_block=per_block, local_attn_size=window or -1, sink_size=sink)
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-4 * scale, float((ours - theirs).abs().max() / scale)


def test_presets_and_explicit_flags():
    sf = from_preset("self-forcing")
    assert (sf.frames_per_block, sf.steps, sf.shift, sf.cache_frames) == (3, 4, 5.0, 21)
    assert from_preset("lightx2v").frames_per_block is None and from_preset("lightx2v").shift == 8.0
    assert from_preset("causal-forcing-framewise", shift=3.0).shift == 3.0
    assert from_preset("self-forcing", frames_per_block="all").frames_per_block is None
    rolling = from_preset("self-forcing", frames=481, local_attn_frames=21, sink_frames=3)
    assert rolling.cache_frames is None and rolling.latent_frames == 121
    assert set(PRESETS) == {"self-forcing", "causal-forcing-framewise", "lightx2v"}


@pytest.mark.parametrize("kwargs,message", [
    ({"frames": 80}, r"4k\+1"), ({"height": 100}, "multiple of 16"), ({"frames_per_block": 0}, "at least 1"),
    ({"local_attn_frames": 3}, "must be more than the block"), ({"sink_frames": 1}, "needs --local-attn-frames"),
    ({"steps": 0}, "--steps"),
])
def test_settings_out_of_range_are_usage_errors(kwargs, message):
    from sftools.errors import SettingsError

    with pytest.raises(SettingsError, match=message):
        SampleSettings(**kwargs)


def test_more_frames_than_the_cache_holds_is_a_clear_error_before_and_during_sampling(tiny):
    from sftools.errors import SettingsError, SftoolsError

    _, _, model, config = tiny
    with pytest.raises(SettingsError, match="needs 12 latent frames and the KV cache holds 9; roll it"):
        settings(12, cache_frames=9)
    with pytest.raises(SettingsError, match="RoPE table"):
        SampleSettings(frames=4 * 1024 + 1, local_attn_frames=21)
    from sftools.models.kv_cache import CacheSpec

    model.reset(CacheSpec(frame_tokens=16, capacity_frames=6))  # the cache itself says so too
    x, t, ctx = torch.randn(1, 16, 3, 8, 8), torch.tensor([0.0]), pad_context(embeds())
    with torch.no_grad(), pytest.raises(SftoolsError, match="holds 6 latent frames and frames 6-8 do not fit"):
        for start in (0, 3, 6):
            model(x, t, ctx, start)


def test_sixteen_bit_weights_sample_on_the_cpu_close_to_fp32(tiny):
    _, path, model32, config = tiny
    s = settings(6)
    ref = CausalSampler(model32, config, s).sample(embeds(), SeededNoise(3, 16, 8, 8))
    transformer, _ = load_transformer(path, dtype=torch.bfloat16)
    assert transformer.patch_embedding.weight.dtype == torch.bfloat16
    assert transformer.blocks[0].scale_shift_table.dtype == torch.float32  # kept in fp32, as diffusers does
    low = CausalSampler(CausalWanModel(transformer), config, s).sample(embeds(), SeededNoise(3, 16, 8, 8))
    assert low.dtype == torch.float32 and float((low - ref).abs().max() / ref.abs().max()) < 0.05


def test_one_block_needs_no_cache(tiny):
    _, _, model, config = tiny
    CausalSampler(model, config, settings(5, frames_per_block=None)).sample(embeds(), SeededNoise(0, 16, 8, 8))
    assert model.state.self_kv == {} and model.state.cross_kv == {}


def test_the_cross_attention_cache_follows_the_context(tiny):
    from sftools.models.kv_cache import CacheSpec

    _, _, model, _ = tiny
    x, t = torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        model.reset(CacheSpec(frame_tokens=16, capacity_frames=3))
        model(x, t, pad_context(embeds(1)), 0)
        second = model(x, t, pad_context(embeds(2)), 0)
        model.reset(CacheSpec(frame_tokens=16, capacity_frames=3))
        fresh = model(x, t, pad_context(embeds(2)), 0)
    assert torch.equal(second, fresh)


def test_the_masked_parallel_forward_recomputes_what_the_cache_computes(tiny):
    from sftools.models.kv_cache import visible_frames

    _, _, model, config = tiny
    for kw in ({}, {"local_attn_frames": 7, "sink_frames": 1}):
        s = settings(12, **kw)
        draws = Draws(s)
        cached = CausalSampler(model, config, s).sample(embeds(), draws)
        visible = visible_frames(12, 3, kw.get("local_attn_frames"), kw.get("sink_frames", 0))
        schedule, done = few_step_schedule(4, 5.0), []
        with torch.no_grad():
            for start, frames in blocks(s):
                x, end = draws.initial(start, frames), start + frames
                for i, step in enumerate(schedule):
                    t = torch.tensor([[0.0] * start + [step.timestep] * frames])
                    flow = model.masked(torch.cat([*done, x], 2), t, pad_context(embeds()), visible[:end, :end])[:, :, start:]
                    x0 = (x.double() - step.sigma * flow.double()).float()
                    if i + 1 < 4:
                        x = (1 - schedule[i + 1].sigma) * x0 + schedule[i + 1].sigma * draws.renoise(i, start, frames)
                done.append(x0)
        assert torch.allclose(cached, torch.cat(done, 2), atol=2e-5, rtol=0)


def test_contexts_are_padded_to_the_models_text_len_and_longer_zero_padding_is_dropped():
    prompt = embeds()
    assert torch.equal(pad_context(prompt), torch.cat([prompt, torch.zeros(1, 505, 32)], 1))
    short = pad_context(pad_context(prompt), 64)  # a 512-row encoding for a 64-row model
    assert short.shape == (1, 64, 32) and torch.equal(short[:, :7], prompt) and not short[:, 7:].any()
    with pytest.raises(ValueError, match="prompt embeddings have 7 tokens, more than the model's 6"):
        pad_context(prompt, 6)


def test_the_sampler_gives_the_model_its_text_len_rows(tmp_path):
    config = replace(TINY, text_len=64)
    path = write_checkpoint(str(tmp_path / "short.safetensors"), random_state_dict(config, seed=3), "original", config)
    model, loaded = load_transformer(path)
    assert loaded.text_len == 64  # carried in the file's sftools.config
    rows = []
    forward = model.forward
    model.forward = lambda *a, **k: rows.append(k["encoder_hidden_states"].shape[1]) or forward(*a, **k)
    sampler = CausalSampler(CausalWanModel(model), loaded, settings(6))
    raw = sampler.sample(embeds(), SeededNoise(0, 16, 8, 8))
    padded = sampler.sample(pad_context(embeds()), SeededNoise(0, 16, 8, 8))
    assert set(rows) == {64} and torch.equal(raw, padded)
