"""LoRA files in the forms Wan loaders read, and one in-memory form they all map to.

In memory a LoRA is deltas on original-named parameters with the scale baked in: low-rank factors
(`up @ down`, alpha = rank, so every loader applies scale 1) and dense diffs.

On disk:
- comfyui (written, default): `diffusion_model.<original module>.lora_up.weight` / `.lora_down.weight`,
  dense `.diff` (weights and parameters such as `modulation`) and `.diff_b` (biases). ComfyUI,
  Kijai's wrapper, LightX2V and diffusers' Wan converter read it.
- diffusers (written): peft names `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`,
  bias deltas as `.lora_B.bias`, the `LoraConfig` as JSON in the `lora_adapter_metadata` metadata.
  peft has no dense diffs, so those are left out and listed.
- read as well: `lora_A` / `lora_B` spellings with `diffusion_model.`, `.alpha` keys, kohya / musubi
  `lora_unet_<module with _>`, and LightX2V's `blocks.N.diff_m` (modulation).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from sftools.errors import SftoolsError
from sftools.io.lazy import Checkpoint
from sftools.io.output import write_file
from sftools.io.safetensors_io import PlannedTensor
from sftools.wan.layouts import ORIGINAL_KEY, diffusers_name_to_original, original_to_diffusers

FORMS = ("comfyui", "diffusers")
_SUFFIXES = (
    (".lora_up.weight", "up"), (".lora_down.weight", "down"), (".lora_B.weight", "up"), (".lora_A.weight", "down"),
    (".lora_B.bias", "diff_b"), (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"),
)
# Underscored names kohya / musubi write, restored before the dots of the rest come back.
_KOHYA_WORDS = ("vace_patch_embedding", "patch_embedding", "text_embedding", "time_embedding", "time_projection",
                "self_attn", "cross_attn", "norm_k_img", "k_img", "v_img", "norm_q", "norm_k", "img_emb",
                "emb_pos", "vace_blocks", "before_proj", "after_proj")


@dataclass
class Lora:
    """Deltas on original-named parameters; `up @ down` (flattened) has the shape of the parameter."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32  # what the file it was read from stored (most tensors)

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


def _param_for_diff(module: str) -> str:
    """`.diff` of `blocks.0.norm3` patches its `.weight`; of `blocks.0.modulation`, the parameter itself."""
    return module + ".weight" if ORIGINAL_KEY.match(module + ".weight") else module


def kohya_module(name: str) -> str:
    """`blocks_0_self_attn_q` -> `blocks.0.self_attn.q`."""
    dotted = name.replace("_", ".")
    for word in _KOHYA_WORDS:
        dotted = dotted.replace(word.replace("_", "."), word)
    return dotted


def read_lora(ckpt: Checkpoint) -> Lora:
    """Any supported LoRA form into the in-memory form (alpha baked into the factors)."""
    names = list(ckpt.tensors)
    if any(n.startswith("transformer.") for n in names) and not any(n.startswith("diffusion_model.") for n in names):
        lora = _read_diffusers(ckpt)
    else:
        lora = _read_original(ckpt)
    if not lora.params:
        raise SftoolsError(f"{ckpt.path}: holds no LoRA factors or diffs")
    dtypes = Counter(t.dtype for t in ckpt.tensors.values())
    lora.dtype = dtypes.most_common(1)[0][0] if dtypes else torch.float32
    return lora


def _read_original(ckpt: Checkpoint) -> Lora:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, lazy in ckpt.tensors.items():
        module, kind = _split(ckpt.path, name)
        parts.setdefault(module, {})[kind] = lazy.load()
    lora = Lora(metadata=dict(ckpt.metadata))
    for module, p in parts.items():
        if "up" in p or "down" in p:
            if "up" not in p or "down" not in p:
                raise SftoolsError(f"{ckpt.path}: LoRA module {module} has only one of its two factors")
            up, down = _factors(ckpt.path, module, p["up"], p["down"])
            if "alpha" in p:
                alpha = p["alpha"].float()
                if alpha.numel() != 1 or not torch.isfinite(alpha).all():
                    raise SftoolsError(f"{ckpt.path}: LoRA module {module} has an alpha that is not one finite number")
                up = up * (float(alpha) / down.shape[0])
            lora.factors[_check(ckpt.path, module + ".weight")] = (up, down)
        elif "alpha" in p:
            raise SftoolsError(f"{ckpt.path}: LoRA module {module} has an alpha but no factors")
        if "diff" in p:
            lora.diffs[_check(ckpt.path, _param_for_diff(module))] = p["diff"].float()
        if "diff_b" in p:
            lora.diffs[_check(ckpt.path, module + ".bias")] = p["diff_b"].float()
        if "diff_m" in p:
            lora.diffs[_check(ckpt.path, module + ".modulation")] = p["diff_m"].float()
    return lora


def _factors(path: str, module: str, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check that up [out, r, ...] and down [r, in, ...] multiply; return them in fp32."""
    if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise SftoolsError(f"{path}: LoRA module {module} has factors {list(up.shape)} and {list(down.shape)}, "
                           "which do not multiply")
    return up.float(), down.float()


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


def _split(path: str, name: str) -> tuple[str, str]:
    for suffix, kind in _SUFFIXES:
        if name.endswith(suffix):
            module = name[: -len(suffix)]
            break
    else:
        raise SftoolsError(f"{path}: key {name} is not a LoRA key (no lora_up/lora_down/diff/alpha suffix)")
    if module.startswith("lora_unet_"):
        return kohya_module(module[len("lora_unet_"):]), kind
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if module.startswith(prefix):
            return module[len(prefix):], kind
    return module, kind


def _check(path: str, param: str) -> str:
    if not ORIGINAL_KEY.match(param):
        raise SftoolsError(f"{path}: LoRA targets {param}, which is not a Wan 2.1 parameter")
    return param


def _read_diffusers(ckpt: Checkpoint) -> Lora:
    config = _adapter_config(ckpt.path, ckpt.metadata)
    lora = Lora(metadata=dict(ckpt.metadata))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, lazy in ckpt.tensors.items():
        m = re.match(r"^transformer\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)$", name)
        if not m:
            raise SftoolsError(f"{ckpt.path}: key {name} is not a diffusers LoRA key")
        parts.setdefault(m.group(1), {})[m.group(2)] = lazy.load()
    for module, p in parts.items():
        original = diffusers_name_to_original(module + ".weight")
        if original is None:
            raise SftoolsError(f"{ckpt.path}: LoRA module {module} has no original Wan name")
        scale = 1.0  # without an adapter config diffusers takes alpha = rank
        if "r" in config:
            r = config.get("rank_pattern", {}).get(module, config["r"])
            scale = config.get("alpha_pattern", {}).get(module, config.get("lora_alpha", r)) / r
        if "lora_A.weight" in p and "lora_B.weight" in p:
            up, down = _factors(ckpt.path, module, p["lora_B.weight"], p["lora_A.weight"])
            lora.factors[original] = (up * scale, down)
        if "lora_B.bias" in p:  # peft scales lora_B's output, bias included
            lora.diffs[original[: -len(".weight")] + ".bias"] = p["lora_B.bias"].float() * scale
    return lora


def lora_tensors(lora: Lora, form: str) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The file's tensors, extra metadata, and the parameters this form cannot carry."""
    if form == "comfyui":
        return _comfyui_tensors(lora), {}, []
    if form == "diffusers":
        return _diffusers_tensors(lora)
    raise SftoolsError(f"LoRA form {form!r} is not one of {', '.join(FORMS)}")


def _comfyui_tensors(lora: Lora) -> dict[str, torch.Tensor]:
    out = {}
    for param, (up, down) in lora.factors.items():
        module = param[: -len(".weight")]
        out[f"diffusion_model.{module}.lora_up.weight"] = up
        out[f"diffusion_model.{module}.lora_down.weight"] = down
    for param, diff in lora.diffs.items():
        if param.endswith(".weight"):
            out[f"diffusion_model.{param[: -len('.weight')]}.diff"] = diff
        elif param.endswith(".bias"):
            out[f"diffusion_model.{param[: -len('.bias')]}.diff_b"] = diff
        else:
            out[f"diffusion_model.{param}.diff"] = diff
    return out


def _diffusers_tensors(lora: Lora) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    names = original_to_diffusers(lora.params)
    out, ranks, dropped = {}, {}, []
    for param, (up, down) in lora.factors.items():
        module = names[param][: -len(".weight")]
        out[f"transformer.{module}.lora_A.weight"] = down
        out[f"transformer.{module}.lora_B.weight"] = up
        ranks[module] = down.shape[0]
    for param, diff in lora.diffs.items():
        weight = param[: -len(".bias")] + ".weight" if param.endswith(".bias") else None
        if weight in lora.factors:
            out[f"transformer.{names[weight][: -len('.weight')]}.lora_B.bias"] = diff
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


def diffusers_problems(lora: Lora) -> list[str]:
    """Why diffusers' Wan LoRA converter (`_convert_non_diffusers_wan_lora_to_diffusers`) would refuse
    this LoRA in the comfyui form; empty when it loads."""
    params = lora.params
    problems = []
    if not any(p.startswith("blocks.") for p in params):
        problems.append("it has no blocks.N keys, which the converter requires")
    if any(p.startswith("vace_blocks.") for p in params):
        problems.append("it targets vace_blocks, which the converter has no mapping for")
    for p in params:
        if p.endswith(".bias") and p[: -len(".bias")] + ".weight" not in lora.factors \
                and re.match(r"^(text_embedding|time_embedding)\.", p):
            problems.append(f"{p} changes without factors for its weight, which the converter requires")
    return problems


def write_lora(path: str, lora: Lora, form: str, dtype: torch.dtype, metadata: dict[str, str]) -> list[str]:
    """Write atomically in `form`; returns the parameters the form could not carry."""
    tensors, extra, dropped = lora_tensors(lora, form)
    planned = [PlannedTensor(k, dtype, tuple(v.shape), lambda v=v: v.to(dtype).contiguous()) for k, v in tensors.items()]
    write_file(path, planned, {"format": "pt", **metadata, **extra}, desc="writing LoRA")
    return dropped
