"""Self Forcing DMD on adapters, on accelerate: the loop of `trainer/distillation.py`
(guandeh17/Self-Forcing @ 33593df) with the generator and the critic as LoRA adapters of one
frozen base.

Every iteration updates the critic with the flow-matching loss on a fresh no-grad rollout; every
`critic_ratio`-th also updates the generator with DMD on a rollout that keeps gradients at each
block's exit step (AdamW with Self Forcing's betas, gradient clipping, then the EMA of the adapter).
All randomness of an iteration comes from generators keyed by (seed, iteration, process), so a run
repeats exactly, a resumed run continues exactly, and raising the step count continues the same run.
Across processes (DDP) gradients are averaged by hand after each backward: several forward calls,
with adapters switched per call, go into one backward, which DDP's per-forward hooks do not allow.
Under FSDP (an accelerate config with `distributed_type: FSDP`, `fsdp_version: 2`) the base and its
adapters are sharded per Wan block, FSDP reduces the gradients itself, and checkpoints gather the
full adapters and optimizer states before writing them.

The recipe's `stage` picks what an iteration does: `self_forcing` as above; `teacher_forcing` the
same with each rollout's cache refreshed from a teacher video instead of the generator's own blocks
(the baseline Self Forcing improves on); `ode_init` one regression of the generator onto a teacher
trajectory (`training/ode.py`), no critic. The teacher trajectories the last two need are computed
once into `cache/ode/`, a file each, split over the processes.

A VACE model (the base with `model.vace` grafted on, or a VACE base) retrains its add-on: every call
takes the control of its frames (`training/controls.py`), the generator's rollouts run the add-on
causally, the teacher is the add-on with adapters off run bidirectionally, and the result is
`final/vace_module.safetensors`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sftools.errors import SettingsError, SftoolsError
from sftools.io.output import progress
from sftools.lora.forms import read_lora_file, write_lora
from sftools.models.causal_wan import CausalWanModel
from sftools.sampling.causal import pad_context, prompt_tokens
from sftools.sampling.load import load_transformer, plan_model
from sftools.sampling.noise import keyed_generator
from sftools.sampling.schedules import few_step_schedule
from sftools.sampling.text import encode_prompts
from sftools.training.adapters import CRITIC, GENERATOR
from sftools.training.networks import ROLES, FullNetworks, LoraNetworks
from sftools.training.checkpoint import load_checkpoint, save_checkpoint
from sftools.models.kv_cache import visible_frames
from sftools.training.config import SYNTHETIC_TEACHER, TINY_MODEL, Recipe
from sftools.training.controls import cache_key, control_files, read_controls, tiny_controls
from sftools.training.dmd import critic_timestep, dmd_loss, flow_loss, noised
from sftools.training.ode import regression_inputs, regression_loss, trajectory
from sftools.training.rollout import exit_step, rollout
from sftools.training.synthetic import synthetic_teacher
from sftools.wan.vace import is_vace_key, write_module

TINY_PROMPTS = ("a red ball rolls on grass", "waves at sunset", "a fox in the snow", "city lights at night")


@dataclass
class StepLog:
    iteration: int
    losses: dict[str, float]  # dmd (generator), critic (flow), ode (regression): those this iteration ran
    seconds: float

    def describe(self) -> str:
        return ", ".join(f"{LOSS_NAMES[name]} {value:.4g}" for name, value in self.losses.items())  # DMD losses are tiny


LOSS_NAMES = {"dmd": "generator (DMD)", "critic": "critic (flow)", "ode": "generator (ODE regression)"}


@dataclass
class Pair:
    """One teacher trajectory: its prompt and its states at the student's levels, then clean."""
    prompt: int
    states: torch.Tensor  # [steps + 1, 1, C, T, h, w]


@dataclass
class Example:
    """What one rollout takes: a prompt (raw and padded), the negative, and for teacher forcing the
    teacher's video, for a VACE model the control ([1, 96, T, h, w])."""
    raw: torch.Tensor
    context: torch.Tensor
    negative: torch.Tensor
    truth: torch.Tensor | None = None
    control: torch.Tensor | None = None


class Trainer:
    def __init__(self, recipe: Recipe, output_dir: str, accelerator: Accelerator | None = None) -> None:
        self.recipe, self.output_dir = recipe, output_dir
        self.accelerator = accelerator or Accelerator(mixed_precision=recipe.run.mixed_precision)
        self.device = self.accelerator.device
        self.start = 0
        os.makedirs(output_dir, exist_ok=True)
        base, vace, text_encoder = self._base_and_text_encoder()
        plan = plan_model(base, vace=vace)
        self.config = plan.config
        self.vace = self.config.model_type == "vace"
        self.addon_dtypes = {n: t.dtype for n, t in plan.checkpoint.tensors.items() if is_vace_key(n)}
        m = recipe.model
        init = read_lora_file(m.init_lora) if m.init_lora else None
        if self.vace:
            self._check_vace_run(base, init)
        self.controls, self.controls_key = self._controls()
        self.embeds, self.negative = self._prompt_embeddings(text_encoder)
        transformer, _ = load_transformer(plan, device=self.device)
        self.nets = (FullNetworks(transformer, init, self.vace) if m.train == "full"
                     else LoraNetworks(transformer, m.rank, recipe.run.seed, init, self.vace))
        if recipe.run.gradient_checkpointing:
            for module in self.nets.modules():
                module.enable_gradient_checkpointing()
        self.teacher = self._separate_teacher()
        o = recipe.optim
        self.optimizers = {role: torch.optim.AdamW([p for _, p in self.nets.named(role)], lr=lr, betas=o.betas,
                                                   weight_decay=o.weight_decay)
                           for role, lr in ((GENERATOR, o.lr), (CRITIC, o.lr_critic))}
        self.fsdp = self.accelerator.distributed_type == DistributedType.FSDP
        if self.fsdp:
            self._shard()
        self.params = {role: [p for _, p in self.nets.named(role)] for role in ROLES}
        self.ema: dict[str, torch.Tensor] | None = None
        v = recipe.video
        self.schedule = few_step_schedule(v.steps, v.shift)
        self.shape = (1, self.config.out_dim, v.latent_frames, v.height // 8, v.width // 8)
        self.pairs = self._teacher_pairs() if recipe.stage != "self_forcing" else []

    # --- set-up --------------------------------------------------------------------------------

    def _base_and_text_encoder(self) -> tuple[str, str | None, str | None]:
        """(base, VACE module, text encoder). The built-in tiny model (its tiny umT5, and its tiny
        add-on when asked for) is written into the run folder once."""
        m, d = self.recipe.model, self.recipe.data
        if m.base != TINY_MODEL:
            return m.base, m.vace, d.text_encoder
        from sftools.wan.config import TINY_128, TINY_128_VACE
        from sftools.wan.tiny import random_state_dict, write_checkpoint
        from sftools.wan.tiny_parts import write_tiny_text_encoder

        folder = os.path.join(self.output_dir, "tiny-model")
        module = os.path.join(self.output_dir, "tiny-vace-module.safetensors") if m.vace == TINY_MODEL else m.vace
        if self.accelerator.is_main_process and not os.path.exists(os.path.join(folder, "config.json")):
            write_checkpoint(folder, random_state_dict(TINY_128, seed=0), "diffusers", TINY_128)
            write_tiny_text_encoder(folder, text_dim=TINY_128.text_dim)
        if self.accelerator.is_main_process and m.vace == TINY_MODEL and not os.path.exists(module):
            addon = {n: t for n, t in random_state_dict(TINY_128_VACE, seed=1).items() if is_vace_key(n)}
            write_module(module, addon, TINY_128_VACE, {})
        self.accelerator.wait_for_everyone()
        return folder, module, d.text_encoder or folder

    def _check_vace_run(self, base: str, init) -> None:
        """What a VACE add-on run cannot take, in one line before any work."""
        m = self.recipe.model
        if m.teacher:
            raise SettingsError(f"model.teacher with the VACE model {base}: the teacher of an add-on is the add-on "
                                "itself, with bidirectional attention")
        foreign = next((n for n in (init.params if init else []) if not is_vace_key(n)), None)
        if foreign:
            raise SettingsError(f"model.init_lora {m.init_lora}: changes {foreign}; a VACE run trains the add-on "
                                "alone, so its LoRA may change only vace_* weights")

    def _controls(self) -> tuple[list[torch.Tensor], str | None]:
        """(controls, what they depend on) of a VACE run: the built-in ones of the tiny add-on, or
        those of `data.controls`, encoded once into cache/controls.safetensors; none otherwise."""
        d, v = self.recipe.data, self.recipe.video
        if not self.vace:
            if d.controls:
                raise SettingsError("data.controls is for VACE add-on runs: set model.vace, or train a VACE model")
            return [], None
        channels = self.config.vace_in_dim
        if d.controls is None:
            if self.recipe.model.vace != TINY_MODEL:
                raise SettingsError("a VACE add-on run needs data.controls (a folder of vace_context .safetensors "
                                    "files or .mp4 control clips)")
            return tiny_controls(v, channels, self.recipe.run.seed), TINY_MODEL
        files = control_files(d.controls)
        key = cache_key(files, v, d.vae)
        cache = os.path.join(self.output_dir, "cache", "controls.safetensors")
        tensors = self._cached(cache, key, lambda: {f"control.{i}": c for i, c in enumerate(
            read_controls(files, v, d.vae, channels, self.device))})
        return [tensors[f"control.{i}"] for i in range(len(files))], key

    def _shard(self) -> None:
        """FSDP2 through accelerate: model and optimizers prepared together (accelerate maps the
        optimizers onto the sharded parameters). The separate teacher, if any, stays whole."""
        if not getattr(self.accelerator, "is_fsdp2", False):
            raise SettingsError("sftools trains with FSDP2: set fsdp_version: 2 in the accelerate config")
        if self.nets.kind == "full":
            raise SettingsError("model.train: full is for small models, on one process or DDP; FSDP shards adapter runs")
        if self.vace:
            raise SettingsError("VACE add-on runs train on one process or DDP (the add-on of a 14B model is 3B); "
                                "FSDP shards the plain adapter runs")
        # FSDP2 warns that the transformer returns a view (its unpatchify reshape); every use of the
        # output here is out of place, which is what the warning asks for.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        names = list(self.optimizers)
        transformer, *prepared = self.accelerator.prepare(self.nets.transformer, *self.optimizers.values())
        self.nets.sharded(transformer)
        self.optimizers = dict(zip(names, prepared))

    def _separate_teacher(self) -> torch.nn.Module | None:
        """The recipe's own teacher, if it names one (else the base with adapters off is the teacher)."""
        teacher = self.recipe.model.teacher
        if teacher == SYNTHETIC_TEACHER:
            v = self.recipe.video
            return synthetic_teacher(self.config.out_dim, v.height // 8, v.width // 8, self.config.text_dim).to(self.device)
        if not teacher:
            return None
        plan = plan_model(teacher)  # checked before a single weight is loaded
        if plan.config.text_len != self.config.text_len:  # it is given the base's padded prompts
            raise SettingsError(f"model.teacher {teacher}: attends over {plan.config.text_len} context rows (its "
                                f"text_len); the base over {self.config.text_len}")
        return load_transformer(plan, device=self.device)[0]

    def _prompt_embeddings(self, text_encoder: str | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """umT5 embeddings of every prompt, computed once into `cache/` (trimmed of padding), so the
        text encoder is not held while training."""
        d = self.recipe.data
        prompts = list(TINY_PROMPTS) if not d.prompts else [p.strip() for p in open(d.prompts) if p.strip()]
        cache = os.path.join(self.output_dir, "cache", "prompt_embeds.safetensors")
        key = hashlib.sha256(json.dumps([prompts, d.negative_prompt, text_encoder]).encode()).hexdigest()

        def encode() -> dict[str, torch.Tensor]:
            if text_encoder is None:
                raise SettingsError("data.text_encoder (a local Wan diffusers folder) is needed to encode the prompts")
            tensors = {}
            for i, prompt in enumerate(prompts):
                positive, negative = encode_prompts(text_encoder, prompt, d.negative_prompt, torch.device("cpu"),
                                                    torch.float32)
                tensors[f"prompt.{i}"] = _trim(positive[0])
            tensors["negative"] = _trim(negative[0])
            return tensors

        tensors = self._cached(cache, key, encode)
        embeds = [tensors[f"prompt.{i}"] for i in range(len(prompts))]
        self._check_prompt_lengths(prompts, embeds, tensors["negative"])
        return embeds, tensors["negative"]

    def _check_prompt_lengths(self, prompts: list[str], embeds: list[torch.Tensor], negative: torch.Tensor) -> None:
        rows, source = self.config.text_len, self.recipe.data.prompts or "the built-in prompts"
        named = [(f"{source}: {prompt[:40]!r}", e) for prompt, e in zip(prompts, embeds)]
        for what, e in [*named, ("data.negative_prompt", negative)]:
            if len(e) > rows:
                raise SettingsError(f"{what} has {len(e)} tokens; the model takes {rows} (its text_len)")

    def _cached(self, path: str, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Tensors the main process computes once into `path` (atomically, tagged with `key`, recomputed
        when the key changes), then every process reads."""
        if self.accelerator.is_main_process and not _cache_matches(path, key):
            tensors = compute()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_file(tensors, path + ".tmp", metadata={"key": key})
            os.replace(path + ".tmp", path)
        self.accelerator.wait_for_everyone()
        return load_file(path)

    def _teacher_pairs(self) -> list[str]:
        """Paths of the teacher trajectories, one file each in cache/ode/, computed where missing or
        made for other settings, then shared by every process."""
        folder = os.path.join(self.output_dir, "cache", "ode")
        os.makedirs(folder, exist_ok=True)
        r = self.recipe
        key = hashlib.sha256(json.dumps([r.model.base, r.model.teacher, r.data.prompts, r.data.text_encoder,
                                         r.data.negative_prompt, dataclasses.asdict(r.video), r.ode.teacher_steps,
                                         r.optim.guidance, r.run.seed, r.model.vace, self.controls_key]
                                        ).encode()).hexdigest()
        paths = [os.path.join(folder, f"pair-{i:05d}.safetensors") for i in range(r.ode.pairs)]
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        missing = [i for i in range(len(paths)) if not _cache_matches(paths[i], key)]
        self.accelerator.wait_for_everyone()  # every process has its list before any pair is written
        # A sharded teacher (the base under FSDP) runs collectively: then every process runs every
        # trajectory and the main one writes them; otherwise each takes every world-th one.
        shared = self.fsdp and self.teacher is None
        mine = missing if shared else missing[rank::world]
        with progress(len(mine), "teacher trajectories", unit="pair") as bar:
            for i in mine:
                self._write_pair(paths[i], i, key, write=not shared or self.accelerator.is_main_process)
                bar.update(1)
        self.accelerator.wait_for_everyone()
        return paths

    def _write_pair(self, path: str, index: int, key: str, write: bool) -> None:
        prompt = index % len(self.embeds)
        _, context, negative = self._prompt(prompt)
        control = self._control(index)
        noise = torch.randn(self.shape, generator=keyed_generator(self.recipe.run.seed, index, 0, "ode")).to(self.device)
        states = trajectory(lambda x, t: self._teacher_flow(x, t, context, negative, control), noise, self.schedule,
                            self.recipe.ode.teacher_steps)
        if not write:
            return
        save_file({"states": states.float().cpu().contiguous()}, path + ".tmp", metadata={"key": key, "prompt": str(prompt)})
        os.replace(path + ".tmp", path)

    def _pair(self, index: int) -> Pair:
        with safe_open(self.pairs[index], "pt") as f:
            return Pair(prompt=int(f.metadata()["prompt"]), states=f.get_tensor("states").to(self.device))

    # --- one iteration -------------------------------------------------------------------------

    def _teacher_flow(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, negative: torch.Tensor,
                      control: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's guided flow, cond + guidance (cond - uncond), no gradients; a VACE teacher
        takes the control in both branches, as diffusers' WanVACEPipeline gives it."""
        guidance = self.recipe.optim.guidance
        extra = {} if control is None else {"control_hidden_states": control}
        with torch.no_grad(), self.nets.playing(None) as base:
            teacher = self.teacher or base.transformer
            cond = teacher(hidden_states=x_t, timestep=t, encoder_hidden_states=context, return_dict=False, **extra)[0]
            if guidance == 0:
                return cond
            uncond = teacher(hidden_states=x_t, timestep=t, encoder_hidden_states=negative, return_dict=False,
                             **extra)[0]
        return cond + guidance * (cond - uncond)

    def _scores(self, x_t: torch.Tensor, t: torch.Tensor, example: Example):
        """x0 of the critic (fake score) and of the teacher with guidance (real score), no gradients."""
        sigma = (t / 1000).view(-1, 1, 1, 1, 1)
        with torch.no_grad():
            with self.nets.playing(CRITIC) as critic:
                fake = x_t - sigma * critic.bidirectional(x_t, t, example.context, example.control)
            real = x_t - sigma * self._teacher_flow(x_t, t, example.context, example.negative, example.control)
        return real, fake

    def _backward(self, name: str, loss: torch.Tensor) -> None:
        # The backward runs with the adapter of its forward active again: other calls since switched
        # adapters (which froze these parameters, and autograd skips frozen leaves), and gradient
        # checkpointing recomputes the forward during the backward.
        with self.nets.playing(name):
            self.accelerator.backward(loss / self.recipe.run.grad_accum)

    def _step(self, name: str) -> None:
        params = self.params[name]
        if self.accelerator.num_processes > 1 and not self.fsdp:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.accelerator.num_processes
        torch.nn.utils.clip_grad_norm_(params, self.recipe.optim.grad_clip)
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def _rollout(self, example: Example, iteration: int, generator: torch.Generator, what: str) -> torch.Tensor:
        v, seed = self.recipe.video, self.recipe.run.seed
        exit_at = exit_step(v.steps, seed + (what == "critic"), iteration)
        with self.nets.playing(GENERATOR) as generator_model, self.accelerator.autocast():
            return rollout(generator_model, example.raw, self.schedule, self.shape, v.frames_per_block, exit_at,
                           generator, v.shift, truth=example.truth, control=example.control,
                           text_len=self.config.text_len)

    def _prompt(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(raw, padded) embeddings of prompt `index` and the padded negative."""
        raw = self.embeds[index % len(self.embeds)][None]
        rows = self.config.text_len
        return raw, pad_context(raw, rows).to(self.device), pad_context(self.negative[None], rows).to(self.device)

    def _draw(self, it: int, micro: int) -> int:
        """Which prompt (or teacher pair) micro-batch `micro` of iteration `it` takes on this process:
        every process and micro-batch takes its own."""
        accum, world = self.recipe.run.grad_accum, self.accelerator.num_processes
        return (it * world + self.accelerator.process_index) * accum + micro

    def _control(self, index: int) -> torch.Tensor | None:
        """The control draw `index` takes (controls in turn, as prompts are), on the device; None without."""
        return self.controls[index % len(self.controls)].to(self.device) if self.controls else None

    def _example(self, it: int, micro: int) -> Example:
        """A prompt (and control), and for teacher forcing the teacher's video of them."""
        index = self._draw(it, micro)
        if self.recipe.stage != "teacher_forcing":
            return Example(*self._prompt(index), control=self._control(index))
        index %= len(self.pairs)
        pair = self._pair(index)
        return Example(*self._prompt(pair.prompt), truth=pair.states[-1], control=self._control(index))

    def iteration(self, it: int) -> StepLog:
        began = time.perf_counter()
        if self.recipe.stage == "ode_init":
            losses = {"ode": self._update(GENERATOR, it, "ode", self._ode_loss)}
        else:
            losses = {}
            if it % self.recipe.optim.critic_ratio == 0:
                losses["dmd"] = self._update(GENERATOR, it, "generator", self._generator_loss)
            losses["critic"] = self._update(CRITIC, it, "critic", self._critic_loss)
        return StepLog(it, losses, time.perf_counter() - began)

    def _update(self, name: str, it: int, what: str, loss_of) -> float:
        """One optimizer step of adapter `name` over `run.grad_accum` micro-batches, each with its own
        draws keyed by (seed, iteration, process, what, micro); the mean loss."""
        accum = self.recipe.run.grad_accum
        total = 0.0
        for micro in range(accum):
            g = keyed_generator(self.recipe.run.seed, it, self.accelerator.process_index, f"{what}:{micro}")
            loss = loss_of(it, micro, g)
            self._backward(name, loss)
            total += float(loss.detach()) / accum
        self._step(name)
        if name == GENERATOR:
            self._update_ema(it)
        return total

    def _generator_loss(self, it: int, micro: int, g: torch.Generator) -> torch.Tensor:
        """DMD on a rollout that keeps gradients at each block's exit step."""
        example = self._example(it, micro)
        video = self._rollout(example, it, g, "generator")
        t = critic_timestep(1, self.recipe.video.shift, g).to(self.device)
        x_t = noised(video.detach(), torch.randn(video.shape, generator=g).to(self.device), t)
        real, fake = self._scores(x_t, t, example)
        return dmd_loss(video, real, fake)

    def _critic_loss(self, it: int, micro: int, g: torch.Generator) -> torch.Tensor:
        """The flow loss of the critic on a fresh rollout without gradients."""
        example = self._example(it, micro)
        with torch.no_grad():
            video = self._rollout(example, it, g, "critic")
        t = critic_timestep(1, self.recipe.video.shift, g).to(self.device)
        noise = torch.randn(video.shape, generator=g).to(self.device)
        with self.nets.playing(CRITIC) as critic, self.accelerator.autocast():
            flow = critic.bidirectional(noised(video, noise, t), t, example.context, example.control)
        return flow_loss(flow, video, noise)

    def _ode_loss(self, it: int, micro: int, g: torch.Generator) -> torch.Tensor:
        """The regression of the generator onto a teacher trajectory (Self Forcing's ODE init)."""
        v = self.recipe.video
        index = self._draw(it, micro) % len(self.pairs)
        pair = self._pair(index)
        _, context, _ = self._prompt(pair.prompt)
        levels = torch.randint(0, len(self.schedule), (-(-self.shape[2] // v.frames_per_block),), generator=g)
        x, timestep, sigma = regression_inputs(pair.states, self.schedule, levels, v.frames_per_block)
        visible = visible_frames(self.shape[2], v.frames_per_block)
        with self.nets.playing(GENERATOR) as generator_model, self.accelerator.autocast():
            flow = generator_model.masked(x, timestep, context, visible, self._control(index))
        return regression_loss(x, flow, sigma, pair.states[-1])

    def _update_ema(self, it: int) -> None:
        run = self.recipe.run
        if it < run.ema_start:
            return
        with torch.no_grad():
            if self.ema is None:
                self.ema = {n: p.detach().float().clone() for n, p in self._named(GENERATOR)}
            else:
                for n, p in self._named(GENERATOR):
                    self.ema[n].mul_(run.ema_decay).add_(p.detach().float(), alpha=1 - run.ema_decay)

    def _named(self, role: str):
        return self.nets.named(role)

    # --- checkpoints and results ---------------------------------------------------------------

    def _optimizer_state(self, name: str) -> dict:
        """The optimizer's state dict; under FSDP gathered whole (every process must call this)."""
        if not self.fsdp:
            return self.optimizers[name].state_dict()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.nets.transformer, self.optimizers[name].optimizer, options=options)

    def _load_optimizer_state(self, name: str, state: dict) -> None:
        if not self.fsdp:
            self.optimizers[name].load_state_dict(state)
            return
        # torch fills an empty optimizer state with a zero step over the parameters that require
        # gradients before sharding the loaded one into it: those of this adapter.
        with self.nets.playing(name):
            set_optimizer_state_dict(self.nets.transformer, self.optimizers[name].optimizer, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))

    def save(self, step: int) -> None:
        tensors = {f"weights.{n}": _whole(p) for name in (GENERATOR, CRITIC) for n, p in self._named(name)}
        tensors.update({f"ema.{n}": _whole(v) for n, v in (self.ema or {}).items()})
        states = {name: self._optimizer_state(name) for name in self.optimizers}
        if self.accelerator.is_main_process:
            save_checkpoint(self.output_dir, step, tensors, states, {"ema": self.ema is not None,
                            "recipe": self.recipe.to_dict()}, self.recipe.run.keep_checkpoints)

    def resume(self, path: str) -> None:
        tensors, states, meta = load_checkpoint(path, list(self.optimizers))
        live = dict(p for name in (GENERATOR, CRITIC) for p in self._named(name))
        for n, p in live.items():
            saved = tensors.get(f"weights.{n}")
            if saved is None or tuple(saved.shape) != tuple(p.shape):
                raise SftoolsError(f"{path}: its checkpoint {'lacks' if saved is None else 'has another shape for'} "
                                   f"{n}: it trained other networks (model.train, model.rank, model.vace); resume "
                                   "with the recipe it was written with")
        with torch.no_grad():
            for n, p in live.items():
                p.copy_(_like(p, tensors[f"weights.{n}"]))
        for name, state in states.items():
            self._load_optimizer_state(name, state)
        # The EMA shadows the generator, parameter for parameter.
        self.ema = {n: _like(p, tensors[f"ema.{n}"]) for n, p in self._named(GENERATOR)} if meta["ema"] else None
        self.start = int(meta["step"])

    def generator_weights(self):
        """The generator, from its EMA once that has started: a LoRA for adapter runs, the whole
        state in original names for full ones, the add-on (in its file's dtypes) for VACE runs
        (under FSDP every process must call this: the adapter is gathered whole)."""
        values = {n: _whole((self.ema or {}).get(n, p)) for n, p in self._named(GENERATOR)}
        if self.vace:
            return {n: t.to(self.addon_dtypes[n]) for n, t in self.nets.addon_weights(values).items()}
        return self.nets.generator_weights(values)

    def write_final(self, weights) -> dict[str, str]:
        """final/lora.safetensors (comfyui form) and lora_diffusers.safetensors for adapter runs;
        final/model.safetensors (original names, what ComfyUI and `sftools sample` load) for full ones;
        final/vace_module.safetensors for VACE runs."""
        final = os.path.join(self.output_dir, "final")
        os.makedirs(final, exist_ok=True)
        meta = {"sftools.training.recipe": json.dumps(self.recipe.to_dict()), "sftools.training.ema": str(bool(self.ema))}
        if self.vace:  # the module form `vace extract` writes, with the facts `vace graft` checks
            path = os.path.join(final, "vace_module.safetensors")
            write_module(path, weights, self.config, meta)
            return {"vace_module": path}
        if self.nets.kind == "full":  # with its base's config, which its shapes do not say all of (text_len)
            path = os.path.join(final, "model.safetensors")
            save_file(weights, path + ".tmp", metadata={**meta, "sftools.config": self.config.to_json()})
            os.replace(path + ".tmp", path)
            return {"model": path}
        out = {form: os.path.join(final, name) for form, name in (("comfyui", "lora.safetensors"),
                                                                  ("diffusers", "lora_diffusers.safetensors"))}
        for form, path in out.items():
            write_lora(path, weights, form, torch.float32, meta)
        return out

    def adapters_agree(self) -> bool:
        """Whether every process holds the same generator and critic (adapters or whole)."""
        if self.accelerator.num_processes == 1:
            return True
        flat = torch.cat([_whole(p).float().flatten() for name in (GENERATOR, CRITIC) for _, p in self._named(name)])
        gathered = self.accelerator.gather(flat[None])
        return bool((gathered == gathered[0]).all())

    def train(self, on_log=None) -> dict:
        run = self.recipe.run
        logs = []
        with progress(run.steps - self.start, "training", unit="step") as bar:
            for it in range(self.start, run.steps):
                log = self.iteration(it)
                logs.append(log)
                bar.set_postfix_str(f"{log.describe()}, {log.seconds:.1f} s/step")
                bar.update(1)
                if on_log and (it % run.log_every == 0 or it + 1 == run.steps):
                    on_log(log)
                if (it + 1) % run.checkpoint_every == 0 or it + 1 == run.steps:
                    self.save(it + 1)
        agree = self.adapters_agree()
        weights = self.generator_weights()
        outputs = self.write_final(weights) if self.accelerator.is_main_process else {}
        return {"steps": run.steps, "resumed_from": self.start, "outputs": outputs, "processes": self.accelerator.num_processes,
                "sharded": self.fsdp,
                "adapters_identical_across_processes": agree, "seconds_per_step": [log.seconds for log in logs]}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: an FSDP shard gathered whole (a collective: every process calls it)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


def _like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` laid out as `param`: sharded the same way under FSDP, as is otherwise."""
    whole = whole.to(param.device, param.dtype)
    return distribute_tensor(whole, param.device_mesh, param.placements) if isinstance(param, DTensor) else whole


def _trim(embeds: torch.Tensor) -> torch.Tensor:
    """Drop the zero rows umT5 padding added at the end (pad_context puts them back)."""
    return embeds[:max(prompt_tokens(embeds[None]), 1)].contiguous()


def _cache_matches(path: str, key: str) -> bool:
    if not os.path.exists(path):
        return False
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("key") == key
