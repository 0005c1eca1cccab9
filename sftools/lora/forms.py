"""LoRA files in the forms Wan loaders read, and one in-memory form they all map to.

In memory a LoRA is deltas on original-named parameters with the scale baked in: low-rank factors
(`up @ down`, alpha = rank, so every loader applies scale 1) and dense diffs.

On disk (the key grammar is `lora.keys`):
- comfyui (written, default): `diffusion_model.<original module>.lora_up.weight` / `.lora_down.weight`,
  dense `.diff` (weights and parameters such as `modulation`) and `.diff_b` (biases). ComfyUI and
  Kijai's wrapper apply all of it; LightX2V, Wan2GP, DiffSynth-Studio and diffusers part of it.
- diffusers (written): peft names `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`,
  bias deltas as `.lora_B.bias`, the `LoraConfig` as JSON in the `lora_adapter_metadata` metadata.
  peft has no dense diffs, so those are left out and listed. Only diffusers and peft load all of it.
- for a loader (`loader_tensors`, `--for`): that loader's spelling (`loaders.py`), holding only what
  it applies, the rest named.
- read as well: `lora_A` / `lora_B` spellings with `diffusion_model.`, `.alpha` keys, kohya / musubi
  `lora_unet_<module with _>`, and LightX2V's `blocks.N.diff_m` (modulation).

`check.py` and `loaders.py` say, key by key, what each loader does with any of these files.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import torch

from sftools.errors import SftoolsError
from sftools.io.lazy import Checkpoint, LazyTensor
from sftools.io.dtypes import torch_dtype
from sftools.io.output import check_output_file, write_file
from sftools.io.sources import open_checkpoint
from sftools.lora.check import check_keys
from sftools.lora.keys import FORMS, comfyui_key, diffusers_key, lora_param, parse_key, target_param
from sftools.lora.loaders import LOADERS, Spelling
from sftools.wan.keys import ORIGINAL_KEY, diffusers_name_to_original, original_to_diffusers


@dataclass
class Lora:
    """Deltas on original-named parameters; `up @ down` (flattened) has the shape of the parameter."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32  # what the file it was read from stored (most tensors)
    files: tuple[str, ...] = ()  # where it was read from

    def delta(self, param: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The full fp32 delta this LoRA adds to `param`, or None."""
        out = None
        if param in self.factors:
            up, down = self.factors[param]
            out = (up.float().flatten(1) @ down.float().flatten(1)).reshape(shape)
        if param in self.diffs:
            d = self.diffs[param].float().reshape(shape)
            out = d if out is None else out + d
        return out

    @property
    def params(self) -> list[str]:
        return list(dict.fromkeys([*self.factors, *self.diffs]))

    @property
    def ranks(self) -> list[int]:
        return [down.shape[0] for _, down in self.factors.values()]


def read_lora_file(path: str) -> Lora:
    return read_lora(open_checkpoint(path))


def read_lora(ckpt: Checkpoint) -> Lora:
    """Any supported LoRA form into the in-memory form (alpha baked into the factors)."""
    keys = {}
    for name in ckpt.tensors:
        key = parse_key(name)
        if key is None:
            raise SftoolsError(f"{ckpt.path}: key {name} is not a LoRA key (no lora_up/lora_down/diff/alpha suffix)")
        keys[name] = key
    spellings = {k.spelling for k in keys.values()}
    if len(spellings) > 1:
        raise SftoolsError(f"{ckpt.path}: mixes diffusers (transformer.) keys with original ones")
    lora = _read_diffusers(ckpt, keys) if spellings == {"diffusers"} else _read_original(ckpt, keys)
    if not lora.params:
        raise SftoolsError(f"{ckpt.path}: holds no LoRA factors or diffs")
    dtypes = Counter(t.dtype for t in ckpt.tensors.values())
    lora.dtype = dtypes.most_common(1)[0][0] if dtypes else torch.float32
    lora.files = ckpt.files
    return lora


def _grouped(ckpt: Checkpoint, keys) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, key in keys.items():
        parts.setdefault(key.module, {})[key.part] = ckpt.tensors[name].load()
    return parts


def _read_original(ckpt: Checkpoint, keys) -> Lora:
    lora = Lora(metadata=dict(ckpt.metadata))
    for module, p in _grouped(ckpt, keys).items():
        if "up" in p or "down" in p:
            if "up" not in p or "down" not in p:
                raise SftoolsError(f"{ckpt.path}: LoRA module {module} has only one of its two factors")
            up, down = _factors(ckpt.path, module, p["up"], p["down"])
            if "alpha" in p:
                alpha = p["alpha"].float()
                if alpha.numel() != 1 or not torch.isfinite(alpha).all():
                    raise SftoolsError(f"{ckpt.path}: LoRA module {module} has an alpha that is not one finite number")
                up = up * (float(alpha) / down.shape[0])
            lora.factors[_check(ckpt.path, target_param(module, "up"))] = (up, down)
        elif "alpha" in p:
            raise SftoolsError(f"{ckpt.path}: LoRA module {module} has an alpha but no factors")
        for part in ("diff", "diff_b", "diff_m"):
            if part in p:
                lora.diffs[_check(ckpt.path, target_param(module, part))] = p[part].float()
    return lora


def _read_diffusers(ckpt: Checkpoint, keys) -> Lora:
    config = _adapter_config(ckpt.path, ckpt.metadata)
    lora = Lora(metadata=dict(ckpt.metadata))
    for module, p in _grouped(ckpt, keys).items():
        if set(p) - {"up", "down", "diff_b"}:
            raise SftoolsError(f"{ckpt.path}: LoRA module {module} has keys a diffusers LoRA cannot have")
        original = diffusers_name_to_original(module + ".weight")
        if original is None:
            raise SftoolsError(f"{ckpt.path}: LoRA module {module} has no original Wan name")
        scale = 1.0  # without an adapter config diffusers takes alpha = rank
        if "r" in config:
            r = config.get("rank_pattern", {}).get(module, config["r"])
            scale = config.get("alpha_pattern", {}).get(module, config.get("lora_alpha", r)) / r
        if "up" in p and "down" in p:
            up, down = _factors(ckpt.path, module, p["up"], p["down"])
            lora.factors[original] = (up * scale, down)
        if "diff_b" in p:  # peft scales lora_B's output, bias included
            lora.diffs[original.removesuffix(".weight") + ".bias"] = p["diff_b"].float() * scale
    return lora


def _factors(path: str, module: str, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check that up [out, r, ...] and down [r, in, ...] multiply; return them in fp32."""
    if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise SftoolsError(f"{path}: LoRA module {module} has factors {list(up.shape)} and {list(down.shape)}, "
                           "which do not multiply")
    return up.float(), down.float()


def _check(path: str, param: str) -> str:
    if not ORIGINAL_KEY.match(param):
        raise SftoolsError(f"{path}: LoRA targets {param}, which is not a Wan 2.1 parameter")
    return param


def _adapter_config(path: str, metadata: dict[str, str]) -> dict:
    """diffusers' `lora_adapter_metadata` (keys `transformer.r`, ...), checked before it is used."""
    try:
        packed = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        packed = None
    config = {k.removeprefix("transformer."): v for k, v in packed.items()} if isinstance(packed, dict) else None
    patterns = [config.get(p, {}) for p in ("rank_pattern", "alpha_pattern")] if config is not None else [None]
    if not all(isinstance(p, dict) for p in patterns):
        raise SftoolsError(f"{path}: lora_adapter_metadata is not a LoRA config")
    numbers = [config.get("r", 1), config.get("lora_alpha", 1), *(v for p in patterns for v in p.values())]
    if not all(isinstance(n, (int, float)) and 0 < n < float("inf") for n in numbers):
        raise SftoolsError(f"{path}: lora_adapter_metadata has a rank or alpha that is not a positive number")
    return config


def lora_tensors(lora: Lora, form: str, modulation: str = "diff") -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The file's tensors, extra metadata, and the parameters this form cannot carry; `modulation`
    (`diff` or `diff_m`) is how the comfyui form spells a change of a `modulation` parameter."""
    if form == "comfyui":
        return _comfyui_tensors(lora, modulation), {}, []
    if form == "diffusers":
        return _diffusers_tensors(lora)
    raise SftoolsError(f"LoRA form {form!r} is not one of {', '.join(FORMS)}")


def _comfyui_tensors(lora: Lora, modulation: str) -> dict[str, torch.Tensor]:
    out = {}
    for param, (up, down) in lora.factors.items():
        out[comfyui_key(param, "up")] = up
        out[comfyui_key(param, "down")] = down
    for param, diff in lora.diffs.items():
        out[comfyui_key(param, modulation if param.endswith("modulation") else "diff")] = diff
    return out


def _diffusers_tensors(lora: Lora) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    names = original_to_diffusers(lora.params)
    out, ranks, dropped = {}, {}, []
    for param, (up, down) in lora.factors.items():
        module = names[param].removesuffix(".weight")
        out[diffusers_key(module, "down")] = down
        out[diffusers_key(module, "up")] = up
        ranks[module] = down.shape[0]
    for param, diff in lora.diffs.items():
        weight = param.removesuffix(".bias") + ".weight" if param.endswith(".bias") else None
        if weight in lora.factors:
            out[diffusers_key(names[weight].removesuffix(".weight"), "diff_b")] = diff
        else:
            dropped.append(param)
    if not ranks:
        raise SftoolsError("the diffusers form needs at least one low-rank module; this LoRA has only dense diffs")
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {
        "r": r, "lora_alpha": r, "target_modules": sorted(ranks),
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: k for m, k in ranks.items() if k != r},
        "lora_bias": any(k.endswith("lora_B.bias") for k in out), "use_dora": False, "use_rslora": False,
    }
    # Pipeline-level adapter metadata is keyed by component, as diffusers' `_pack_dict_with_prefix` writes it.
    packed = {f"transformer.{k}": v for k, v in config.items()}
    return out, {"lora_adapter_metadata": json.dumps(packed, sort_keys=True)}, dropped


def respell(lora: Lora, spelling: Spelling) -> tuple[Lora, list[str]]:
    """`lora` as a loader's spelling writes it, and the parameters it leaves out (modulation, where the
    loader has no place for it). A parameter with both factors and a diff, or with factors of a rank
    the loader does not multiply, becomes one dense change; a dense change of a 2-D weight becomes
    an exact full-rank pair where the loader reads only pairs."""
    out = Lora(metadata=lora.metadata, dtype=lora.dtype, files=lora.files)
    left_out = []
    for param in lora.params:
        factors, diff = lora.factors.get(param), lora.diffs.get(param)
        if param.endswith("modulation") and spelling.modulation is None:
            left_out.append(param)
        elif diff is None and factors[1].dim() in spelling.factor_ndims:
            out.factors[param] = factors
        else:
            shape = tuple(diff.shape) if diff is not None else (factors[0].shape[0], *factors[1].shape[1:])
            dense = lora.delta(param, shape)
            if dense.dim() == 2 and param.endswith(".weight") and spelling.dense_2d == "factors":
                out.factors[param] = full_rank_pair(dense)
            else:
                out.diffs[param] = dense
    return out, left_out


def full_rank_pair(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down == dense exactly: an identity on the smaller side (rank min(m, n))."""
    m, n = dense.shape
    return (torch.eye(m), dense) if m <= n else (dense, torch.eye(n))


def loader_tensors(lora: Lora, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The tensors and metadata of `lora` in loader `name`'s spelling, holding only keys that loader
    applies, and the parameters left out (sorted)."""
    loader = LOADERS[name]
    spelled, left_out = respell(lora, loader.spelling)
    while True:
        tensors, extra, dropped = lora_tensors(spelled, loader.spelling.form, loader.spelling.modulation or "diff")
        verdict = check_keys({k: tuple(v.shape) for k, v in tensors.items()}, loader)
        unapplied = {lora_param(parse_key(k)) for k, (effect, _) in verdict.effects.items() if effect != "apply"} - {None}
        if not unapplied:
            break
        for param in unapplied:
            spelled.factors.pop(param, None)
            spelled.diffs.pop(param, None)
        left_out += unapplied
        if not spelled.params:
            raise SftoolsError(f"{loader.title} can apply none of this LoRA's changes")
    return tensors, extra, sorted(set(left_out + dropped))


def write_lora(path: str, lora: Lora, form: str, dtype: torch.dtype, metadata: dict[str, str],
               loader: str | None = None) -> list[str]:
    """Write atomically in `form`, or in `loader`'s spelling with only what it applies; returns the
    parameters left out."""
    tensors, extra, dropped = loader_tensors(lora, loader) if loader else lora_tensors(lora, form)
    lazy = {k: LazyTensor.of(v).map(lambda t: t.to(dtype).contiguous(), dtype) for k, v in tensors.items()}
    write_file(path, lazy, {"format": "pt", **metadata, **extra}, desc="writing LoRA")
    return dropped


def convert_lora(src: str, out: str, form: str | None, dtype: str = "keep", loader: str | None = None) -> list[str]:
    """Re-write any readable LoRA in `form`, or for `loader`; returns the parameters left out."""
    check_output_file(out, [src])
    lora = read_lora_file(src)
    check_output_file(out, lora.files)
    return write_lora(out, lora, form, torch_dtype(dtype) or lora.dtype, {"sftools.converted_from": src}, loader)
