"""The command line as users and scripts call it: exit codes, one-line errors, JSON, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cli_runner import completed as sftools  # in this process: what subprocess.run gives
from sftools.wan.config import TINY
from sftools.wan.tiny import random_state_dict, write_checkpoint


def sftools_process(*args: str) -> subprocess.CompletedProcess:
    """`python -m sftools ARGS...` in its own process: the real entry point, kept for one case of each kind."""
    return subprocess.run([sys.executable, "-m", "sftools", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sf_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "self_forcing_dmd.pt"
    return write_checkpoint(str(path), random_state_dict(TINY), "self-forcing")


def test_demo_runs_the_chain_and_says_what_each_step_did(tmp_path):
    r = sftools("demo", "--workdir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    for step in ("1. wrote", "2. scan: torch-zip, safe", "3. convert", "4. convert --layout diffusers", "5. inspect",
                 "6. lora extract", "7. lora merge", "8. sample", "9. verify", "10. train", "11. vace extract",
                 "12. vace graft", "13. sample the grafted model under the control"):
        assert step in r.stdout
    commands = [line.strip()[2:] for line in r.stdout.splitlines() if line.strip().startswith("$ sftools ")]
    assert [c.split()[1] for c in commands] == ["scan", "convert", "convert", "inspect", "lora", "lora", "sample", "verify",
                                                "train", "vace", "vace", "sample"]
    assert (tmp_path / "fox_square.mp4").exists() and (tmp_path / "sf_vace.safetensors").exists()
    assert "PASS at --min-psnr 30 (the base alone:" in r.stdout and "dB, FAIL)" in r.stdout
    assert (tmp_path / "fox.mp4").exists()
    again = sftools("demo", "--workdir", str(tmp_path))  # never over what is there
    assert again.returncode == 1 and "empty or new folder" in again.stderr
    assert f"sftools lora extract {tmp_path}/Wan2.1-T2V-tiny-Diffusers {tmp_path}/self_forcing_dmd.pt" in r.stdout
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


USER_MISTAKES = [
    (["convert", "{dir}/missing.pt", "{dir}/o.safetensors"], "no such file"),
    (["convert", "{pt}", "{dir}/o.safetensors", "--select", "critic_ema"], "no sub-dict 'critic_ema'"),
    (["convert", "{pt}", "{dir}/o.safetensors", "--max-shard-size", "1GB"], "needs a folder"),
    (["convert", "{pt}", "{dir}/nofolder/o.safetensors"], "does not exist"),
    (["convert", "{pt}", "{ptdir}"], "holds the input"),
    (["lora", "extract", "{pt}", "{pt}", "-o", "{dir}"], "is a folder"),
    (["lora", "merge", "{pt}", "{dir}/missing.safetensors", "-o", "{dir}/o.safetensors"], "no such file"),
    (["lora", "resize", "{dir}/missing.safetensors", "-o", "{dir}/o.safetensors", "--rank", "2"], "no such file"),
]


@pytest.mark.parametrize("args,message", USER_MISTAKES)
def test_user_mistakes_get_one_line_and_exit_1(sf_pt, tmp_path, args, message):
    run = sftools_process if args == USER_MISTAKES[0][0] else sftools  # the first through `python -m sftools`
    r = run(*[a.format(dir=tmp_path, pt=sf_pt, ptdir=os.path.dirname(sf_pt)) for a in args])
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("sftools: error:") and message in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.safetensors").exists()


USAGE_ERRORS = [
    ["convert", "{pt}", "{dir}/o.safetensors", "--dtype", "int4"],
    ["convert", "{pt}", "{dir}/o", "--max-shard-size", "bogus"],
    ["convert", "{pt}", "{dir}/o", "--max-shard-size", "0"],
    ["lora", "extract", "{pt}", "{pt}", "-o", "{dir}/o.safetensors", "--device", "tpu9"],
    ["lora", "extract", "{pt}", "{pt}", "-o", "{dir}/o.safetensors", "--oversample", "-3"],
    ["lora", "extract", "{pt}", "{pt}", "-o", "{dir}/o.safetensors", "--rank", "0"],
    ["lora", "extract", "{pt}", "{pt}", "-o", "{dir}/o.safetensors", "--energy", "1.5"],
    ["lora", "extract", "{pt}", "{pt}", "-o", "{dir}/o.safetensors", "--report", "{dir}/o.safetensors"],
    ["lora", "extract", "{pt}", "{pt}", "-o", "{dir}/o.safetensors", "--report", "{pt}"],
    ["lora", "resize", "{pt}", "-o", "{dir}/o.safetensors"],
    ["lora", "merge", "{pt}", "{dir}/l.safetensors:abc", "-o", "{dir}/o.safetensors"],
    ["sample", "{pt}", "--prompt-embeds", "{pt}", "--lora", "{dir}/l.safetensors:inf", "-o", "{dir}/o.safetensors"],
]


@pytest.mark.parametrize("args", USAGE_ERRORS)
def test_usage_errors_exit_2_before_any_work(sf_pt, tmp_path, args):
    run = sftools_process if args == USAGE_ERRORS[0] else sftools  # the first through `python -m sftools`
    r = run(*[a.format(dir=tmp_path, pt=sf_pt) for a in args])
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


def test_scan_refusals_are_also_one_line_on_stderr(tmp_path):
    bad = tmp_path / "evil.pt"
    import pickle

    bad.write_bytes(pickle.dumps(os.system, protocol=2))  # a global reference to os.system
    r = sftools("scan", str(bad))
    assert r.returncode == 1 and "REFUSED" in r.stdout
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"sftools: error: {bad}: refused:")


HELP_PROBE = """
import sys
sys.argv = ["sftools", *sys.argv[1:]]
from sftools.cli.main import main
try:
    main()
except SystemExit:
    pass
print("TORCH-IMPORTED" if "torch" in sys.modules else "NO-TORCH")
"""


@pytest.mark.parametrize("args", [["--help"], ["lora", "--help"], ["lora", "extract", "--help"], ["convert", "--help"],
                                  ["convert"], ["lora", "merge", "x"], ["bogus"], ["lora", "check", "--help"],
                                  ["lora", "check", "x", "--loader", "bogus"], ["lora", "convert", "x", "-o", "y"]])
def test_help_and_usage_errors_answer_without_importing_torch(args):
    r = subprocess.run([sys.executable, "-c", HELP_PROBE, *args], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().endswith("NO-TORCH"), r.stdout + r.stderr


def test_every_option_is_explained_and_command_lists_are_not_cut():
    import click

    from sftools.cli.main import cli

    def walk(command, path):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, path + [name])

    for path, command in walk(cli, []):
        assert command.help, path
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("help", "version"):
                assert param.help, (path, param.name)
        if isinstance(command, click.Group):
            listing = sftools(*path, "--help").stdout
            assert "..." not in listing.split("Commands:")[1], listing


def test_lora_commands_take_keep_and_json_and_say_when_nothing_was_resized(sf_pt, tmp_path):
    base = write_checkpoint(str(tmp_path / "base.safetensors"), random_state_dict(TINY, seed=3), "original")
    lora = str(tmp_path / "l.safetensors")
    r = sftools("lora", "extract", base, sf_pt, "-o", lora, "--rank", "4", "--dtype", "keep", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["dtype"] == "fp32" and report["settings"]["rank"]["rank"] == 4 and report["layers"]
    from safetensors import safe_open

    with safe_open(lora, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # the Self Forcing .pt is fp32
    kept = sftools("lora", "resize", lora, "-o", str(tmp_path / "r.safetensors"), "--rank", "16")
    assert kept.returncode == 0 and "0 modules resized, 26 kept at their rank" in kept.stdout
    conv = sftools("lora", "convert", lora, "-o", str(tmp_path / "d.safetensors"), "--format", "diffusers", "--json")
    assert conv.returncode == 0 and json.loads(conv.stdout)["format"] == "diffusers"


def test_inspect_shows_the_metadata_sftools_wrote_without_empty_values(sf_pt, tmp_path):
    base = write_checkpoint(str(tmp_path / "base.safetensors"), random_state_dict(TINY, seed=3), "original")
    lora = str(tmp_path / "l.safetensors")
    assert sftools("lora", "extract", base, sf_pt, "-o", lora, "--rank", "4").returncode == 0
    info = json.loads(sftools("inspect", lora, "--json").stdout)["sftools_metadata"]
    assert info["sftools.lora.rank_mode"] == "fixed" and len(info["sftools.lora.tuned_fingerprint"]) == 8
    assert "sftools.lora.energy" not in info and all(info.values())
    text = sftools("inspect", lora).stdout
    assert "sftools.lora.rank_mode: fixed" in text and "sftools.lora.base_fingerprint:" in text
    merged = str(tmp_path / "m.safetensors")
    assert sftools("lora", "merge", base, lora + ":0.5", "-o", merged).returncode == 0
    assert "sftools.merged: l.safetensors:0.5" in sftools("inspect", merged).stdout


def test_long_work_shows_a_bar_on_a_terminal_for_writing_and_verifying(sf_pt, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal of known size
    proc = subprocess.Popen([sys.executable, "-m", "sftools", "convert", sf_pt, str(tmp_path / "o.safetensors")],
                            stdout=subprocess.PIPE, stderr=child, text=True)
    os.close(child)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=120)
    os.close(main)
    assert proc.returncode == 0
    text = seen.decode(errors="replace")
    assert "converting:   0%|" in text and "verifying:   0%|" in text, text
