"""Run upstream Self Forcing's own causal few-step sampler on tiny random weights, on CPU, offline.

The oracle for sftools' causal KV-cache sampler. The upstream files are vendored UNCHANGED in
`tests/upstream/self_forcing/` (guandeh17/Self-Forcing @ UPSTREAM_COMMIT, Apache-2.0; see NOTICE.md
there). This module:

* loads them under the private package name `_sftools_upstream_self_forcing` (the generic names
  `wan`, `utils`, `pipeline`, `demo_utils` are put in `sys.modules` only while the files are being
  imported, then removed again, so the rest of the test session never sees them);
* stubs, at import time only, the modules that the inference path imports but never runs on this
  path (the T5 text encoder, its tokenizer, the VAE, FramePack's CUDA-only `demo_utils.memory`, and
  `einops` if it is not installed);
* patches, at run time only and restored afterwards, the CUDA-only attention kernel and the
  hard-coded Wan-1.3B constants (see `run_upstream_causal_inference_traced` and NOTICE.md);
* replaces the pipeline's re-noising draws (`torch.randn_like` at `pipeline/causal_inference.py`
  l.208) by slices of a caller-given tensor, and checks that no other random draw happens.

Everything else (the block loop, the warped schedule, the x0 conversion, `add_noise`, the KV-cache
writes and eviction, the cache refresh pass, the model) is upstream's code as published.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

__all__ = [
    "UPSTREAM_REPO",
    "UPSTREAM_COMMIT",
    "UPSTREAM_DIR",
    "VENDORED_BLOBS",
    "UpstreamRun",
    "upstream_modules",
    "patched_upstream",
    "sdpa_flash_attention",
    "run_upstream_causal_inference",
    "run_upstream_causal_inference_traced",
]

UPSTREAM_REPO = "guandeh17/Self-Forcing"
UPSTREAM_COMMIT = "33593df3e81fa3ec10239271dd2c100facac6de1"
UPSTREAM_DIR = Path(__file__).resolve().with_name("self_forcing")

_PRIVATE = "_sftools_upstream_self_forcing"
# Vendored files, in import order: (upstream module name, path relative to UPSTREAM_DIR).
_FILES = (
    ("wan.modules.attention", "wan/modules/attention.py"),
    ("wan.modules.model", "wan/modules/model.py"),
    ("wan.modules.causal_model", "wan/modules/causal_model.py"),
    ("utils.scheduler", "utils/scheduler.py"),
    ("utils.wan_wrapper", "utils/wan_wrapper.py"),
    ("pipeline.causal_inference", "pipeline/causal_inference.py"),
)
_PACKAGES = ("wan", "wan.modules", "utils", "pipeline", "demo_utils")
# Git blob ids of the vendored files at UPSTREAM_COMMIT (`git rev-parse 33593df:<path>`): the copies are verbatim.
VENDORED_BLOBS = {
    "LICENSE": "261eeb9e9f8b2b4b0d119366dda99c6fd7d35c64",
    "pipeline/causal_inference.py": "a98626f025fc6ad64099c06286e22e91e66a7f7e",
    "utils/scheduler.py": "cde3f85c8046b2d5e697b827f4531a3410c20e9a",
    "utils/wan_wrapper.py": "c719d59948f59111b5a06995742d9792a167169d",
    "wan/modules/attention.py": "8845659c1418da0b4a82014dcde77a53f7206e6e",
    "wan/modules/causal_model.py": "98e398a962e91f36e214a19a54ec78d913d7ac9d",
    "wan/modules/model.py": "f8fa92742160d694fb81f572adf913e389f91b5a",
}
# Upstream `pipeline/causal_inference.py`: the line of the re-noising draw, checked on every draw.
_RENOISE_LINE = 208

# Wan 1.3B numbers that upstream hard-codes (checked to be there, so a different vendored copy fails loudly).
_WAN13B_FRAME_TOKENS = 1560
_WAN13B_LAYERS = 30
_WAN13B_CACHE_TOKENS = 32760

_CONFIG_KEYS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim")
# Keys of `dataclasses.asdict(sftools.wan.config.WanConfig)` that do not matter for a t2v model.
_IGNORED_KEYS = ("wan_version", "image_dim", "vace_layers", "vace_in_dim")
TEXT_LEN = 512

_lock = threading.RLock()
_loaded: types.SimpleNamespace | None = None


# --------------------------------------------------------------------------------------------
# Loading


def _stub(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _unavailable(what: str):
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{what} is stubbed out by tests/upstream/harness.py (not on the sampling path)")
    return fail


def upstream_modules() -> types.SimpleNamespace:
    """The vendored upstream modules, imported once per process under a private package name.

    Returns a namespace with attributes `attention`, `model`, `causal_model`, `scheduler`,
    `wan_wrapper` and `causal_inference` (the module objects). Importing leaves no generic
    `wan` / `utils` / `pipeline` / `demo_utils` entry in `sys.modules`.
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        import diffusers.configuration_utils  # noqa: F401  (upstream needs diffusers; load it under its own name first)
        import diffusers.models.modeling_utils  # noqa: F401

        stubs = {
            "wan.modules.tokenizers": dict(HuggingfaceTokenizer=_unavailable("HuggingfaceTokenizer")),
            "wan.modules.vae": dict(_video_vae=_unavailable("_video_vae (Wan VAE)")),
            "wan.modules.t5": dict(umt5_xxl=_unavailable("umt5_xxl (T5 text encoder)")),
            # FramePack's demo_utils/memory.py calls torch.cuda.current_device() at import.
            "demo_utils.memory": dict(
                gpu=None,
                get_cuda_free_memory_gb=_unavailable("get_cuda_free_memory_gb"),
                DynamicSwapInstaller=_unavailable("DynamicSwapInstaller"),
                move_model_to_device_with_memory_preservation=_unavailable(
                    "move_model_to_device_with_memory_preservation"),
            ),
        }
        top_level: dict[str, types.ModuleType] = {}
        if importlib.util.find_spec("einops") is None:
            # model.py does `from einops import repeat`, used only by WanModel's GAN branch.
            top_level["einops"] = _stub("einops", repeat=_unavailable("einops.repeat"))

        generic = set(_PACKAGES) | {n for n, _ in _FILES} | set(stubs) | set(top_level)
        absent = object()
        saved = {name: sys.modules.get(name, absent) for name in generic}
        loaded: dict[str, types.ModuleType] = {}

        def register(name: str, module: types.ModuleType) -> None:
            sys.modules[f"{_PRIVATE}.{name}"] = module
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[f"{_PRIVATE}.{parent}"] if parent else sys.modules[_PRIVATE], child, module)

        try:
            root = types.ModuleType(_PRIVATE)
            root.__path__ = [str(UPSTREAM_DIR)]
            sys.modules[_PRIVATE] = root
            sys.modules.update(top_level)
            for name in _PACKAGES:
                pkg = types.ModuleType(f"{_PRIVATE}.{name}")
                pkg.__path__ = [str(UPSTREAM_DIR / name.replace(".", "/"))]
                pkg.__package__ = pkg.__name__
                register(name, pkg)
            for name, attrs in stubs.items():
                register(name, _stub(f"{_PRIVATE}.{name}", **attrs))
            compiled: list[Any] = []

            def no_compile(fn, *args, **kwargs):
                # causal_model.py l.23 wraps flex_attention in torch.compile at import. Only the
                # training path (_forward_train) calls it; leaving it eager skips importing
                # torch._inductor (about 2 s and a burst of DeprecationWarnings).
                compiled.append(fn)
                return fn

            for name, rel in _FILES:
                spec = importlib.util.spec_from_file_location(f"{_PRIVATE}.{name}", UPSTREAM_DIR / rel)
                module = importlib.util.module_from_spec(spec)
                register(name, module)
                with _setattrs([(torch, "compile", no_compile)]):
                    spec.loader.exec_module(module)
                loaded[name.rpartition(".")[2]] = module
            from torch.nn.attention.flex_attention import flex_attention
            assert compiled == [flex_attention], compiled
        except BaseException:
            for key in [k for k in sys.modules if k == _PRIVATE or k.startswith(_PRIVATE + ".")]:
                del sys.modules[key]
            raise
        finally:
            for name in generic:
                if saved[name] is absent:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = saved[name]
        mods = types.SimpleNamespace(**loaded)
        _check_upstream_constants(mods)
        _loaded = mods
        return mods


def _check_upstream_constants(mods: types.SimpleNamespace) -> None:
    """The run-time patches replace these hard-coded numbers; make sure they are still where we patch."""
    import inspect
    src = inspect.getsource(mods.causal_inference.CausalInferencePipeline)
    assert f"self.num_transformer_blocks = {_WAN13B_LAYERS}" in src
    assert f"self.frame_seq_length = {_WAN13B_FRAME_TOKENS}" in src
    assert f"kv_cache_size = {_WAN13B_CACHE_TOKENS}" in src
    assert "torch.randn_like(denoised_pred.flatten(0, 1))" in src
    attn_src = inspect.getsource(mods.causal_model.CausalWanSelfAttention.__init__)
    assert f"self.max_attention_size = {_WAN13B_CACHE_TOKENS} if local_attn_size == -1 " \
        f"else local_attn_size * {_WAN13B_FRAME_TOKENS}" in attn_src


# --------------------------------------------------------------------------------------------
# Run-time patches


def sdpa_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: torch.Tensor | None = None,
    k_lens: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    q_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    version: int | None = None,
) -> torch.Tensor:
    """Drop-in for upstream `wan.modules.attention.flash_attention` (same signature and semantics).

    q: [B, Lq, N, C], k/v: [B, Lk, N, C]; softmax(q k^T * scale) v with scale = softmax_scale or
    1/sqrt(C), keys past `k_lens[b]` masked out, output [B, Lq, N, C] in q's dtype. The one
    deliberate difference: upstream casts float32 inputs to `dtype` (bf16) for the CUDA kernel;
    this computes in the inputs' own dtype (float32 here), because the oracle must be exact.
    Features the sampling path never uses (q_lens, causal, sliding window, dropout) raise.
    """
    if q_lens is not None or causal or tuple(window_size) != (-1, -1) or dropout_p:
        raise NotImplementedError("sdpa_flash_attention: q_lens/causal/window/dropout are not on the sampling path")
    assert q.dim() == k.dim() == v.dim() == 4 and k.shape[:-1] == v.shape[:-1] and q.size(0) == k.size(0)
    out_dtype = q.dtype
    if q_scale is not None:
        q = q * q_scale
    mask = None
    if k_lens is not None:
        keep = torch.arange(k.size(1), device=k.device)[None, :] < k_lens.to(k.device)[:, None]
        mask = keep[:, None, None, :]  # [B, 1, 1, Lk]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask, dropout_p=0.0, is_causal=False, scale=softmax_scale)
    return out.transpose(1, 2).contiguous().type(out_dtype)


@contextlib.contextmanager
def _setattrs(patches: Sequence[tuple[Any, str, Any]]) -> Iterator[None]:
    missing = object()
    saved = []
    try:
        for obj, name, value in patches:
            old = obj.__dict__.get(name, missing) if isinstance(obj, type) else getattr(obj, name, missing)
            saved.append((obj, name, old))
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, old in reversed(saved):
            if old is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


@contextlib.contextmanager
def patched_upstream(config: dict | None = None) -> Iterator[types.SimpleNamespace]:
    """Context with the module-level run-time patches in force; yields `upstream_modules()`.

    * `wan.modules.attention`: `FLASH_ATTN_2_AVAILABLE = True` and `flash_attention =
      sdpa_flash_attention`, so upstream's own `attention()` dispatch takes its flash branch;
    * `wan.modules.model.flash_attention = sdpa_flash_attention` (cross-attention calls it directly);
    * if `config` is given, `CausalWanModel.from_pretrained` builds `CausalWanModel(**config,
      text_len=512, local_attn_size=..., sink_size=...)` instead of reading
      `wan_models/Wan2.1-T2V-1.3B/` (random init; the caller loads the real weights strictly).
    Everything is restored on exit; runs in other threads wait on a lock meanwhile.
    """
    mods = upstream_modules()
    patches: list[tuple[Any, str, Any]] = [
        (mods.attention, "FLASH_ATTN_2_AVAILABLE", True),
        (mods.attention, "FLASH_ATTN_3_AVAILABLE", False),
        (mods.attention, "flash_attention", sdpa_flash_attention),
        (mods.model, "flash_attention", sdpa_flash_attention),
    ]
    if config is not None:
        model_kwargs = _model_kwargs(config)

        def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
            allowed = {"local_attn_size", "sink_size"}
            assert set(kwargs) <= allowed, f"unexpected from_pretrained kwargs {set(kwargs) - allowed}"
            return cls(**model_kwargs, **kwargs).eval()

        patches.append((mods.causal_model.CausalWanModel, "from_pretrained", classmethod(from_pretrained)))
    with _lock, _setattrs(patches):
        yield mods


def _model_kwargs(config: dict) -> dict:
    config = dict(config)
    unknown = set(config) - set(_CONFIG_KEYS) - set(_IGNORED_KEYS) - {"model_type", "text_len"}
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}")
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"config lacks {missing}")
    if config.get("model_type", "t2v") != "t2v":
        raise ValueError("only t2v models are supported by the oracle")
    if config.get("text_len", TEXT_LEN) != TEXT_LEN:
        raise ValueError("text_len is 512 as upstream")
    # Wan2.1-T2V-1.3B's config.json sets model_type, text_len, in/out_dim, dim, ffn_dim, freq_dim,
    # num_heads, num_layers, eps; text_dim is a constructor default (4096) there.
    kwargs = {k: int(config[k]) for k in _CONFIG_KEYS}
    kwargs.update(model_type="t2v", text_len=TEXT_LEN, eps=1e-6)
    return kwargs


# --------------------------------------------------------------------------------------------
# The run


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one intra-op thread, and a 2-core machine shared with another
    process slows down about tenfold with OpenMP's two spinning threads. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class UpstreamRun:
    """Everything one upstream run produced and observed."""

    latents: torch.Tensor
    """[B, 16, T, H, W]: the pipeline's `output` latents (before VAE decoding), channel-first."""
    denoising_step_list: torch.Tensor
    """The timesteps upstream's `CausalInferencePipeline.__init__` computed (warped if asked)."""
    draws: list[tuple[int, int]] = field(default_factory=list)
    """(block, step s) of each re-noising draw, in the order upstream made them."""
    calls: list[dict] = field(default_factory=list)
    """Each generator call, in order: `current_start` (tokens), `timestep` ([B, F] as passed),
    `input` and `x0` (the call's noisy input and x0 prediction, channel-first [B, 16, F, H, W])."""
    kv_index_log: list[list[tuple[int, int]]] = field(default_factory=list)
    """After each generator call, per transformer layer, (global_end_index, local_end_index)."""
    kv_after_block: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    """After each block's refresh call, per layer, copies of the whole self-attention cache (k, v),
    [B, kv_cache_size, heads, head_dim] (keys after q/k norm and RoPE, as upstream stores them)."""
    frame_seq_length: int = 0
    kv_cache_size: int = 0


def run_upstream_causal_inference(
    state_dict: dict[str, torch.Tensor],
    config: dict,
    prompt_embeds: torch.Tensor,
    noise: torch.Tensor,
    renoise: torch.Tensor,
    num_frame_per_block: int = 3,
    denoising_step_list: Sequence[int] = (1000, 750, 500, 250),
    warp_denoising_step: bool = True,
    timestep_shift: float = 5.0,
    local_attn_size: int = -1,
    sink_size: int = 0,
) -> torch.Tensor:
    """Upstream `CausalInferencePipeline.inference` on the given weights and noise; returns latents.

    Args:
        state_dict: original Wan 2.1 names without prefix ("blocks.0.self_attn.q.weight",
            "head.modulation", ...); loaded STRICTLY into upstream's `WanDiffusionWrapper` as
            `model.` + name, as upstream's `inference.py` does with a checkpoint's `generator`.
        config: dim, ffn_dim, num_heads, num_layers, in_dim, out_dim, text_dim, freq_dim
            (text_len is 512 as upstream; `dataclasses.asdict(WanConfig)` of a t2v config works).
        prompt_embeds: [B, L, text_dim], L <= 512, unpadded; handed to the pipeline zero-padded to
            512 rows, as upstream's `WanTextEncoder` returns them.
        noise: [B, 16, T, H, W] (channel-first); permuted to upstream's [B, T, 16, H, W].
        renoise: [steps-1, B, 16, T, H, W]; after step s of block b, upstream's
            `torch.randn_like` draw is replaced by `renoise[s][:, :, b*nf:(b+1)*nf]` (permuted).
        num_frame_per_block: latent frames per block (nf); T must be a multiple of it.
        denoising_step_list, warp_denoising_step, timestep_shift: as in upstream's config
            (`timestep_shift` goes through `model_kwargs` to the wrapper's FlowMatchScheduler).
        local_attn_size, sink_size: upstream's `model_kwargs` (latent frames; -1 = global).

    Returns:
        [B, 16, T, H, W] float32: the pipeline's `output` (x0 of each block's last step).

    Runs in float32 on CPU under `torch.no_grad()` on one intra-op thread; the caller's global RNG
    state and thread count are left as they were.
    Raises AssertionError if upstream draws re-noise a different number of times or in another
    order than (block, step) = (0, 0), (0, 1), ..., or if any other draw from the global generator
    happens during sampling.
    """
    return run_upstream_causal_inference_traced(
        state_dict, config, prompt_embeds, noise, renoise,
        num_frame_per_block=num_frame_per_block, denoising_step_list=denoising_step_list,
        warp_denoising_step=warp_denoising_step, timestep_shift=timestep_shift,
        local_attn_size=local_attn_size, sink_size=sink_size,
    ).latents


def run_upstream_causal_inference_traced(
    state_dict: dict[str, torch.Tensor],
    config: dict,
    prompt_embeds: torch.Tensor,
    noise: torch.Tensor,
    renoise: torch.Tensor,
    num_frame_per_block: int = 3,
    denoising_step_list: Sequence[int] = (1000, 750, 500, 250),
    warp_denoising_step: bool = True,
    timestep_shift: float = 5.0,
    local_attn_size: int = -1,
    sink_size: int = 0,
    context_noise: int = 0,
) -> UpstreamRun:
    """`run_upstream_causal_inference`, returning an `UpstreamRun` with the trace of the run.

    `context_noise` is upstream's config value for the refresh pass's timestep (default 0).

    Run-time patches (all restored or discarded when this returns), beyond `patched_upstream`:
    * on the pipeline object: `num_transformer_blocks` 30 -> num_layers, `frame_seq_length`
      1560 -> (H/2)*(W/2), `_initialize_kv_cache` / `_initialize_crossattn_cache` -> the same code
      with [.., 12, 128] -> [.., num_heads, head_dim] and the global cache 32760 -> T * frame tokens;
    * on each `CausalWanSelfAttention`: `max_attention_size` 32760 / local*1560 -> the cache size;
    * text encoder and VAE: stubs passed to the pipeline's constructor (prompt_embeds back; decode
      returns its input, and the harness takes the `return_latents=True` latents);
    * `torch.randn_like` -> the matching `renoise` slice, only from `inference` at line 208.
    """
    cfg = _model_kwargs(config)
    steps = len(denoising_step_list)
    nf = int(num_frame_per_block)
    if noise.dim() != 5:
        raise ValueError("noise must be [B, C, T, H, W]")
    batch, channels, frames, height, width = noise.shape
    if channels != cfg["in_dim"] or channels != cfg["out_dim"]:
        raise ValueError("noise channels must equal in_dim and out_dim")
    if steps < 1 or nf < 1 or frames % nf or height % 2 or width % 2:
        raise ValueError("need >= 1 step, T a multiple of num_frame_per_block, even H and W")
    if tuple(renoise.shape) != (steps - 1, batch, channels, frames, height, width):
        want = (steps - 1, batch, channels, frames, height, width)
        raise ValueError(f"renoise must be {want}, got {tuple(renoise.shape)}")
    if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != batch or prompt_embeds.shape[2] != cfg["text_dim"] \
            or prompt_embeds.shape[1] > TEXT_LEN:
        raise ValueError(f"prompt_embeds must be [B, L <= {TEXT_LEN}, text_dim]")
    if local_attn_size != -1 and not (nf <= local_attn_size and 0 <= sink_size):
        raise ValueError("local_attn_size must hold at least one block")

    frame_tokens = (height // 2) * (width // 2)
    heads, head_dim = cfg["num_heads"], cfg["dim"] // cfg["num_heads"]
    cache_tokens = frames * frame_tokens if local_attn_size == -1 else local_attn_size * frame_tokens
    num_blocks = frames // nf

    noise_bf = noise.detach().to(torch.float32).permute(0, 2, 1, 3, 4).contiguous()  # [B, T, C, H, W]
    renoise_bf = renoise.detach().to(torch.float32).permute(0, 1, 3, 2, 4, 5).contiguous()  # [S, B, T, C, H, W]
    padded = torch.zeros(batch, TEXT_LEN, cfg["text_dim"], dtype=torch.float32)
    padded[:, :prompt_embeds.shape[1]] = prompt_embeds.detach().to(torch.float32)

    class TextEncoderStub(torch.nn.Module):
        """Stands for upstream's WanTextEncoder: [B, 512, text_dim], zero past the prompt."""

        def forward(self, text_prompts):
            assert len(text_prompts) == batch
            return {"prompt_embeds": padded}

    class VAEStub(torch.nn.Module):
        """Stands for upstream's WanVAEWrapper: decoding is skipped (returns the latents)."""

        def decode_to_pixel(self, latent, use_cache=False):
            return latent.clone()

    run = UpstreamRun(latents=torch.empty(0), denoising_step_list=torch.empty(0),
                      frame_seq_length=frame_tokens, kv_cache_size=cache_tokens)

    with torch.random.fork_rng(devices=[]), torch.no_grad(), _one_thread(), patched_upstream(config) as mods, \
            contextlib.redirect_stdout(io.StringIO()):
        ci = mods.causal_inference
        model_kwargs = {"timestep_shift": float(timestep_shift)}
        if local_attn_size != -1:
            model_kwargs["local_attn_size"] = int(local_attn_size)
        if sink_size:
            model_kwargs["sink_size"] = int(sink_size)
        # configs/default_config.yaml merged with configs/self_forcing_dmd.yaml, the fields the pipeline reads.
        args = types.SimpleNamespace(
            denoising_step_list=list(denoising_step_list),
            warp_denoising_step=bool(warp_denoising_step),
            num_frame_per_block=nf,
            independent_first_frame=False,
            context_noise=context_noise,
            model_kwargs=model_kwargs,
        )
        pipe = ci.CausalInferencePipeline(args, device=torch.device("cpu"),
                                          text_encoder=TextEncoderStub(), vae=VAEStub())
        # As upstream's inference.py: load the checkpoint's generator weights (strict).
        pipe.generator.load_state_dict({f"model.{k}": v for k, v in state_dict.items()}, strict=True)
        pipe.generator.to(torch.float32)

        # Hard-coded Wan-1.3B constants -> the tiny config's.
        assert pipe.num_transformer_blocks == _WAN13B_LAYERS and pipe.frame_seq_length == _WAN13B_FRAME_TOKENS
        pipe.num_transformer_blocks = cfg["num_layers"]
        pipe.frame_seq_length = frame_tokens
        for block in pipe.generator.model.blocks:
            block.self_attn.max_attention_size = cache_tokens

        def _initialize_kv_cache(batch_size, dtype, device):
            # pipeline/causal_inference.py l.278-298, with 32760 -> T * frame tokens and 12, 128 -> heads, head_dim.
            kv_cache1 = []
            if pipe.local_attn_size != -1:
                kv_cache_size = pipe.local_attn_size * pipe.frame_seq_length
            else:
                kv_cache_size = frames * pipe.frame_seq_length
            for _ in range(pipe.num_transformer_blocks):
                kv_cache1.append({
                    "k": torch.zeros([batch_size, kv_cache_size, heads, head_dim], dtype=dtype, device=device),
                    "v": torch.zeros([batch_size, kv_cache_size, heads, head_dim], dtype=dtype, device=device),
                    "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
                    "local_end_index": torch.tensor([0], dtype=torch.long, device=device),
                })
            pipe.kv_cache1 = kv_cache1

        def _initialize_crossattn_cache(batch_size, dtype, device):
            # pipeline/causal_inference.py l.300-312, with 12, 128 -> heads, head_dim.
            pipe.crossattn_cache = [{
                "k": torch.zeros([batch_size, TEXT_LEN, heads, head_dim], dtype=dtype, device=device),
                "v": torch.zeros([batch_size, TEXT_LEN, heads, head_dim], dtype=dtype, device=device),
                "is_init": False,
            } for _ in range(pipe.num_transformer_blocks)]

        pipe._initialize_kv_cache = _initialize_kv_cache
        pipe._initialize_crossattn_cache = _initialize_crossattn_cache

        step_list = pipe.denoising_step_list.clone()
        run.denoising_step_list = step_list
        generator_forward = pipe.generator.forward

        def traced_forward(noisy_image_or_video, conditional_dict, timestep, kv_cache=None,
                           crossattn_cache=None, current_start=None, **kwargs):
            out = generator_forward(noisy_image_or_video, conditional_dict, timestep, kv_cache=kv_cache,
                                    crossattn_cache=crossattn_cache, current_start=current_start, **kwargs)
            run.calls.append({"current_start": int(current_start), "timestep": timestep.clone(),
                              "input": noisy_image_or_video.permute(0, 2, 1, 3, 4).clone(),
                              "x0": out[1].permute(0, 2, 1, 3, 4).clone()})
            run.kv_index_log.append([(int(c["global_end_index"]), int(c["local_end_index"])) for c in kv_cache])
            if len(run.calls) % (steps + 1) == 0:  # the refresh call ends a block
                run.kv_after_block.append([(c["k"].clone(), c["v"].clone()) for c in kv_cache])
            return out

        pipe.generator.forward = traced_forward
        ci_file = str(Path(ci.__file__).resolve())

        def renoise_like(input, *args, **kwargs):
            caller = sys._getframe(1)
            if str(Path(caller.f_code.co_filename).resolve()) != ci_file or caller.f_code.co_name != "inference" \
                    or caller.f_lineno != _RENOISE_LINE or args or kwargs:
                raise AssertionError(f"unexpected torch.randn_like call from {caller.f_code.co_filename}:"
                                     f"{caller.f_lineno} ({caller.f_code.co_name})")
            k = len(run.draws)
            if steps < 2:
                raise AssertionError("re-noising draw with a single denoising step")
            b, s = divmod(k, steps - 1)
            last = run.calls[-1]
            # The draw follows the generator call of block b, step s.
            assert last["current_start"] == b * nf * frame_tokens, (k, last["current_start"])
            assert torch.all(last["timestep"] == step_list[s]), (k, last["timestep"], step_list[s])
            eps = renoise_bf[s][:, b * nf:(b + 1) * nf].flatten(0, 1)
            assert eps.shape == input.shape, (eps.shape, input.shape)
            run.draws.append((b, s))
            return eps.to(dtype=input.dtype, device=input.device).clone()

        rng_before = torch.random.get_rng_state()
        with _setattrs([(torch, "randn_like", renoise_like)]):
            _video, latents = pipe.inference(noise=noise_bf, text_prompts=["<prompt embeds given>"] * batch,
                                             return_latents=True)
        rng_after = torch.random.get_rng_state()

    if not torch.equal(rng_before, rng_after):
        raise AssertionError("upstream drew from the global RNG besides the re-noising draws")
    expected = [(b, s) for b in range(num_blocks) for s in range(steps - 1)]
    if run.draws != expected:
        raise AssertionError(f"re-noising draws {run.draws} != expected {expected}")
    if len(run.calls) != num_blocks * (steps + 1):
        raise AssertionError(f"{len(run.calls)} generator calls, expected {num_blocks * (steps + 1)}")
    run.latents = latents.permute(0, 2, 1, 3, 4).contiguous()
    return run
