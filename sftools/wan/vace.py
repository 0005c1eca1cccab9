"""The VACE add-on as weights: which tensors it is, where it sits, and whether it fits a base.

A Wan2.1-VACE model is a T2V model plus `vace_patch_embedding.*` and `vace_blocks.N.*` (reference
wan_formats.md §3); only `vace_blocks.0` has `before_proj`, which adds the base's patch-embedded
input. Block n's hint is added after main layer `vace_layers[n]`, and that list is not in the
weights: Wan and diffusers read it from the config, Kijai's wrapper from the width, and ComfyUI from
the block count alone, at `range(0, L, L // n)` (comfy/ldm/wan/model.py `VaceWanModel`). A grafted
file is therefore ComfyUI-ready only where that rule gives the add-on's own placement.

Module files are the form Kijai's WanVideoWrapper merges into a base (`sd.update`): the add-on's keys
alone, original names. `extract` records in them what the weights do not say (the placement and
depth of the model they were cut from, its head count when known) under `sftools.vace`, so `graft`
can check where the blocks go; files without it get Wan's placement for their width (`detect`).
A grafted file carries its Wan config (`sftools.config`), so `inspect` and `extract` read it back.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace

import torch

from sftools import __version__
from sftools.errors import SftoolsError
from sftools.io.dtypes import torch_dtype
from sftools.io.lazy import Checkpoint, LazyTensor, dtype_counts
from sftools.io.output import check_output_file, refuse_overwrite, write_file, write_ordered
from sftools.io.safetensors_io import Named, plan_order
from sftools.wan.config import WanConfig
from sftools.wan.detect import Description
from sftools.wan.fp8 import DROPPED, SCALE_SUFFIXES, dequantize
from sftools.wan.keys import detect_layout
from sftools.wan.layouts import to_layout
from sftools.wan.source import describe, load_model, stored_config

PREFIXES = ("vace_patch_embedding.", "vace_blocks.")
FIRST_INPUT = "vace_blocks.0.before_proj.weight"
FACTS_KEY = "sftools.vace"


def is_vace_key(name: str) -> bool:
    """An original or diffusers name of the add-on (both layouts keep these two prefixes)."""
    return name.startswith(PREFIXES)


def comfyui_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """The main layers ComfyUI hangs `count` add-on blocks on, in a model of `num_layers`."""
    return tuple(range(0, num_layers, max(1, num_layers // count)))


@dataclass(frozen=True)
class AddOnFacts:
    """What the add-on's weights do not say, about the model it was cut from."""

    num_layers: int
    vace_layers: tuple[int, ...]
    num_heads: int | None  # None: not known (no config came with the weights)
    recorded: bool  # read from the file, not Wan's default for the width

    def to_json(self) -> str:
        return json.dumps({"num_layers": self.num_layers, "vace_layers": list(self.vace_layers),
                           "num_heads": self.num_heads}, sort_keys=True)


@dataclass
class AddOn:
    """An add-on read from a module file or a whole VACE model, in original names."""

    ckpt: Checkpoint  # the source as opened (its files, format and metadata)
    tensors: dict[str, LazyTensor]
    description: Description  # of the add-on alone: dim, ffn, vace_in_dim
    facts: AddOnFacts

    @property
    def config(self) -> WanConfig:
        return self.description.config


def open_original(path: str, select: str | None = None) -> Checkpoint:
    """`path` unwrapped and in original names. Scaled fp8 is dequantized (ComfyUI would cast a
    grafted Linear without a scale to fp8 unscaled, and scale names have no diffusers spelling);
    every other dtype, plain fp8 included, is kept."""
    ckpt = load_model(path, select)
    if any(n.endswith(SCALE_SUFFIXES) or DROPPED.search(n) for n in ckpt.tensors):
        ckpt = dequantize(ckpt)
    if detect_layout(ckpt.tensors) == "unknown":
        raise SftoolsError(f"{path}: is not a Wan model or VACE module (first key {next(iter(ckpt.tensors))})")
    return to_layout(ckpt, "original")


def read_addon(path: str, select: str | None = None) -> AddOn:
    """The add-on of a module file or a whole VACE model at `path`."""
    return addon_of(path, open_original(path, select))


def addon_of(path: str, ckpt: Checkpoint) -> AddOn:
    """The add-on in original-named `ckpt` (read from `path`), checked complete: every block's keys,
    `before_proj` on block 0, shapes of one width."""
    tensors = {n: t for n, t in ckpt.tensors.items() if is_vace_key(n)}
    if not tensors:
        raise SftoolsError(f"{path}: holds no VACE add-on (no vace_patch_embedding / vace_blocks keys; "
                           f"first key {next(iter(ckpt.tensors))})")
    if FIRST_INPUT not in tensors:
        raise SftoolsError(f"{path}: has no {FIRST_INPUT}: the first VACE block must take the base's input "
                           f"(an add-on cut at the wrong block, or not VACE)")
    description = describe(ckpt.replace(tensors))
    if description.config is None:  # blocks without the patch embedding
        raise SftoolsError(f"{path}: is not a whole VACE add-on: missing vace_patch_embedding.weight")
    for problem in ("missing", "unexpected", "mismatched"):
        if description.details.get(problem):
            raise SftoolsError(f"{path}: is not a whole VACE add-on: {problem} {description.details[problem][0]}")
    return AddOn(ckpt, tensors, description, _facts(ckpt, description.config))


def _facts(ckpt: Checkpoint, addon: WanConfig) -> AddOnFacts:
    """From `sftools.vace` (module files extract wrote), else the stored config of a whole VACE
    model, else what the shapes imply: a whole model's own depth, Wan's default for the width."""
    count = len(addon.vace_layers)
    try:
        data = json.loads(ckpt.metadata.get(FACTS_KEY) or "null")
        facts = AddOnFacts(int(data["num_layers"]), tuple(int(i) for i in data["vace_layers"]),
                           int(data["num_heads"]) if data["num_heads"] else None, True)
    except (ValueError, TypeError, KeyError):
        facts = None
    stored = stored_config(ckpt)
    if facts is None and stored is not None and stored.model_type == "vace":
        facts = AddOnFacts(stored.num_layers, stored.vace_layers, stored.num_heads, True)
    # A recorded placement is trusted only when it fits the blocks present; anything else is ignored.
    if facts is not None and _valid_placement(facts.vace_layers, count, facts.num_layers):
        return facts
    whole = describe(ckpt).config
    return AddOnFacts(whole.num_layers, whole.vace_layers, None, False)


def _valid_placement(layers: tuple[int, ...], count: int, num_layers: int) -> bool:
    increasing = all(a < b for a, b in zip(layers, layers[1:]))
    return len(layers) == count and layers[:1] == (0,) and increasing and layers[-1] < num_layers


def extract_module(src: str, out: str, layout: str = "original", dtype: str = "keep",
                   select: str | None = None) -> dict:
    """Write the add-on of `src` (a VACE model or module, any form) alone to `out`, with the facts
    graft checks, streaming one tensor at a time."""
    check_output_file(out, [src])
    addon = read_addon(src, select)
    refuse_overwrite(out, addon.ckpt.files)
    module = to_layout(addon.ckpt.replace(addon.tensors), layout).cast(torch_dtype(dtype))
    metadata = {
        **{k: v for k, v in addon.ckpt.metadata.items() if k.startswith("sftools.")},
        "format": "pt",
        "sftools.version": __version__,
        "sftools.source": os.path.basename(os.path.normpath(src)),
        "sftools.source_format": addon.ckpt.format,
        "sftools.layout": layout,
        FACTS_KEY: addon.facts.to_json(),
    }
    write_file(out, module.tensors, metadata, desc="extracting")
    return {
        "source": src,
        "output": out,
        "source_model": describe(addon.ckpt).title,
        "layout": layout,
        "tensors": len(module.tensors),
        "bytes": sum(t.nbytes for t in module.tensors.values()),
        "dtypes": dtype_counts(module.tensors.values()),
        **_facts_report(addon),
        "notes": module.notes,
    }


def write_module(out: str, tensors: dict[str, torch.Tensor], config: WanConfig, metadata: dict[str, str]) -> None:
    """An add-on module in original names, as `extract_module` writes one, from tensors in memory
    (a trained add-on), with the facts of `config` (the VACE model it belongs to) for `graft`."""
    facts = AddOnFacts(config.num_layers, config.vace_layers, config.num_heads, recorded=True)
    write_file(out, {n: LazyTensor.of(t) for n, t in tensors.items()},
               {**metadata, "format": "pt", "sftools.version": __version__, "sftools.layout": "original",
                FACTS_KEY: facts.to_json()}, desc="writing VACE module")


def _facts_report(addon: AddOn) -> dict:
    facts = addon.facts
    return {"vace_blocks": len(facts.vace_layers), "vace_layers": list(facts.vace_layers),
            "cut_from_layers": facts.num_layers, "dim": addon.config.dim,
            "placement": "recorded" if facts.recorded else "not recorded: spread evenly, as Wan places them"}


def fit(base_path: str, base: Checkpoint, addon: AddOn, module_path: str, replace_addon: bool = False
        ) -> tuple[dict[str, LazyTensor], WanConfig]:
    """The base's own tensors and the config of base + add-on, or one line saying why the add-on
    cannot go on this base (naming the file and key)."""
    own = {n: t for n, t in base.tensors.items() if not is_vace_key(n)}
    if not own:
        raise SftoolsError(f"{base_path}: is a VACE module, not a base model")
    if len(own) < len(base.tensors) and not replace_addon:
        raise SftoolsError(f"{base_path}: already holds a VACE add-on ({len(base.tensors) - len(own)} tensors); "
                           f"give --replace to swap in the add-on of {module_path}")
    config = _t2v_config(base_path, base.replace(own))
    stored = stored_config(base)
    _check_width(base_path, config, stored.num_heads if stored else None, addon, module_path)
    layers = _check_placement(base_path, config.num_layers, addon, module_path)
    # The weights hold no head count: the base's config, else the add-on's, else ComfyUI's dim / 128.
    heads = stored.num_heads if stored else addon.facts.num_heads or config.num_heads
    return own, replace(config, model_type="vace", num_heads=heads, vace_layers=layers,
                        vace_in_dim=addon.config.vace_in_dim)


def _t2v_config(path: str, base: Checkpoint) -> WanConfig:
    description = describe(base)
    if not description.is_model:
        first = next(iter(base.tensors))
        raise SftoolsError(f"{path}: is not a Wan transformer ({description.kind}; first key {first})")
    c = description.config
    if c.model_type != "t2v":
        extra = " (image-conditioned, in_dim 36)" if c.model_type in ("i2v", "flf2v") else ""
        raise SftoolsError(f"{path}: is a Wan {c.wan_version} {c.model_type.upper()} model{extra}; VACE add-ons are "
                           f"trained on T2V bases: graft onto a T2V model of the add-on's size")
    for problem in ("missing", "mismatched"):
        if description.details.get(problem):
            raise SftoolsError(f"{path}: is not a whole Wan model: {problem} {description.details[problem][0]}")
    return c


def _check_width(base_path: str, base: WanConfig, base_heads: int | None, addon: AddOn, module_path: str) -> None:
    a = addon.config
    pairs = [
        ("vace_patch_embedding.weight", "width", a.dim, base.dim, "head.modulation"),
        ("vace_blocks.0.ffn.0.weight", "ffn_dim", a.ffn_dim, base.ffn_dim, "blocks.0.ffn.0.weight"),
    ]
    if base_heads and addon.facts.num_heads:  # head counts are only compared where both files record them
        pairs.append(("its metadata", "num_heads", addon.facts.num_heads, base_heads, "sftools.config"))
    for key, what, mine, theirs, base_key in pairs:
        if mine != theirs:
            raise SftoolsError(f"{module_path}: {key} gives {what} {mine}, the base {base_path} has {theirs} "
                               f"({base_key}): the add-on belongs to a model of another size")


def _check_placement(base_path: str, num_layers: int, addon: AddOn, module_path: str) -> tuple[int, ...]:
    layers = addon.facts.vace_layers
    count = len(layers)
    if count > num_layers:
        raise SftoolsError(f"{module_path}: has {count} VACE blocks (vace_blocks.{count - 1}), more than the "
                           f"{num_layers} layers of {base_path}")
    if layers[-1] >= num_layers:
        raise SftoolsError(f"{module_path}: puts vace_blocks.{count - 1} after layer {layers[-1]}, beyond the "
                           f"{num_layers} layers (0-{num_layers - 1}) of {base_path}")
    if addon.facts.recorded and addon.facts.num_layers != num_layers:
        raise SftoolsError(f"{module_path}: was cut from a {addon.facts.num_layers}-layer model (its metadata); "
                           f"{base_path} has {num_layers} layers")
    comfyui = comfyui_layers(num_layers, count)
    if comfyui != layers:
        raise SftoolsError(f"{module_path}: its {count} blocks follow layers {list(layers)}, but ComfyUI hangs "
                           f"{count} VACE blocks on a {num_layers}-layer model after layers {list(comfyui)}")
    return layers


def graft_order(base: dict[str, LazyTensor], addon: dict[str, LazyTensor]) -> list[Named]:
    """The base's tensors, then the add-on's; one plan for all when mixed element sizes would leave
    an add-on tensor misaligned after the base (readers map each tensor in place)."""
    first = plan_order(base.items())
    widest = max(t.dtype.itemsize for t in addon.values())
    if sum(t.nbytes for _, t in first) % widest:
        return plan_order([*base.items(), *addon.items()])
    return first + plan_order(addon.items())


def graft_module(base_path: str, module_path: str, out: str, select: str | None = None,
                 replace_addon: bool = False) -> dict:
    """Write base + add-on as one model in original names (what ComfyUI, diffusers' single-file
    loader and `inspect` detect as VACE); base tensors bit for bit, one tensor at a time."""
    check_output_file(out, [base_path, module_path])
    base = open_original(base_path, select)
    addon = read_addon(module_path)
    refuse_overwrite(out, [*base.files, *addon.ckpt.files])
    own, config = fit(base_path, base, addon, module_path, replace_addon)
    metadata = {
        **{k: v for k, v in base.metadata.items() if k.startswith("sftools.")},
        "format": "pt",
        "sftools.version": __version__,
        "sftools.source": os.path.basename(os.path.normpath(base_path)),
        "sftools.vace_module": os.path.basename(os.path.normpath(module_path)),
        "sftools.layout": "original",
        "sftools.config": config.to_json(),
    }
    write_ordered(out, graft_order(own, addon.tensors), metadata, desc="grafting")
    notes = base.notes + addon.ckpt.notes
    if len(own) < len(base.tensors):
        notes.append(f"replaced the base's add-on ({len(base.tensors) - len(own)} tensors)")
    return {
        "base": base_path,
        "module": module_path,
        "output": out,
        "model": describe(base.replace({**own, **addon.tensors})).title,
        "config": {**asdict(config), "vace_layers": list(config.vace_layers)},
        "base_tensors": len(own),
        "vace_tensors": len(addon.tensors),
        "dtypes": dtype_counts([*own.values(), *addon.tensors.values()]),
        **_facts_report(addon),
        "notes": notes,
    }
