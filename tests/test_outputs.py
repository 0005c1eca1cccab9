"""Outputs never destroy an input, are never left half-written, and any name the OS takes works."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from cli_runner import completed as sftools  # in this process (in cwd= if given): what subprocess.run gives
from sftools.wan.config import TINY
from sftools.wan.tiny import perturbed, random_state_dict, write_checkpoint


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    base = random_state_dict(TINY, seed=0)
    tuned = perturbed(base, rank=2)
    out = {
        "pt": write_checkpoint(str(d / "sf.pt"), tuned, "self-forcing"),
        "base": write_checkpoint(str(d / "base.safetensors"), base, "original"),
        "folder": write_checkpoint(str(d / "base-diffusers"), base, "diffusers"),
    }
    lora = str(d / "lora.safetensors")
    assert sftools("lora", "extract", out["base"], out["pt"], "-o", lora, "--rank", "2").returncode == 0
    out["lora"] = lora
    os.symlink(out["base"], d / "link.safetensors")
    os.link(out["lora"], d / "hardlink.safetensors")
    out["dir"] = str(d)
    return out


REFUSED = [
    ["convert", "{pt}", "{pt}"],
    ["convert", "{base}", "{base}"],
    ["convert", "{base}", "./base.safetensors"],
    ["convert", "{base}", "{dir}/link.safetensors"],
    ["convert", "{dir}/link.safetensors", "{base}"],
    ["convert", "{base}", "{dir}", "--max-shard-size", "1GB"],
    ["convert", "{folder}", "{folder}", "--layout", "diffusers"],
    ["convert", "{folder}", "{folder}/diffusion_pytorch_model.safetensors"],
    ["lora", "extract", "{base}", "{pt}", "-o", "{base}"],
    ["lora", "extract", "{folder}", "{base}", "-o", "{folder}/diffusion_pytorch_model.safetensors"],
    ["convert", "{folder}", "{folder}/extra.safetensors"],
    ["lora", "merge", "{base}", "{lora}", "-o", "{base}"],
    ["lora", "merge", "{base}", "{lora}:0.5", "-o", "{lora}"],
    ["lora", "resize", "{lora}", "-o", "{lora}", "--rank", "1"],
    ["lora", "resize", "{lora}", "-o", "{dir}/hardlink.safetensors", "--rank", "1"],
    ["lora", "convert", "{lora}", "-o", "{lora}", "--format", "diffusers"],
]


@pytest.mark.parametrize("args", REFUSED, ids=[" ".join(a[:2]) + f" #{i}" for i, a in enumerate(REFUSED)])
def test_an_output_that_resolves_to_an_input_is_refused_and_the_input_is_untouched(files, args):
    inputs = [files[k] for k in ("pt", "base", "lora")] + [os.path.join(files["folder"], n) for n in sorted(os.listdir(files["folder"]))]
    before = {p: digest(p) for p in inputs}
    listing = sorted(os.listdir(files["dir"]))
    r = sftools(*[a.format(**files) for a in args], cwd=files["dir"])
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and any(w in r.stderr for w in ("is the input", "holds the input", "inside the input")), r.stderr
    assert {p: digest(p) for p in inputs} == before
    assert sorted(os.listdir(files["dir"])) == listing


def test_an_output_file_must_be_named_safetensors_and_files_are_told_apart_by_their_bytes(files, tmp_path):
    r = sftools("convert", files["base"], str(tmp_path / "out.pt"))
    assert r.returncode == 1 and "give a name ending in .safetensors" in r.stderr
    assert not (tmp_path / "out.pt").exists()
    # A safetensors file under a pickle's name (as older tools wrote) is read as what it is, by every command.
    disguised = tmp_path / "weights.pt"
    disguised.write_bytes(open(files["base"], "rb").read())
    scan = sftools("scan", str(disguised))
    info = sftools("inspect", str(disguised))
    conv = sftools("convert", str(disguised), str(tmp_path / "back.safetensors"))
    assert scan.returncode == info.returncode == conv.returncode == 0, (scan.stderr, info.stderr, conv.stderr)
    assert "safetensors, SAFE" in scan.stdout and "wan2.1 t2v" in info.stdout
    assert load_file(str(tmp_path / "back.safetensors")).keys() == load_file(files["base"]).keys()
    # And a pickle under a safetensors name goes to the symbolic reader, never to safetensors' error.
    pickle_named = tmp_path / "really_a_pickle.safetensors"
    pickle_named.write_bytes(open(files["pt"], "rb").read())
    assert "torch-zip, SAFE" in sftools("scan", str(pickle_named)).stdout


@pytest.mark.parametrize("kind", ["empty file", "empty folder"])
def test_empty_inputs_are_named_for_what_they_are(tmp_path, kind):
    path = tmp_path / "thing"
    path.mkdir() if kind == "empty folder" else path.write_bytes(b"")
    expected = "holds no .safetensors files" if kind == "empty folder" else "file is empty (0 bytes)"
    for args in (["scan", str(path)], ["inspect", str(path)], ["convert", str(path), str(tmp_path / "o.safetensors")]):
        r = sftools(*args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and expected in r.stderr, (args, r.stderr)
    scan = sftools("scan", str(path), "--json")
    assert '"safetensors"' not in scan.stdout and '"safe": false' in scan.stdout


KILL_MIDWAY = """
import os, signal, sys
import sftools.io.output as output
real = output.write_safetensors
def dying(path, tensors, metadata=None, on_bytes=None):
    def die(n):
        die.count += 1
        if die.count == 20:
            os.kill(os.getpid(), signal.SIGKILL)
    die.count = 0
    return real(path, tensors, metadata, on_bytes=die)
output.write_safetensors = dying
sys.argv = ["sftools", "convert", sys.argv[1], sys.argv[2]]
from sftools.cli.main import main
main()
"""


def test_a_killed_run_leaves_a_temporary_file_that_the_next_run_removes_saying_so(files, tmp_path):
    dst = tmp_path / "o.safetensors"
    killed = subprocess.run([sys.executable, "-c", KILL_MIDWAY, files["base"], str(dst)], capture_output=True, text=True)
    assert killed.returncode == -9
    left = [n for n in os.listdir(tmp_path) if n.startswith(".sftools-")]
    assert len(left) == 1 and not dst.exists()  # nothing under the final name, a partial hidden file beside it
    r = sftools("convert", files["base"], str(dst))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and "removed 1 temporary file(s) left by an interrupted run" in r.stderr
    assert os.listdir(tmp_path) == ["o.safetensors"]


def test_a_temporary_file_of_a_running_process_is_left_alone(files, tmp_path):
    from sftools.io.output import _temp_stem

    dst = tmp_path / "o.safetensors"
    busy = tmp_path / f"{_temp_stem(str(dst))}-1.tmp"  # pid 1 is always alive
    busy.write_bytes(b"partial")
    assert sftools("convert", files["base"], str(dst)).returncode == 0
    assert busy.exists()


def test_the_longest_name_the_os_accepts_can_be_written(files, tmp_path):
    name = "m" * (250 - len(".safetensors")) + ".safetensors"
    assert len(name.encode()) == 250
    r = sftools("convert", files["base"], str(tmp_path / name))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == [name]
    folder = "f" * 250
    r = sftools("convert", files["base"], str(tmp_path / folder), "--layout", "diffusers")
    assert r.returncode == 0, r.stderr


def test_a_write_error_names_the_users_path_not_the_temporary_one(tmp_path):
    import errno

    from sftools.errors import SftoolsError
    from sftools.io.output import atomic_target

    dst = tmp_path / ("n" * 240 + ".safetensors")
    with pytest.raises(SftoolsError) as caught:
        with atomic_target(str(dst)) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", tmp)
    assert str(caught.value) == f"{dst}: No space left on device"
    assert os.listdir(tmp_path) == []
