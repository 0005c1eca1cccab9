"""The VACE add-on inside the causal model: diffusers' `WanVACETransformer3DModel`, extended by hooks.

diffusers' VACE forward (`transformer_wan_vace.py`, `WanVACETransformer3DModel.forward`) patch-embeds
the 96-channel control, runs the `vace_blocks` over it (block 0 first adds the patch-embedded
input through `proj_in`), keeps each block's `proj_out` as a hint, then runs the main blocks and
adds hint n times scale n after main block `vace_layers[n]`. That forward has no per-token
timestep path, which teacher forcing and the masked recompute need (frames at different noise
levels in one call). `WanTransformer3DModel.forward` has it and shares every other step, so:

- `VaceForwardHook` (a diffusers `ModelHook` on the VACE model) takes diffusers' VACE arguments
  and runs `WanTransformer3DModel.forward` on the model; calls keep going through `__call__`, so
  accelerate's and FSDP's own hooks still run;
- `VaceHintHook` on each main block `vace_layers[n]` adds hint n after the block; on block 0 (which
  diffusers requires in `vace_layers`, so it is always the first) it first runs the control branch
  on that block's inputs: the patch-embedded latents, the projected text, the timestep projection
  and the rotary tables, the ones diffusers passes the VACE blocks.

The VACE blocks' attention goes through `causal_wan`'s processors like the main blocks', so
under causal generation they have KV caches of their own and the same RoPE offset. Hints are
kept per call, keyed by the call's timestep projection (one tensor object every block of the
call receives, also when gradient checkpointing reruns a block during the backward, after the
call has returned; two calls before one backward keep theirs apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch.utils.weak import WeakIdKeyDictionary

FORWARD_HOOK = "sftools_vace_forward"
HINT_HOOK = "sftools_vace_hint"


@dataclass
class _Call:
    control: torch.Tensor  # [B, vace_in_channels, frames, H, W], the frames of the call
    scales: tuple[torch.Tensor, ...]  # one per VACE block
    hints: list[torch.Tensor | None] = field(default_factory=list)


class ControlState:
    """The control of the call being made, and the hints of every call whose graph is still alive."""

    def __init__(self) -> None:
        self.pending: _Call | None = None
        self.calls: WeakIdKeyDictionary = WeakIdKeyDictionary()


def is_vace(transformer: torch.nn.Module) -> bool:
    return isinstance(transformer, WanVACETransformer3DModel)


def run_vace_block(block, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   control: torch.Tensor, temb: torch.Tensor, rotary_emb) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(hint, control) of one `WanVACETransformerBlock`. diffusers' own forward where it applies;
    with per-token modulation ([B, tokens, 6, dim]) its table + temb chunks along the wrong axis,
    so the block runs as what it is: `proj_in` (+ the input), `WanTransformerBlock.forward` on its
    own norms, attention and FFN (the same attribute names), then `proj_out`."""
    if temb.ndim == 3:
        return block(hidden_states, encoder_hidden_states, control, temb, rotary_emb)
    if block.proj_in is not None:
        control = block.proj_in(control) + hidden_states
    control = WanTransformerBlock.forward(block, control, encoder_hidden_states, temb, rotary_emb)
    return (block.proj_out(control) if block.proj_out is not None else None), control


class VaceHintHook(ModelHook):
    """On main block `vace_layers[n]`: hint n added after the block (block 0 computes them all)."""

    def __init__(self, state: ControlState, transformer: WanVACETransformer3DModel, n: int) -> None:
        super().__init__()
        self.state, self.transformer, self.n = state, transformer, n

    def _branch(self, call: _Call, hidden_states, encoder_hidden_states, temb, rotary_emb) -> list:
        control = self.transformer.vace_patch_embedding(call.control).flatten(2).transpose(1, 2)
        hints = []
        for block in self.transformer.vace_blocks:
            hint, control = run_vace_block(block, hidden_states, encoder_hidden_states, control, temb, rotary_emb)
            hints.append(hint)
        return hints

    def new_forward(self, block, hidden_states, encoder_hidden_states, temb, rotary_emb):
        call = self.state.calls.get(temb)
        if self.n == 0:
            # Always (re)computed here: a checkpointed rerun of block 0 must redo the branch's ops too.
            call = call or self.state.pending
            call.hints = self._branch(call, hidden_states, encoder_hidden_states, temb, rotary_emb)
            self.state.calls[temb] = call
        out = self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        return out + call.hints[self.n].to(out.device) * call.scales[self.n]


class VaceForwardHook(ModelHook):
    """diffusers' `WanVACETransformer3DModel.forward` arguments, run as described above."""

    def __init__(self, state: ControlState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, model, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                    control_hidden_states=None, control_hidden_states_scale=None, return_dict=True,
                    attention_kwargs=None):
        layers = model.config.vace_layers
        if control_hidden_states is None:
            raise ValueError("a VACE model needs control_hidden_states (the 96-channel VACE context) for its frames")
        if control_hidden_states.shape[2:] != hidden_states.shape[2:]:
            # diffusers zero-pads a shorter control; the sampler always gives each call its own frames.
            raise ValueError(f"control of shape {list(control_hidden_states.shape)} for latents of shape "
                             f"{list(hidden_states.shape)}: frames and size must match")
        scales = control_hidden_states_scale
        if scales is None:
            scales = control_hidden_states.new_ones(len(layers))
        if len(scales) != len(layers):
            raise ValueError(f"{len(scales)} control scales for {len(layers)} VACE layers")
        self.state.pending = _Call(control_hidden_states, torch.unbind(scales))
        try:
            return WanTransformer3DModel.forward(model, hidden_states, timestep, encoder_hidden_states,
                                                 encoder_hidden_states_image, return_dict, attention_kwargs)
        finally:
            self.state.pending = None


def install_vace(transformer: WanVACETransformer3DModel) -> ControlState:
    """Hook the control branch into `transformer` (its attention processors are the caller's)."""
    state = ControlState()
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(VaceForwardHook(state), FORWARD_HOOK)
    # Hint n goes to the n-th main layer in order, as diffusers pops them (the lists are sorted anyway).
    for n, layer in enumerate(sorted(transformer.config.vace_layers)):
        registry = HookRegistry.check_if_exists_or_initialize(transformer.blocks[layer])
        registry.register_hook(VaceHintHook(state, transformer, n), HINT_HOOK)
    return state
