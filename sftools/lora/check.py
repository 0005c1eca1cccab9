"""Which keys of a LoRA file each loader applies, ignores or refuses, from the key names and shapes alone.

The engine for the tables in `loaders.py`: a key is renamed as the loader renames it, then the first
matching rule decides it (no rule: applied); an `.alpha` counts as applied exactly when both factors
of its module are. A key that a rename sends to another Wan parameter, or that a later key's rename
overwrites, is ignored: the loader does not apply it to the parameter it names. The model checked
against is the one the file is for: Wan 2.1 I2V when a key targets `img_emb`, `k_img` or `v_img`,
else T2V.

No torch here: `lora check` reads only the file's header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from sftools.errors import SftoolsError
from sftools.io.sources import open_checkpoint
from sftools.lora.keys import LoraKey, lora_param, parse_key
from sftools.lora.loaders import LOADERS, Loader, Rule
from sftools.wan.keys import ORIGINAL_KEY

I2V_TARGET = re.compile(r"^img_emb\.|\.(?:k_img|v_img|norm_k_img)\.")


@dataclass(frozen=True)
class _Key:
    raw: str  # as written in the file
    name: str  # as the loader sees it, after its renames
    key: LoraKey
    ndim: int
    param: str | None  # the original parameter it changes
    module: str  # its module's original Wan name, for the rules' `module`
    group: str  # what the loader groups a module's parts by: the name without its suffix


@dataclass
class Verdict:
    """One loader's decision on every key of a file."""

    effects: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (apply|ignore|refuse, why)

    @property
    def refused(self) -> str | None:
        return next((f"{k}: {why}" for k, (effect, why) in self.effects.items() if effect == "refuse"), None)

    @property
    def applied(self) -> list[str]:
        return [] if self.refused else [k for k, (effect, _) in self.effects.items() if effect == "apply"]

    @property
    def ignored(self) -> dict[str, str]:
        return {} if self.refused else {k: why for k, (effect, why) in self.effects.items() if effect == "ignore"}

    @property
    def complete(self) -> bool:
        return all(effect == "apply" for effect, _ in self.effects.values())

    def to_dict(self) -> dict:
        return {"applied": len(self.applied), "ignored": sorted(self.ignored), "refused": self.refused}


def _renamed(name: str, loader: Loader) -> str:
    for rename in loader.renames:
        name = re.sub(rename.pattern, rename.replacement, name)
    return name


def _facts(raw: str, name: str, ndim: int) -> _Key | None:
    key = parse_key(name)
    if key is None:
        return None
    param = lora_param(key)
    module = re.sub(r"\.(?:weight|bias)$", "", param) if param else key.module
    return _Key(raw, name, key, ndim, param, module, name[: -len(key.suffix)])


class _File:
    """The keys of one file as one loader sees them, with the file-wide facts its rules ask for."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], loader: Loader):
        self.loader = loader
        self.names = {raw: _renamed(raw, loader) for raw in sorted(shapes)}
        self.last = {new: raw for raw, new in self.names.items()}  # a later key of the same name replaces it
        self.keys = {raw: _facts(raw, new, len(shapes[raw])) for raw, new in self.names.items()}
        self.parts: dict[str, set[str]] = {}
        for raw, k in self.keys.items():
            if k is not None and self.last[k.name] == raw:
                self.parts.setdefault(k.group, set()).add(k.key.part)
        self._found: dict[str, bool] = {}

    def found(self, pattern: str) -> bool:
        if pattern not in self._found:
            self._found[pattern] = any(re.search(pattern, n) for n in self.last)
        return self._found[pattern]

    def matches(self, rule: Rule, k: _Key) -> bool:
        parts = self.parts[k.group]
        return ((rule.prefix is None or k.key.prefix in rule.prefix)
                and (rule.part is None or k.key.part in rule.part)
                and (rule.suffix is None or k.key.suffix in rule.suffix)
                and (rule.module is None or re.fullmatch(rule.module, k.module) is not None)
                and (rule.key is None or re.search(rule.key, k.name) is not None)
                and (rule.ndim is None or k.ndim in rule.ndim)
                and (rule.wan is None or rule.wan == _is_wan(k.param))
                and all(p in parts for p in rule.has)
                and (rule.lacks is None or rule.lacks not in parts)
                and all(self.found(p) for p in rule.file_has)
                and (rule.file_lacks is None or not self.found(rule.file_lacks)))

    def decide(self, raw: str) -> tuple[str, str]:
        k, name = self.keys[raw], self.names[raw]
        if self.last[name] != raw:
            return "ignore", f"renamed to {name}, as is {self.last[name]}, which comes later in the file and replaces it"
        if k is None:
            return "ignore", f"renamed to {name}, which is no LoRA key"
        meant = lora_param(parse_key(raw))
        if name != raw and _is_wan(k.param) and k.param != meant:
            return "ignore", f"renamed to {name}, so it changes {k.param} instead of {meant}"
        rule = next((r for r in self.loader.rules if self.matches(r, k)), None)
        return (rule.effect, f"{rule.why} [{rule.source}]") if rule else ("apply", "")


def _is_wan(param: str | None) -> bool:
    return param is not None and ORIGINAL_KEY.match(param) is not None


def check_keys(shapes: Mapping[str, tuple[int, ...]], loader: Loader) -> Verdict:
    """What `loader` does with each key of a file of these key names and tensor shapes."""
    f = _File(shapes, loader)
    effects = {raw: f.decide(raw) for raw in f.keys}
    applied_groups: dict[str, set[str]] = {}
    for raw, (effect, _) in effects.items():
        k = f.keys[raw]
        if effect == "apply" and k is not None and k.key.part in ("up", "down"):
            applied_groups.setdefault(k.group, set()).add(k.key.part)
    for raw, (effect, _) in effects.items():
        k = f.keys[raw]
        if k is not None and k.key.part == "alpha" and effect == "apply" and applied_groups.get(k.group) != {"up", "down"}:
            effects[raw] = ("ignore", "an alpha whose factors are not applied")
    return Verdict(effects)


def lora_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a LoRA file, from its header; refused unless every key is a LoRA key."""
    ckpt = open_checkpoint(path)
    for name in ckpt.tensors:
        if parse_key(name) is None:
            raise SftoolsError(f"{path}: key {name} is not a LoRA key (no lora_up/lora_down/lora_A/lora_B/alpha/diff "
                               "suffix); lora check reads LoRA files")
    if not ckpt.tensors:
        raise SftoolsError(f"{path}: holds no tensors; lora check reads LoRA files")
    return {n: tuple(t.shape) for n, t in ckpt.tensors.items()}


def model_kind(names: Iterable[str]) -> str:
    """The Wan 2.1 model a LoRA is for, told by its keys: I2V when any targets the image branch."""
    params = (lora_param(k) for k in map(parse_key, names) if k is not None)
    return "i2v" if any(p and I2V_TARGET.search(p) for p in params) else "t2v"


@dataclass
class FileCheck:
    kind: str  # t2v | i2v: the model the file was checked against
    verdicts: dict[str, Verdict]  # loader name -> what it does with the file


def check_file(path: str, names: Iterable[str]) -> FileCheck:
    """What each loader named does with the LoRA file at `path`."""
    shapes = lora_shapes(path)
    return FileCheck(model_kind(shapes), {name: check_keys(shapes, LOADERS[name]) for name in names})
