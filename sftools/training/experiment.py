"""Does training do what it is for? Self Forcing against teacher forcing, with a known teacher.

A known teacher: the synthetic teacher of `training/synthetic.py`, the exact denoiser of a Gaussian
video law whose every frame's law is known. The student starts from a base that knows the task, as
Wan knows video: the tiny built-in model, first trained in full as a bidirectional many-step
flow-matching model on exact draws of the law (a random base leaves DMD nothing to move). Then, as
a causal four-step student (the whole model, as Self Forcing trains it, or a LoRA on the base):

1. `ode_init` from the teacher's trajectories (where Self Forcing starts);
2. from that student, the same number of iterations of `self_forcing` and of `teacher_forcing` (the
   same DMD, the same data; only what fills the cache differs: the student's own blocks or the
   teacher's video);
3. each student samples videos of more blocks than it was trained on with `sftools sample`'s
   sampler, rolling its KV cache over a window of the trained length (as Self Forcing extrapolates:
   `local_attn_size`), so that every block past the first is made as the last trained block was,
   from the one before it, and what grows with the block index is the error the student feeds
   itself; every frame is scored by its Frechet distance to the law (`frame_distances`).

The same count of exact draws of the law gives the floor a perfect student would score with this
many videos. The bench (`bench/experiment_self_forcing.py`) runs several seeds and writes the docs;
a test runs seed 0 and checks the direction.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import torch

from sftools.models.causal_wan import CausalWanModel
from sftools.sampling.causal import CausalSampler, pad_context
from sftools.sampling.load import load_transformer
from sftools.sampling.noise import BatchNoise, keyed_generator
from sftools.sampling.settings import SampleSettings
from sftools.sampling.text import encode_prompts
from sftools.training.config import SYNTHETIC_TEACHER, Recipe
from sftools.training.dmd import critic_timestep, flow_loss, noised
from sftools.training.synthetic import GaussianVideoTeacher, synthetic_teacher
from sftools.training.trainer import TINY_PROMPTS, Trainer
from sftools.wan.config import TINY_128, WanConfig
from sftools.wan.keys import diffusers_name_to_original
from sftools.wan.tiny import random_state_dict, write_checkpoint
from sftools.wan.tiny_parts import write_tiny_text_encoder

STUDENTS = ("base", "ode_init", "teacher_forcing", "self_forcing")  # "base": untrained, causal four-step
# The tiny model with 64 context rows instead of Wan's 512: at this size the key/value projections of
# the padded rows take 3/4 of every step (at Wan's, under 1%), and the prompts have a few tokens.
MODEL: WanConfig = replace(TINY_128, text_len=64)


@dataclass(frozen=True, kw_only=True)
class ExperimentSettings:
    trained_blocks: int = 2  # blocks in a training video
    eval_blocks: int = 8  # blocks in an evaluation video
    frames_per_block: int = 3  # latent frames
    size: int = 32  # pixels; the latent is size / 8 square
    train: str = "full"  # the students: whole copies of the base, as Self Forcing trains them, or LoRAs on it
    rank: int = 16  # the LoRAs' (train: lora)
    lr_base: float = 1e-3  # the base's full-parameter pretraining
    lr_ode: float = 3e-4  # the generator's regression
    lr: float = 1e-4  # the generator under DMD (self and teacher forcing)
    lr_critic: float = 1e-3
    base_steps: int = 1000  # full-parameter flow-matching steps of the base on the law
    base_batch: int = 8
    ode_steps: int = 1000
    steps: int = 400  # iterations of self forcing and of teacher forcing each
    critic_ratio: int = 5
    pairs: int = 64  # teacher trajectories
    videos: int = 64  # evaluation videos per student
    seed: int = 0

    def frames(self, blocks: int) -> int:
        """Video frames (4k + 1) for `blocks` blocks of latent frames."""
        return 4 * (blocks * self.frames_per_block - 1) + 1

    @property
    def window(self) -> int:
        """The rolling KV window the students sample with, in latent frames: the trained length."""
        return self.trained_blocks * self.frames_per_block


# LoRA students learn at higher rates (bench/experiment_self_forcing.py --lora).
LORA = ExperimentSettings(train="lora", lr_ode=2e-3, lr=3e-4, lr_critic=2e-3)


@dataclass
class ExperimentResult:
    settings: ExperimentSettings
    distances: dict[str, list[float]]  # student (and "teacher samples") -> distance per evaluation block
    seconds: dict[str, float]  # training seconds per stage

    def within(self, student: str) -> float:
        """The student's mean distance over the blocks of the trained length."""
        d = self.distances[student][:self.settings.trained_blocks]
        return sum(d) / len(d)

    def beyond(self, student: str) -> float:
        """The student's mean distance over the blocks past the trained length."""
        d = self.distances[student][self.settings.trained_blocks:]
        return sum(d) / len(d)

    def drift(self, student: str) -> float:
        """How much worse the student's blocks beyond the training length are than those within it."""
        return self.beyond(student) / self.within(student)


def pretrain_base(settings: ExperimentSettings, folder: str) -> str:
    """The tiny model (with its tiny text encoder) trained in full on exact draws of the law with
    the flow-matching loss, bidirectionally, on training-length videos; written to `folder`."""
    s = settings
    write_checkpoint(folder, random_state_dict(MODEL, seed=s.seed), "diffusers", MODEL)
    write_tiny_text_encoder(folder, text_dim=MODEL.text_dim)
    transformer, config = load_transformer(folder)
    contexts = torch.cat([pad_context(encode_prompts(folder, p, None, torch.device("cpu"), torch.float32)[0],
                                      config.text_len) for p in TINY_PROMPTS])
    transformer.requires_grad_(True)
    teacher = synthetic_teacher(config.out_dim, s.size // 8, s.size // 8, config.text_dim)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=s.lr_base, weight_decay=0.0)
    g = keyed_generator(s.seed, "pretrain")
    for _ in range(s.base_steps):
        context = contexts[torch.randint(0, len(contexts), (s.base_batch,), generator=g)]
        x0 = teacher.sample(context, s.trained_blocks * s.frames_per_block, g)
        noise = torch.randn(x0.shape, generator=g)
        t = critic_timestep(s.base_batch, 5.0, g)
        flow = transformer(hidden_states=noised(x0, noise, t), timestep=t, encoder_hidden_states=context,
                           return_dict=False)[0]
        optimizer.zero_grad(set_to_none=True)
        flow_loss(flow, x0, noise).backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
    state = {diffusers_name_to_original(k): v.detach() for k, v in transformer.state_dict().items()}
    return write_checkpoint(folder, state, "diffusers", MODEL)


def recipe(settings: ExperimentSettings, stage: str, steps: int, base: str, init_lora: str | None = None,
           text_encoder: str | None = None) -> Recipe:
    s = settings
    return Recipe.from_dict({
        "stage": stage,
        "model": {"base": base, "teacher": SYNTHETIC_TEACHER, "rank": s.rank, "init_lora": init_lora, "train": s.train},
        "data": {"text_encoder": text_encoder or base},
        "video": {"frames": s.frames(s.trained_blocks), "height": s.size, "width": s.size,
                  "frames_per_block": s.frames_per_block, "steps": 4, "shift": 5.0},
        "optim": {"lr": s.lr_ode if stage == "ode_init" else s.lr, "lr_critic": s.lr_critic,
                  "critic_ratio": s.critic_ratio, "guidance": 0.0},
        "run": {"steps": steps, "seed": s.seed, "ema_start": steps + 1, "checkpoint_every": steps, "keep_checkpoints": 1,
                "log_every": steps},
        "ode": {"pairs": s.pairs, "teacher_steps": 48},
    })


def train_stage(settings: ExperimentSettings, stage: str, steps: int, workdir: str, base: str,
                init_lora: str | None = None, text_encoder: str | None = None) -> tuple[Trainer, str, float]:
    """(trainer, final LoRA or model path, seconds) of one stage, run in workdir/stage."""
    trainer = Trainer(recipe(settings, stage, steps, base, init_lora, text_encoder), os.path.join(workdir, stage))
    began = time.perf_counter()
    outputs = trainer.train()["outputs"]
    return trainer, outputs.get("comfyui") or outputs["model"], time.perf_counter() - began


def evaluation_contexts(embeds: list[torch.Tensor], videos: int, rows: int) -> torch.Tensor:
    """[videos, rows, text_dim]: the prompts in turn, padded to the model's rows as the sampler pads them."""
    return torch.cat([pad_context(embeds[i % len(embeds)][None], rows) for i in range(videos)])


@torch.no_grad()
def sample_students(base: str, lora: str | None, settings: ExperimentSettings, contexts: torch.Tensor) -> torch.Tensor:
    """[videos, C, T, h, w]: the student's videos of `eval_blocks` blocks, from the causal sampler
    with a rolling window of the trained length."""
    s = settings
    sample = SampleSettings(frames=s.frames(s.eval_blocks), height=s.size, width=s.size,
                            frames_per_block=s.frames_per_block, steps=4, shift=5.0, local_attn_frames=s.window)
    transformer, config = load_transformer(base, [(lora, 1.0)] if lora else [])
    seeds = [1_000_000 + s.seed * 10_000 + i for i in range(len(contexts))]  # never the training draws
    noise = BatchNoise(seeds, config.out_dim, s.size // 8, s.size // 8)
    return CausalSampler(CausalWanModel(transformer), config, sample).sample(contexts, noise)


def block_distances(teacher: GaussianVideoTeacher, videos: torch.Tensor, contexts: torch.Tensor,
                    frames_per_block: int) -> list[float]:
    per_frame = teacher.frame_distances(videos, contexts)
    return [float(block.mean()) for block in per_frame.split(frames_per_block)]


def run_experiment(settings: ExperimentSettings, workdir: str, on_stage=None) -> ExperimentResult:
    s = settings
    say = on_stage or (lambda text: None)
    say(f"base: {s.base_steps} full-parameter flow-matching steps on the law")
    began = time.perf_counter()
    base = pretrain_base(s, os.path.join(workdir, "base"))
    seconds = {"base": time.perf_counter() - began}
    say(f"ode_init: {s.ode_steps} iterations")
    init, init_out, seconds["ode_init"] = train_stage(s, "ode_init", s.ode_steps, workdir, base)
    # Each student as (model, LoRA): LoRAs on the base, or whole models continuing from the ODE init's.
    full = s.train == "full"
    students = {"base": (base, None), "ode_init": (init_out, None) if full else (base, init_out)}
    for stage in ("teacher_forcing", "self_forcing"):
        say(f"{stage}: {s.steps} iterations from the ode_init student")
        start, lora = students["ode_init"]
        _, out, seconds[stage] = train_stage(s, stage, s.steps, workdir, start, lora, text_encoder=base)
        students[stage] = (out, None) if full else (base, out)
    config = init.config
    teacher = synthetic_teacher(config.out_dim, s.size // 8, s.size // 8, config.text_dim)
    contexts = evaluation_contexts(init.embeds, s.videos, config.text_len)
    distances = {}
    for student in STUDENTS:
        say(f"sampling {s.videos} videos of {s.eval_blocks} blocks: {student}")
        videos = sample_students(*students[student], s, contexts)
        distances[student] = block_distances(teacher, videos, contexts, s.frames_per_block)
    exact = teacher.sample(contexts, s.eval_blocks * s.frames_per_block, keyed_generator(s.seed, "law"))
    distances["teacher samples"] = block_distances(teacher, exact, contexts, s.frames_per_block)
    return ExperimentResult(settings, distances, seconds)
