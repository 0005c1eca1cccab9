"""Opening a Wan model from any source: read, unwrap, dequantize, rename, and know its config.

Every command that takes a model (convert, lora extract / merge, sample, verify, train) opens it
here, so a Self Forcing `.pt`, a ComfyUI file, a sharded Wan-AI folder and a diffusers folder all
arrive as the same named lazy tensors.
"""

from __future__ import annotations

from dataclasses import replace

from sftools.errors import SftoolsError
from sftools.io.lazy import Checkpoint
from sftools.io.sources import open_checkpoint
from sftools.wan.config import WanConfig
from sftools.wan.detect import Description, describe_weights
from sftools.wan.experts import expert_folders
from sftools.wan.fp8 import dequantize
from sftools.wan.layouts import to_layout, unwrap


def load_model(src: str, select: str | None = None, layout: str | None = None, dequant: bool = False) -> Checkpoint:
    """Open `src`, unwrap training wrappers, optionally dequantize fp8, and rename to `layout`
    ('original', 'diffusers', or None to keep the file's own)."""
    experts = expert_folders(src)
    if experts:
        # Reading one expert silently (a pipeline's `transformer/`) is the characteristic Wan 2.2 mistake.
        raise SftoolsError(f"{src}: holds two Wan 2.2 A14B experts; name one of them ({', '.join(experts.values())})")
    ckpt = unwrap(open_checkpoint(src), select)
    if not ckpt.tensors:
        raise SftoolsError(f"{src}: holds no tensors")
    if dequant:
        ckpt = dequantize(ckpt)
    return to_layout(ckpt, layout) if layout else ckpt


def stored_config(ckpt: Checkpoint) -> WanConfig | None:
    """The exact config when the file carries a valid one (sftools-written tiny models do);
    anything else in that metadata entry is ignored, since the shapes describe the model anyway."""
    text = ckpt.metadata.get("sftools.config")
    try:
        config = WanConfig.from_json(text) if text else None
    except (ValueError, TypeError, AttributeError):
        return None
    valid = config and all(isinstance(v, int) and v > 0 for v in (config.dim, config.num_heads, config.text_len))
    return config if valid and config.dim % config.num_heads == 0 else None


def describe(ckpt: Checkpoint, expert: str | None = None) -> Description:
    """What an opened checkpoint is: its shapes, the stored head count, and its path's name (which
    may say which Wan 2.2 A14B expert it holds, unless `expert` is known already)."""
    stored = stored_config(ckpt)
    shapes = {n: t.shape for n, t in ckpt.tensors.items()}
    description = describe_weights(shapes, stored.num_heads if stored else None, ckpt.path, expert)
    if stored and description.config is not None:  # the other fact no shape holds: the rows it attends over
        description = replace(description, config=replace(description.config, text_len=stored.text_len))
    return description


def model_config(ckpt: Checkpoint) -> WanConfig:
    """The config of a whole Wan transformer: the stored one, else the one its shapes imply.
    Refuses weights that are not a complete Wan transformer, naming the first problem."""
    stored = stored_config(ckpt)
    description = describe(ckpt)
    if not description.is_model or description.config is None:
        first = next(iter(ckpt.tensors), "-")
        raise SftoolsError(f"{ckpt.path}: is not a Wan transformer ({description.kind}; first key {first})")
    for problem in ("missing", "mismatched"):
        if description.details.get(problem):
            raise SftoolsError(f"{ckpt.path}: is not a whole Wan model: {problem} {description.details[problem][0]}")
    return stored or description.config
