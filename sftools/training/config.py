"""A training recipe: nested, frozen settings read from YAML, with `--set key.path=value` overrides.

Every key is known and typed: an unknown key, a value of the wrong type or out of range, or a model
file that does not exist is one line naming the key (or the file), before any work. Defaults follow
Self Forcing's `configs/self_forcing_dmd.yaml` where they apply to adapters too (betas (0, 0.999),
weight decay 0.01, gradient clip 10, critic steps per generator step 5, EMA 0.99, guidance 3.0 in
its cond + g (cond - uncond) form); learning rates are LoRA ones, far above its full-model 2e-6.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from sftools.errors import SettingsError, SftoolsError

TINY_MODEL = "tiny"  # the built-in tiny model (written into the run folder), for CPU recipes and tests
SYNTHETIC_TEACHER = "synthetic"  # the exact denoiser of a known Gaussian video law (training/synthetic.py)
STAGES = ("self_forcing", "ode_init", "teacher_forcing")


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    base: str = TINY_MODEL  # any model form sftools reads, or "tiny"
    teacher: str | None = None  # a separate frozen teacher (Self Forcing's 14B for a 1.3B student); None: the base;
    # "synthetic": the exact denoiser of a known Gaussian video law, for experiments with a known answer
    init_lora: str | None = None  # the generator starts from this LoRA (any form sftools reads)
    train: str = "lora"  # lora: generator and critic are adapters on one frozen base; full: whole copies (small models)
    rank: int = 16  # of the adapters (train: lora)
    # A VACE add-on module grafted onto the base (any form `sftools vace graft` takes; "tiny" with the tiny
    # base). With it, or with a base that is a VACE model, the run retrains the add-on: the generator is
    # the add-on under causal attention, the teacher the same add-on bidirectional, the result
    # final/vace_module.safetensors.
    vace: str | None = None

    def check(self) -> None:
        if self.rank < 1:
            raise SettingsError(f"model.rank must be at least 1, got {self.rank}")
        if self.train not in ("lora", "full"):
            raise SettingsError(f"model.train must be lora or full, got {self.train!r}")
        for key in ("base", "teacher", "init_lora", "vace"):
            path = getattr(self, key)
            if path and path not in (TINY_MODEL, SYNTHETIC_TEACHER) and not os.path.exists(path):
                raise SftoolsError(f"{path}: no such file or folder (model.{key})")
        if self.vace == TINY_MODEL and self.base != TINY_MODEL:
            raise SettingsError("model.vace: tiny is the built-in add-on of the tiny base (model.base: tiny)")
        if self.vace and self.teacher:
            raise SettingsError("model.teacher with model.vace: the teacher of an add-on is the add-on itself, "
                                "with bidirectional attention")


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    prompts: str | None = None  # a text file, one prompt a line; None: a few built-in prompts (tiny runs)
    text_encoder: str | None = None  # local Wan diffusers folder; None with the tiny model: the tiny encoder
    negative_prompt: str = ""
    # VACE runs: a folder of controls, taken in turn with the prompts: precomputed contexts (.safetensors
    # holding vace_context [96, latent frames, h, w], as `sftools sample --control` takes them) and
    # control clips (.mp4, with an optional NAME.mask.mp4 beside; encoded once with data.vae into cache/).
    # None with the tiny add-on: a few built-in random contexts.
    controls: str | None = None
    vae: str | None = None  # local Wan VAE or diffusers folder, to encode .mp4 controls

    def check(self) -> None:
        for key in ("prompts", "text_encoder", "controls", "vae"):
            path = getattr(self, key)
            if path and not os.path.exists(path):
                raise SftoolsError(f"{path}: no such file or folder (data.{key})")


@dataclass(frozen=True, kw_only=True)
class VideoSettings:
    frames: int = 81  # video frames, 4k + 1
    height: int = 480
    width: int = 832
    frames_per_block: int = 3
    steps: int = 4
    shift: float = 5.0

    def check(self) -> None:
        if self.frames < 1 or (self.frames - 1) % 4:
            raise SettingsError(f"video.frames must be of the form 4k+1, got {self.frames}")
        if self.height % 16 or self.width % 16 or self.height < 16 or self.width < 16:
            raise SettingsError(f"video.height and video.width must be multiples of 16, got {self.height}x{self.width}")
        if self.frames_per_block < 1 or self.steps < 1 or self.shift <= 0:
            raise SettingsError("video.frames_per_block and video.steps must be >= 1, video.shift > 0")

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // 4 + 1


@dataclass(frozen=True, kw_only=True)
class OptimSettings:
    lr: float = 1e-4
    lr_critic: float = 2e-5
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    critic_ratio: int = 5  # critic updates per generator update
    guidance: float = 3.0  # real score: cond + guidance * (cond - uncond)

    def check(self) -> None:
        if self.lr <= 0 or self.lr_critic <= 0 or self.grad_clip <= 0 or self.critic_ratio < 1:
            raise SettingsError("optim.lr, optim.lr_critic and optim.grad_clip must be > 0, optim.critic_ratio >= 1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SettingsError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    steps: int = 600  # iterations (one critic update each; a generator update every critic_ratio)
    seed: int = 0
    ema_decay: float = 0.99
    ema_start: int = 200
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    mixed_precision: str = "no"  # no | bf16 (accelerate)
    gradient_checkpointing: bool = False
    grad_accum: int = 1  # rollouts (prompts, noise) averaged into each update, per process

    def check(self) -> None:
        if min(self.steps, self.checkpoint_every, self.keep_checkpoints, self.log_every, self.grad_accum) < 1:
            raise SettingsError("run.steps, run.checkpoint_every, run.keep_checkpoints, run.log_every and "
                                "run.grad_accum must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise SettingsError(f"run.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in ("no", "bf16"):
            raise SettingsError(f"run.mixed_precision must be no or bf16, got {self.mixed_precision!r}")


@dataclass(frozen=True, kw_only=True)
class OdeSettings:
    """Teacher trajectories for the ode_init and teacher_forcing stages (Self Forcing's
    `scripts/generate_ode_pairs.py`): Euler runs of the bidirectional teacher with guidance
    `optim.guidance`, kept at the student's few-step noise levels and at the clean end."""
    pairs: int = 64  # trajectories, one prompt each (prompts taken in turn), cached in OUTPUT/cache
    teacher_steps: int = 48  # Euler steps of the teacher, spread over the student's intervals

    def check(self) -> None:
        if self.pairs < 1 or self.teacher_steps < 1:
            raise SettingsError("ode.pairs and ode.teacher_steps must be >= 1")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    # self_forcing: DMD on the generator's own rollouts (the method); ode_init: regression of the
    # causal student onto teacher trajectories (where Self Forcing starts); teacher_forcing: DMD on
    # rollouts whose earlier blocks are the teacher's video instead of the generator's (the baseline).
    stage: str = "self_forcing"
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    video: VideoSettings = field(default_factory=VideoSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)
    ode: OdeSettings = field(default_factory=OdeSettings)

    def check(self) -> None:
        if self.stage not in STAGES:
            raise SettingsError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for part in (self.model, self.data, self.video, self.optim, self.run, self.ode):
            part.check()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        """A checked recipe from nested plain values (what the YAML file holds)."""
        recipe = _build(cls, data, "")
        recipe.check()
        return recipe


def _typed(key: str, value, kind):
    """`value` as `kind` (int, float, str, bool, their optionals, a tuple of floats), or a SettingsError."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        return None if value is None else _typed(key, value, options[0])
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{key} must be a list, got {value!r}")
        return tuple(_typed(key, v, typing.get_args(kind)[0]) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, bool):  # YAML 1.1 reads no / yes (run.mixed_precision: no) as booleans
        return "yes" if value else "no"
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text; people write it
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SettingsError(f"{key} must be {kind.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise SettingsError(f"{prefix or 'the recipe'} must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"unknown recipe key {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")
    values = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            values[name] = _typed(prefix + name, value, kind)
    return cls(**values)


def set_override(raw: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value read as YAML: 3, 1e-4, true, [0, 0.99], text) to the raw recipe."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise SettingsError(f"--set {assignment!r} is not KEY=VALUE")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SettingsError(f"--set {key}: {part} is not a section")
    node[leaf] = yaml.safe_load(text) if text else None


def load_recipe(path: str, overrides: list[str] = ()) -> Recipe:
    """The recipe at `path` with `--set` overrides, checked whole before anything runs."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as exc:
        raise SftoolsError(f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SftoolsError(f"{path}: not YAML ({str(exc).splitlines()[0]})") from None
    for assignment in overrides:
        set_override(raw, assignment)
    return Recipe.from_dict(raw)
