"""The settings of LoRA extraction and resizing, as small frozen objects that check themselves.

Built by keyword (`RankRule(rank=16, mode="energy")`), nested the way peft nests its configs, and
validated once, here: a value out of range raises `SettingsError`, which the command line reports
as a usage error (exit 2) naming the option. No torch, so the CLI imports the choices at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sftools.devices import check_device_name
from sftools.errors import SettingsError
from sftools.io.dtypes import DTYPE_CHOICES
from sftools.lora.keys import FORMS
from sftools.lora.loaders import LOADER_NAMES, LOADERS

RANK_MODES = ("fixed", "energy")
SVD_METHODS = ("randomized", "exact")


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingsError(f"{option} {value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True, kw_only=True)
class RankRule:
    """How many singular values to keep (`svd.choose_rank` applies it).

    - fixed: k = min(rank, rows, cols).
    - energy: the smallest k >= 1 with sum_{i<=k} s_i^2 >= energy * ||D||_F^2, capped by `rank`
      (None: no cap). The threshold is the energy fraction itself (kohya's `sv_fro` squares its
      parameter) and no extra 1 is added (kohya's resize adds one).
    """

    rank: int | None = 32
    mode: str = "fixed"
    energy: float = 0.99

    def __post_init__(self) -> None:
        _choice("--rank-mode", self.mode, RANK_MODES)
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise SettingsError(f"--rank must be an integer of at least 1, got {self.rank}")
        if self.mode == "fixed" and self.rank is None:
            raise SettingsError("a fixed rank needs --rank")
        if not 0 < self.energy <= 1:
            raise SettingsError(f"--energy must be in (0, 1], got {self.energy}")


@dataclass(frozen=True, kw_only=True)
class SvdSettings:
    """Randomized SVD (`torch.svd_lowrank`, q = rank + oversample, `niter` power iterations, seeded
    per tensor name) or exact (`torch.linalg.svd`, for validation)."""

    method: str = "randomized"
    oversample: int = 16
    niter: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("--svd", self.method, SVD_METHODS)
        if self.oversample < 0 or self.niter < 0:
            raise SettingsError(f"--oversample and --niter must be >= 0, got {self.oversample} and {self.niter}")


@dataclass(frozen=True, kw_only=True)
class Selection:
    """Which parameters are extracted: regexes on original names, dense diffs or not, and the
    largest |difference| that still counts as unchanged."""

    include: str | None = None
    exclude: str | None = None
    full_diffs: bool = True
    min_diff: float = 0.0

    def __post_init__(self) -> None:
        for option, pattern in (("--include", self.include), ("--exclude", self.exclude)):
            if pattern:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise SettingsError(f"{option} {pattern!r} is not a regular expression: {exc}") from None
        if not self.min_diff >= 0:
            raise SettingsError(f"--min-diff must be >= 0, got {self.min_diff}")

    def selects(self, name: str, factored: bool) -> bool:
        if self.include and not re.search(self.include, name):
            return False
        if self.exclude and re.search(self.exclude, name):
            return False
        return factored or self.full_diffs


@dataclass(frozen=True, kw_only=True)
class ExtractSettings:
    rank: RankRule = field(default_factory=RankRule)
    svd: SvdSettings = field(default_factory=SvdSettings)
    selection: Selection = field(default_factory=Selection)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "bf16"  # of the written factors; keep = the tuned model's dtype

    def __post_init__(self) -> None:
        check_device_name(self.device)
        _choice("--dtype", self.dtype, DTYPE_CHOICES)
        if self.rank.rank is None:
            raise SettingsError("extraction needs --rank (the rank, or the cap in energy mode)")


@dataclass(frozen=True, kw_only=True)
class WriteAs:
    """What a LoRA is written as: a form (`--format`), or a loader's spelling holding only what that
    loader applies (`--for`, which then decides the form)."""

    form: str = "comfyui"
    loader: str | None = None

    def __post_init__(self) -> None:
        _choice("--format", self.form, FORMS)
        if self.loader is not None:
            _choice("--for", self.loader, LOADER_NAMES)

    @property
    def file_form(self) -> str:
        """The layout of the file written: the loader's, with --for."""
        return LOADERS[self.loader].spelling.form if self.loader else self.form
