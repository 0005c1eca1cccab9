"""Full-parameter training (`model.train: full`) on the tiny recipe: the generator and the critic are
whole copies of the base, the base (the teacher) never changes, each copy moves only on its own
updates, a run resumes bit for bit, and the final model samples with `sftools sample`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_runner import run
from sftools.lora.forms import Lora, write_lora
from sftools.training.adapters import CRITIC, GENERATOR
from sftools.training.config import load_recipe
from sftools.training.trainer import Trainer
from sftools.wan.keys import diffusers_name_to_original

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "tiny-cpu.yaml")
FULL = ["model.train=full", "run.checkpoint_every=2", "run.ema_start=1", "optim.critic_ratio=2", "video.frames=21"]


def trainer(folder, *overrides: str) -> Trainer:
    return Trainer(load_recipe(RECIPE, [*FULL, *overrides]), str(folder))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full") / "straight"
    t = trainer(folder, "run.steps=4")
    base = snapshot(t.nets.transformer)
    report = t.train()
    return folder, t, base, report


def test_the_base_stays_bit_identical_and_both_copies_train(four_steps):
    _, t, base, _ = four_steps
    assert same(snapshot(t.nets.transformer), base)
    for role in (GENERATOR, CRITIC):
        moved = snapshot(t.nets.copies[role])
        assert moved.keys() == base.keys()
        assert not same(moved, base), role
    assert all(not p.requires_grad for p in t.nets.transformer.parameters())


def test_each_copy_moves_only_on_its_own_updates(tmp_path):
    t = trainer(tmp_path / "run", "run.steps=2")
    before = {role: snapshot(t.nets.copies[role]) for role in (GENERATOR, CRITIC)}
    log = t.iteration(1)  # critic_ratio 2: iteration 1 updates the critic alone
    assert list(log.losses) == ["critic"]
    assert same(snapshot(t.nets.copies[GENERATOR]), before[GENERATOR])
    assert not same(snapshot(t.nets.copies[CRITIC]), before[CRITIC])
    log = t.iteration(2)  # both, the generator by DMD through its own rollout
    assert list(log.losses) == ["dmd", "critic"]
    assert not same(snapshot(t.nets.copies[GENERATOR]), before[GENERATOR])


def test_the_final_model_is_the_generators_ema_in_original_names(four_steps):
    folder, t, _, report = four_steps
    assert report["outputs"] == {"model": str(folder / "final" / "model.safetensors")}
    written = load_file(report["outputs"]["model"])
    expected = {diffusers_name_to_original(n.removeprefix("generator.")): v for n, v in t.ema.items()}
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in written)
    assert "blocks.0.self_attn.q.weight" in written and "head.modulation" in written
    assert not os.path.exists(folder / "final" / "lora.safetensors")


def test_the_final_model_keeps_its_bases_config_what_its_shapes_do_not_say(tmp_path):
    from dataclasses import replace

    from sftools.sampling.load import plan_model
    from sftools.wan.config import TINY_128
    from sftools.wan.tiny import random_state_dict, write_checkpoint
    from sftools.wan.tiny_parts import write_tiny_text_encoder

    config = replace(TINY_128, text_len=64)
    base = write_checkpoint(str(tmp_path / "Wan-short"), random_state_dict(config, seed=0), "diffusers", config)
    write_tiny_text_encoder(base, text_dim=config.text_dim)
    report = trainer(tmp_path / "run", "run.steps=1", f"model.base={base}", f"data.text_encoder={base}").train()
    assert plan_model(report["outputs"]["model"]).config == config


def test_resuming_a_full_run_continues_it_bit_for_bit(four_steps, tmp_path):
    folder, _, _, report = four_steps
    half = tmp_path / "resumed"
    trainer(half, "run.steps=2").train()
    resumed = trainer(half, "run.steps=4")
    resumed.resume(str(half))
    again = resumed.train()
    assert again["resumed_from"] == 2
    assert same(load_file(again["outputs"]["model"]), load_file(report["outputs"]["model"]))


def test_a_full_generator_starts_from_the_base_plus_an_init_lora(four_steps, tmp_path):
    folder, _, _, _ = four_steps
    g = torch.Generator().manual_seed(3)
    lora = Lora()
    lora.factors["blocks.1.ffn.0.weight"] = (torch.randn(64, 2, generator=g), torch.randn(2, 256, generator=g))
    lora.diffs["blocks.0.norm3.bias"] = torch.randn(256, generator=g)
    path = str(tmp_path / "init.safetensors")
    write_lora(path, lora, "comfyui", torch.float32, {})
    t = Trainer(load_recipe(RECIPE, [*FULL, "run.steps=1", f"model.base={folder / 'tiny-model'}",
                                     f"data.text_encoder={folder / 'tiny-model'}", f"model.init_lora={path}"]),
                str(tmp_path / "run"))
    base, generator = snapshot(t.nets.transformer), snapshot(t.nets.copies[GENERATOR])
    ffn, norm = "blocks.1.ffn.net.0.proj.weight", "blocks.0.norm2.bias"  # diffusers swaps norm2 and norm3
    assert torch.equal(generator[ffn], base[ffn] + lora.delta("blocks.1.ffn.0.weight", tuple(base[ffn].shape)))
    assert torch.equal(generator[norm], base[norm] + lora.diffs["blocks.0.norm3.bias"])
    untouched = [n for n in base if n not in (ffn, norm)]
    assert all(torch.equal(generator[n], base[n]) for n in untouched)
    assert same(snapshot(t.nets.copies[CRITIC]), base)  # the critic starts from the teacher, as in Self Forcing


def test_an_init_lora_of_another_size_is_refused_in_one_line(four_steps, capsys, tmp_path):
    folder, _, _, _ = four_steps
    lora = Lora()
    lora.factors["blocks.1.ffn.0.weight"] = (torch.ones(128, 2), torch.ones(2, 512))
    path = str(tmp_path / "big.safetensors")
    write_lora(path, lora, "comfyui", torch.float32, {})
    sets = [a for kv in [*FULL, f"model.base={folder / 'tiny-model'}", f"data.text_encoder={folder / 'tiny-model'}",
                         f"model.init_lora={path}"] for a in ("--set", kv)]
    code, _, err = run(capsys, "train", RECIPE, *sets, "--output-dir", str(tmp_path / "run"))
    assert code == 1 and "blocks.1.ffn.0.weight" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "final").exists()


def test_the_full_model_samples_with_sftools_sample(four_steps, capsys, tmp_path):
    folder, _, _, report = four_steps
    embeds = load_file(str(folder / "cache" / "prompt_embeds.safetensors"))["prompt.0"]
    save_file({"prompt_embeds": embeds}, str(tmp_path / "p.safetensors"))
    common = ["--prompt-embeds", str(tmp_path / "p.safetensors"), "--frames", "9", "--height", "32", "--width", "32"]
    assert run(capsys, "sample", str(folder / "tiny-model"), *common, "-o", str(tmp_path / "base.safetensors"))[0] == 0
    code, _, err = run(capsys, "sample", report["outputs"]["model"], *common, "-o", str(tmp_path / "full.safetensors"))
    assert code == 0, err
    plain, trained = (load_file(str(tmp_path / n))["latents"] for n in ("base.safetensors", "full.safetensors"))
    assert not torch.equal(plain, trained)


def test_the_cli_reports_the_full_model(capsys, tmp_path):
    code, out, err = run(capsys, "train", RECIPE, *[a for kv in FULL for a in ("--set", kv)], "--set", "run.steps=1",
                         "--output-dir", str(tmp_path / "run"), "--json")
    assert code == 0, err
    assert json.loads(out)["outputs"] == {"model": str(tmp_path / "run" / "final" / "model.safetensors")}


def test_an_unknown_training_kind_is_refused_before_any_work(capsys, tmp_path):
    code, _, err = run(capsys, "train", RECIPE, "--set", "model.train=partial", "--output-dir", str(tmp_path / "run"))
    assert code == 2 and "model.train must be lora or full" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
