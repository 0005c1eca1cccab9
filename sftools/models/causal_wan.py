"""The causal Wan transformer: diffusers' `WanTransformer3DModel` generating block by block.

Nothing of diffusers' model is copied. Three extensions, the ways diffusers extends itself:
- `CausalSelfAttnProcessor` on every block's `attn1`: the same projections, q/k RMS norm and RoPE as
  diffusers' `WanAttnProcessor`, then the block's K/V go into the layer's `LayerCache` and the
  queries attend to the stored history plus the block itself (no mask inside the block);
- `CachedCrossAttnProcessor` on every `attn2`: the text K/V are computed once per video and branch;
- `RopeOffsetHook` (a diffusers `ModelHook`) on `rope`: the block's frames get their ABSOLUTE
  temporal positions, `start_frame` onwards, instead of 0 onwards.

Per-frame timesteps come from diffusers itself: a timestep of shape [B, tokens] selects its
per-token modulation path (written for Wan 2.2 TI2V), so a call whose frames sit at different
noise levels (training's teacher forcing) needs nothing extra. Outside a causal call (`state.active`
False: the teacher, the critic, a bidirectional model) every processor defers to diffusers' own.

A `WanVACETransformer3DModel` works the same way, with its control branch hooked in by
`causal_vace`: its `vace_blocks` get the same processors at layer indices after the main blocks
(KV caches of their own, in the same `CacheSpec`), and every call takes the control latents of
its frames (`control`, [B, 96, frames, H, W]) and `control_scale` (diffusers'
`control_hidden_states_scale`: one number for every VACE layer, or one each).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from sftools.errors import SftoolsError
from sftools.models.causal_vace import install_vace, is_vace
from sftools.models.kv_cache import CacheSpec, LayerCache

ROPE_HOOK = "sftools_rope_offset"


@dataclass
class CausalState:
    """What the processors of one model share: the cache layout, the caches per branch, and the
    block the current call denoises."""

    num_layers: int
    spec: CacheSpec | None = None
    active: bool = False
    mask: torch.Tensor | None = None  # [tokens, tokens] for a masked parallel forward (not a causal call)
    start_frame: int = 0
    branch: str = "cond"
    context: torch.Tensor | None = None  # the prompt embeddings of the current causal call, as given
    self_kv: dict[str, list[LayerCache]] = field(default_factory=dict)
    cross_kv: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]] = field(default_factory=dict)

    def layer(self, index: int) -> LayerCache:
        if self.branch not in self.self_kv:
            self.self_kv[self.branch] = [LayerCache(self.spec) for _ in range(self.num_layers)]
        return self.self_kv[self.branch][index]

    def cross_slots(self) -> list:
        return self.cross_kv.setdefault(self.branch, [None] * self.num_layers)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs, as diffusers' `WanAttnProcessor` does ([B, S, H, D])."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class CausalSelfAttnProcessor:
    """Self-attention of one block over its layer's KV cache (see `kv_cache`)."""

    _attention_backend = None  # diffusers' dispatch picks SDPA (flash kernels on GPU) unless set
    _parallel_config = None

    def __init__(self, state: CausalState, layer: int) -> None:
        self.state, self.index = state, layer
        self.default = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if not self.state.active:
            return self.default(attn, hidden_states, encoder_hidden_states, self.state.mask, rotary_emb)
        query = _heads(attn.norm_q(attn.to_q(hidden_states)), attn.heads)
        key = _heads(attn.norm_k(attn.to_k(hidden_states)), attn.heads)
        value = _heads(attn.to_v(hidden_states), attn.heads)
        query, key = apply_rope(query, *rotary_emb), apply_rope(key, *rotary_emb)
        start = self.state.start_frame * self.state.spec.frame_tokens
        keys, values = self.state.layer(self.index).update(key, value, start)
        out = dispatch_attention_fn(query, keys, values, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class CachedCrossAttnProcessor:
    """Cross-attention whose text K/V are computed on the first call of a video and branch.
    Image-conditioned (I2V) layers and calls under autograd (gradient checkpointing recomputes
    the forward, which must not find a cache filled in between) use diffusers' processor."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: CausalState, layer: int) -> None:
        self.state, self.index = state, layer
        self.default = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if not self.state.active or attn.add_k_proj is not None or torch.is_grad_enabled():
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        slots = self.state.cross_slots()
        # Keyed by the prompt embeddings the caller gave (the slot holds them, so the object cannot be
        # freed and its identity reused): another prompt in the same video and branch gets fresh K/V.
        # (encoder_hidden_states is diffusers' text projection of them, a new tensor every call.)
        context = self.state.context
        if slots[self.index] is None or slots[self.index][0] is not context:
            key = _heads(attn.norm_k(attn.to_k(encoder_hidden_states)), attn.heads)
            slots[self.index] = (context, key, _heads(attn.to_v(encoder_hidden_states), attn.heads))
        _, key, value = slots[self.index]
        query = _heads(attn.norm_q(attn.to_q(hidden_states)), attn.heads)
        out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class RopeOffsetHook(ModelHook):
    """Positions of a causal call start at the block's absolute frame; other calls run diffusers' own."""

    def __init__(self, state: CausalState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, rope, hidden_states: torch.Tensor):
        if not self.state.active:
            return self.fn_ref.original_forward(hidden_states)
        offset = self.state.start_frame
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = rope.patch_size
        f, h, w = frames // p_t, height // p_h, width // p_w
        if offset + f > rope.max_seq_len:
            raise SftoolsError(f"latent frame {offset + f - 1} is past the model's RoPE table "
                               f"({rope.max_seq_len} frames); generate fewer frames")
        sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
        tables = []
        for freqs in (rope.freqs_cos, rope.freqs_sin):
            t_part, h_part, w_part = freqs.split(sizes, dim=1)
            grid = torch.cat([t_part[offset:offset + f].view(f, 1, 1, -1).expand(f, h, w, -1),
                              h_part[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                              w_part[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1)
            tables.append(grid.reshape(1, f * h * w, 1, -1))
        return tuple(tables)


ControlScale = float | torch.Tensor  # a VACE control scale: one for every VACE layer, or [layers]


class CausalWanModel(torch.nn.Module):
    """A diffusers Wan transformer (plain or VACE) that generates block by block with a KV cache.

    `forward(latents, timestep, context, start_frame, branch)` denoises the frames of one block,
    [B, C, frames, H, W], starting at latent frame `start_frame`, and returns the model's flow
    prediction for them. `reset(spec)` starts a new video. `bidirectional()` runs plain diffusers.
    A VACE model takes `control` (the frames' slice of the VACE context) in every call.
    """

    def __init__(self, transformer: WanTransformer3DModel | WanVACETransformer3DModel) -> None:
        super().__init__()
        self.transformer = transformer
        vace_blocks = list(transformer.vace_blocks) if is_vace(transformer) else []
        self.state = CausalState(num_layers=len(transformer.blocks) + len(vace_blocks))
        for index, block in enumerate([*transformer.blocks, *vace_blocks]):
            block.attn1.set_processor(CausalSelfAttnProcessor(self.state, index))
            block.attn2.set_processor(CachedCrossAttnProcessor(self.state, index))
        HookRegistry.check_if_exists_or_initialize(transformer.rope).register_hook(RopeOffsetHook(self.state), ROPE_HOOK)
        if vace_blocks:
            install_vace(transformer)

    @property
    def is_vace(self) -> bool:
        return is_vace(self.transformer)

    def reset(self, spec: CacheSpec) -> None:
        """A new video: empty caches of this layout, for every branch."""
        self.state.spec = spec
        self.state.self_kv.clear()
        self.state.cross_kv.clear()

    @contextlib.contextmanager
    def _causal_call(self, start_frame: int, branch: str, context: torch.Tensor) -> Iterator[None]:
        if self.state.spec is None:
            raise RuntimeError("call reset(spec) before the first block of a video")
        self.state.active, self.state.start_frame, self.state.branch = True, start_frame, branch
        self.state.context = context
        try:
            with self._not_checkpointed():
                yield
        finally:
            self.state.active, self.state.start_frame, self.state.context = False, 0, None

    @contextlib.contextmanager
    def _not_checkpointed(self) -> Iterator[None]:
        # Gradient checkpointing would recompute the blocks during the backward, outside this call,
        # where the processors no longer see its cache position or mask: causal and masked calls are
        # not checkpointed (bidirectional ones, the critic's and the teacher's, still are).
        checkpointing, self.transformer.gradient_checkpointing = self.transformer.gradient_checkpointing, False
        try:
            yield
        finally:
            self.transformer.gradient_checkpointing = checkpointing

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                start_frame: int, branch: str = "cond", control: torch.Tensor | None = None,
                control_scale: ControlScale = 1.0) -> torch.Tensor:
        """`timestep` is [B] (every frame of the block at one noise level) or [B, frames]."""
        timestep = self.per_token(timestep, latents)
        with self._causal_call(start_frame, branch, context):
            return self._run(latents, timestep, context, control, control_scale)

    def bidirectional(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                      control: torch.Tensor | None = None, control_scale: ControlScale = 1.0) -> torch.Tensor:
        """diffusers' own forward over all the frames given (the teacher's and the critic's view); for
        a VACE model, diffusers' VACE forward with per-frame timesteps possible (see `causal_vace`)."""
        return self._run(latents, self.per_token(timestep, latents), context, control, control_scale)

    def masked(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
               visible: torch.Tensor, control: torch.Tensor | None = None, control_scale: ControlScale = 1.0
               ) -> torch.Tensor:
        """diffusers' forward over all the frames given, frame f attending to frame g only where
        `visible[f, g]` (see `kv_cache.visible_frames`): what the cache computes block by block, in one
        parallel call (the recompute baseline; teacher forcing and ODE regression train this way).
        The VACE blocks' attention over the control tokens is masked the same way."""
        _, _, _, height, width = latents.shape
        _, p_h, p_w = self.transformer.config.patch_size
        tokens = (height // p_h) * (width // p_w)
        self.state.mask = visible.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1).to(latents.device)
        try:
            with self._not_checkpointed():
                return self.bidirectional(latents, timestep, context, control, control_scale)
        finally:
            self.state.mask = None

    def _run(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
             control: torch.Tensor | None, control_scale: ControlScale) -> torch.Tensor:
        extra = {}
        if self.is_vace:
            if control is None:
                raise ValueError("a VACE model needs `control`, the VACE context of the frames it denoises")
            if not isinstance(control_scale, torch.Tensor):
                control_scale = control.new_full((len(self.transformer.config.vace_layers),), control_scale)
            # As WanVACEPipeline: the scales in the transformer's dtype, on its device.
            extra = dict(control_hidden_states=control,
                         control_hidden_states_scale=control_scale.to(control.device, control.dtype))
        elif control is not None:
            raise ValueError("`control` given to a model without a VACE add-on")
        return self.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=context,
                                return_dict=False, **extra)[0]

    def per_token(self, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """[B, frames] timesteps spread over each frame's tokens (diffusers' per-token path)."""
        if timestep.dim() == 1:
            return timestep
        _, _, frames, height, width = latents.shape
        _, p_h, p_w = self.transformer.config.patch_size
        tokens = (height // p_h) * (width // p_w)
        if timestep.shape[1] != frames:
            raise ValueError(f"timestep has {timestep.shape[1]} frames, the latents {frames}")
        return timestep.repeat_interleave(tokens, dim=1)
