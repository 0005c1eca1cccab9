"""The command line as users and scripts call it: exit codes, one-line errors, JSON, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sftools.wan.config import TINY
from sftools.wan.tiny import random_state_dict, write_checkpoint


def sftools(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sftools", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sf_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "self_forcing_dmd.pt"
    return write_checkpoint(str(path), random_state_dict(TINY), "self-forcing")


def test_demo_runs_the_chain_and_says_what_each_step_did(tmp_path):
    r = sftools("demo", "--workdir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    for step in ("1. wrote", "2. scan: torch-zip, safe", "3. convert", "4. convert --layout diffusers", "5. inspect",
                 "6. lora extract", "7. lora merge"):
        assert step in r.stdout
    assert (tmp_path / "sf.safetensors").exists() and (tmp_path / "sf-diffusers" / "config.json").exists()
    assert (tmp_path / "sf_lora_rank8.safetensors").exists() and (tmp_path / "base_plus_lora.safetensors").exists()


def test_scan_and_inspect_print_one_json_object(sf_pt):
    scan = sftools("scan", sf_pt, "--json")
    assert scan.returncode == 0
    report = json.loads(scan.stdout)
    assert report["safe"] is True and report["sub_dicts"] == {"generator": 69, "generator_ema": 69, "critic": 69}
    assert {g["name"] for g in report["globals"]} == {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"}
    info = json.loads(sftools("inspect", sf_pt, "--json").stdout)
    assert (info["kind"], info["layout"], info["tensors"]) == ("wan2.1 t2v", "original", 69)


@pytest.mark.parametrize("args,message", [
    (["convert", "{dir}/missing.pt", "{dir}/o.safetensors"], "no such file"),
    (["convert", "{pt}", "{dir}/o.safetensors", "--select", "critic_ema"], "no sub-dict 'critic_ema'"),
    (["convert", "{pt}", "{dir}/o.safetensors", "--max-shard-size", "1GB"], "needs a folder"),
    (["convert", "{pt}", "{dir}/nofolder/o.safetensors"], "does not exist"),
    (["convert", "{pt}", "{ptdir}"], "holds the input"),
    (["lora", "extract", "{pt}", "{pt}", "-o", "{dir}"], "is a folder"),
    (["lora", "merge", "{pt}", "{dir}/missing.safetensors", "-o", "{dir}/o.safetensors"], "no such file"),
    (["lora", "resize", "{dir}/missing.safetensors", "-o", "{dir}/o.safetensors", "--rank", "2"], "no such file"),
])
def test_user_mistakes_get_one_line_and_exit_1(sf_pt, tmp_path, args, message):
    r = sftools(*[a.format(dir=tmp_path, pt=sf_pt, ptdir=os.path.dirname(sf_pt)) for a in args])
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("sftools: error:") and message in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("args", [
    ["convert", "{pt}", "{dir}/o.safetensors", "--dtype", "int4"],
    ["convert", "{pt}", "{dir}/o", "--max-shard-size", "bogus"],
    ["convert", "{pt}", "{dir}/o", "--max-shard-size", "0"],
    ["lora", "extract", "{pt}", "{pt}", "-o", "{dir}/o.safetensors", "--device", "tpu9"],
    ["lora", "extract", "{pt}", "{pt}", "-o", "{dir}/o.safetensors", "--oversample", "-3"],
    ["lora", "extract", "{pt}", "{pt}", "-o", "{dir}/o.safetensors", "--rank", "0"],
    ["lora", "extract", "{pt}", "{pt}", "-o", "{dir}/o.safetensors", "--energy", "1.5"],
    ["lora", "extract", "{pt}", "{pt}", "-o", "{dir}/o.safetensors", "--report", "{dir}/o.safetensors"],
    ["lora", "resize", "{pt}", "-o", "{dir}/o.safetensors"],
])
def test_usage_errors_exit_2_before_any_work(sf_pt, tmp_path, args):
    r = sftools(*[a.format(dir=tmp_path, pt=sf_pt) for a in args])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Error" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_a_lora_with_mismatched_factor_ranks_is_refused_in_one_line(sf_pt, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.ones(64, 4),
               "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.ones(2, 32)}, str(tmp_path / "bad.safetensors"))
    r = sftools("lora", "merge", sf_pt, str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "o.safetensors"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "factors [64, 4] and [2, 32], which do not multiply" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()
