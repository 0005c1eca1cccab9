"""`sftools train` on the tiny recipe: refusals before any work, exact resume and repeat, two
processes holding identical adapters, and a final LoRA that `sftools sample --lora` takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "tiny-cpu.yaml")
FAST = ["--set", "run.checkpoint_every=2", "--set", "run.ema_start=1", "--set", "optim.critic_ratio=2"]


def final(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "final", "lora.safetensors"))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "straight"
    assert run(None, "train", RECIPE, *FAST, "--set", "run.steps=4", "--output-dir", str(out))[0] == 0
    return out


def test_resuming_continues_the_run_bit_for_bit_and_more_steps_continue_it(four_steps, capsys, tmp_path):
    half = tmp_path / "resumed"
    assert run(capsys, "train", RECIPE, *FAST, "--set", "run.steps=2", "--output-dir", str(half))[0] == 0
    code, out, err = run(capsys, "train", RECIPE, *FAST, "--set", "run.steps=4", "--output-dir", str(half),
                         "--resume", str(half), "--json")
    assert code == 0, err
    assert json.loads(out)["resumed_from"] == 2
    a, b = final(four_steps), final(half)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(half / "checkpoints")) == ["step-0000002", "step-0000004"]


def test_the_same_seed_gives_the_same_adapter_and_another_seed_another(four_steps, capsys, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert run(capsys, "train", RECIPE, *FAST, "--set", "run.steps=4", "--output-dir", str(again))[0] == 0
    assert run(capsys, "train", RECIPE, *FAST, "--set", "run.steps=4", "--set", "run.seed=1", "--output-dir", str(other))[0] == 0
    a, b, c = final(four_steps), final(again), final(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_up" in k)  # the generator did move


def test_the_final_lora_samples_with_sftools_sample(four_steps, capsys, tmp_path):
    base = str(four_steps / "tiny-model")
    embeds = four_steps / "cache" / "prompt_embeds.safetensors"
    from safetensors.torch import save_file

    save_file({"prompt_embeds": load_file(str(embeds))["prompt.0"]}, str(tmp_path / "p.safetensors"))
    common = ["--prompt-embeds", str(tmp_path / "p.safetensors"), "--frames", "9", "--height", "32", "--width", "32"]
    assert run(capsys, "sample", base, *common, "-o", str(tmp_path / "base.safetensors"))[0] == 0
    code, _, err = run(capsys, "sample", base, "--lora", str(four_steps / "final" / "lora.safetensors"), *common,
                       "-o", str(tmp_path / "trained.safetensors"))
    assert code == 0, err
    plain, trained = (load_file(str(tmp_path / n))["latents"] for n in ("base.safetensors", "trained.safetensors"))
    assert not torch.equal(plain, trained)
    with open(four_steps / "final" / "lora_diffusers.safetensors", "rb"):
        pass


@pytest.mark.parametrize("args,code,message", [
    (["--set", "run.stepz=3"], 2, "unknown recipe key run.stepz"),
    (["--set", "run.steps=many"], 2, "run.steps must be int"),
    (["--set", "model.base=/nonexistent/model.safetensors"], 1, "/nonexistent/model.safetensors: no such file"),
    (["--set", "video.frames=10"], 2, "4k+1"),
    (["--set", "nonsense"], 2, "is not KEY=VALUE"),
])
def test_bad_recipes_are_refused_in_one_line_before_any_work(capsys, tmp_path, args, code, message):
    got, _, err = run(capsys, "train", RECIPE, *args, "--output-dir", str(tmp_path / "run"))
    assert got == code and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def launch(*args: str, script: list[str] = ("-m", "sftools")) -> dict:
    """Two gloo CPU processes through accelerate (with accelerate 1.x, `--cpu --num_processes 2`
    starts one process); the report of the main one."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script,
                        "train", RECIPE, *FAST, *args, "--json"], capture_output=True, text=True, timeout=600, env=env,
                       cwd=os.path.dirname(__file__))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ddp_four_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, launch("--set", "run.steps=4", "--output-dir", str(out))


def test_two_cpu_processes_train_the_same_adapters(ddp_four_steps):
    _, report = ddp_four_steps
    assert report["processes"] == 2 and report["adapters_identical_across_processes"] is True
    assert report["sharded"] is False


def test_fsdp_shards_the_base_and_resumes_to_what_ddp_trains(ddp_four_steps, tmp_path):
    # FSDP2 over per-block units reduce-scatters the same averaged gradients DDP all-reduces, and
    # its checkpoints gather adapters and optimizer states whole: stopping at step 2 and resuming
    # under FSDP must land on the DDP run's adapter.
    fsdp = ["fsdp_cpu.py"]
    half = tmp_path / "fsdp"
    assert launch("--set", "run.steps=2", "--output-dir", str(half), script=fsdp)["sharded"] is True
    report = launch("--set", "run.steps=4", "--output-dir", str(half), "--resume", str(half), script=fsdp)
    assert report["resumed_from"] == 2 and report["adapters_identical_across_processes"] is True
    a, b = final(ddp_four_steps[0]), final(half)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_fsdp_runs_the_sharded_base_as_teacher_for_an_odd_number_of_trajectories(tmp_path):
    # The FSDP base is a collective teacher: every process must run every trajectory (3 pairs over
    # 2 processes would otherwise leave one waiting for the other).
    out = tmp_path / "ode"
    report = launch("--set", "stage=ode_init", "--set", "ode.pairs=3", "--set", "ode.teacher_steps=8",
                    "--set", "run.steps=2", "--output-dir", str(out), script=["fsdp_cpu.py"])
    assert report["sharded"] is True and report["adapters_identical_across_processes"] is True
    assert sorted(p.name for p in (out / "cache" / "ode").iterdir()) == [f"pair-0000{i}.safetensors" for i in range(3)]


def test_the_demos_training_stage_runs_the_tiny_recipe():
    from sftools.demo import TRAIN_RECIPE
    from sftools.training.config import Recipe, load_recipe

    assert Recipe.from_dict(TRAIN_RECIPE) == load_recipe(RECIPE, ["run.steps=6"])


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.dirname(RECIPE)) if n.endswith(".yaml")))
def test_every_recipe_is_a_valid_recipe(name):
    import yaml

    from sftools.training.config import Recipe, _build

    with open(os.path.join(os.path.dirname(RECIPE), name)) as f:
        recipe = _build(Recipe, yaml.safe_load(f), "")
    for part in (recipe.video, recipe.optim, recipe.run, recipe.ode):  # model paths are the user's to give
        part.check()


def test_the_fsdp_accelerate_config_is_what_the_cpu_test_launcher_uses():
    import yaml

    with open(os.path.join(os.path.dirname(RECIPE), "accelerate", "fsdp2.yaml")) as f:
        config = yaml.safe_load(f)
    fsdp = config["fsdp_config"]
    assert config["distributed_type"] == "FSDP" and fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "WanTransformerBlock"


def test_bf16_and_gradient_checkpointing_train_on_the_cpu(tmp_path):
    # Its own process: accelerate keeps one mixed-precision state per process.
    r = subprocess.run([sys.executable, "-m", "sftools", "train", RECIPE, *FAST, "--set", "run.steps=2", "--set",
                        "run.mixed_precision=bf16", "--set", "run.gradient_checkpointing=true", "--output-dir",
                        str(tmp_path / "bf16")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(torch.isfinite(v).all() for v in final(tmp_path / "bf16").values())


def test_gradient_accumulation_averages_more_rollouts_per_update(four_steps, capsys, tmp_path):
    code, out, err = run(capsys, "train", RECIPE, *FAST, "--set", "run.steps=4", "--set", "run.grad_accum=2",
                         "--output-dir", str(tmp_path / "accum"), "--json")
    assert code == 0, err
    a, b = final(four_steps), final(tmp_path / "accum")
    assert all(torch.isfinite(v).all() for v in b.values()) and not all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run(capsys, "train", RECIPE, "--set", "run.grad_accum=0", "--output-dir", str(tmp_path / "x"))
    assert code == 2 and "run.grad_accum must be >= 1" in err


def test_a_prompt_longer_than_the_models_text_len_is_refused_in_one_line_before_training(capsys, tmp_path):
    from dataclasses import replace

    from sftools.wan.config import TINY_128
    from sftools.wan.tiny import random_state_dict, write_checkpoint
    from sftools.wan.tiny_parts import write_tiny_text_encoder

    config = replace(TINY_128, text_len=4)
    base = write_checkpoint(str(tmp_path / "Wan-short"), random_state_dict(config, seed=0), "diffusers", config)
    write_tiny_text_encoder(base, text_dim=config.text_dim)
    got, _, err = run(capsys, "train", RECIPE, "--set", f"model.base={base}", "--set", f"data.text_encoder={base}",
                      "--output-dir", str(tmp_path / "run"))
    message = "the built-in prompts: 'a red ball rolls on grass' has 21 tokens; the model takes 4 (its text_len)"
    assert got == 2 and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "run" / "final").exists()


def test_a_separate_teacher_that_attends_over_other_context_rows_is_refused_in_one_line(capsys, tmp_path):
    from dataclasses import replace

    from sftools.wan.config import TINY_128
    from sftools.wan.tiny import random_state_dict, write_checkpoint

    config = replace(TINY_128, text_len=64)
    teacher = write_checkpoint(str(tmp_path / "teacher.safetensors"), random_state_dict(config, seed=1), "original", config)
    got, _, err = run(capsys, "train", RECIPE, "--set", f"model.teacher={teacher}", "--output-dir", str(tmp_path / "run"))
    message = f"model.teacher {teacher}: attends over 64 context rows (its text_len); the base over 512"
    assert got == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "final").exists()
