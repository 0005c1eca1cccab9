"""`sftools lora check` and `--for`, held to what each loader's own key-handling code does.

LightX2V and DiffSynth-Studio (vendored, Apache-2.0) and diffusers (installed) run here on tiny LoRA
files (`loaders/cases.py`); what they applied is read off the weights they merge (`loaders/observe.py`).
ComfyUI, Kijai's WanVideoWrapper and Wan2GP are GPL-3 or custom-licensed: `loaders/derive.py` ran
them outside this repository on the same files and `loaders/observed.json` records what they did.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_runner import run
from loaders import runners
from loaders.cases import FOR_SOURCES, base, cases, fingerprint, for_loader, planted, write
from loaders.observe import observe
from sftools.io.sources import open_checkpoint
from sftools.lora.check import check_keys
from sftools.lora.forms import read_lora
from sftools.lora.loaders import EFFECTS, LOADER_NAMES, LOADERS
from sftools.wan.config import TINY
from sftools.wan.tiny import perturbed, random_state_dict, write_checkpoint

HERE = pathlib.Path(__file__).resolve().parent / "loaders"
RECORDED = json.loads((HERE / "observed.json").read_text())
CASES = cases()
LIVE = {
    "lightx2v": lambda path, kind: runners.run_lightx2v(path, base(kind)),
    "diffsynth": lambda path, kind: runners.run_diffsynth(path, base(kind)),
    "diffusers": lambda path, kind: runners.run_diffusers(path, base(kind), kind),
}
# diffusers loads a lora_up without its lora_down with peft's random initial lora_A: the one change
# no key asks for (check: ignored, "the module changes by noise").
NOISE = {("diffusers", "edge_orphan_up"): ["blocks.0.self_attn.q.weight"]}


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def predicted(tensors: dict[str, torch.Tensor], loader: str) -> dict:
    v = check_keys(shapes(tensors), LOADERS[loader]).to_dict()
    return {"applied": v["applied"], "ignored": v["ignored"], "refused": v["refused"] is not None}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("cases")
    return {name: write(str(tmp / f"{name}.safetensors"), t, m) for name, (_, t, m) in CASES.items()}


def test_the_vendored_loader_files_are_upstream_bytes():
    for rel, blob in runners.VENDORED_BLOBS.items():
        data = (HERE / rel).read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, rel


def test_the_loaders_are_the_six_and_every_rule_cites_a_commit():
    assert LOADER_NAMES == ("comfyui", "wanvideowrapper", "lightx2v", "wan2gp", "diffsynth", "diffusers")
    for loader in LOADERS.values():
        for item in (*loader.rules, *loader.renames):
            assert re.fullmatch(r"[0-9a-f]{40}", item.source.commit) and item.source.path, item
        assert all(rule.effect in EFFECTS and rule.why for rule in loader.rules)


@pytest.mark.parametrize("loader", list(LIVE))
@pytest.mark.parametrize("case", list(CASES))
def test_check_predicts_what_the_loaders_own_code_applies(files, loader, case):
    kind, tensors, _ = CASES[case]
    torch.manual_seed(0)  # peft draws the lora_A a lone lora_up leaves behind (NOISE) from the global generator
    seen = observe(lambda: LIVE[loader](files[case], kind), tensors, base(kind))
    assert seen["unexplained"] == NOISE.get((loader, case), [])
    assert predicted(tensors, loader) == {"applied": len(seen["applied"]), "ignored": seen["ignored"],
                                          "refused": seen["refused"]}


@pytest.mark.parametrize("loader", list(RECORDED["observed"]))
@pytest.mark.parametrize("case", list(CASES))
def test_check_predicts_what_the_gpl_loaders_did_when_run_on_the_same_files(loader, case):
    _, tensors, _ = CASES[case]
    assert fingerprint(tensors) == RECORDED["fingerprints"][case]  # the file derive.py ran them on
    recorded = RECORDED["observed"][loader][case]
    assert predicted(tensors, loader) == {k: recorded[k] for k in ("applied", "ignored", "refused")}


def test_the_recorded_outcomes_are_the_ones_the_issue_reports():
    """ComfyUI and the wrapper load a default file in full; Wan2GP deletes modulation.diff (and loads,
    but never applies, norm and patch_embedding diffs) and refuses diff_m and lora_B.bias files."""
    seen = RECORDED["observed"]
    assert seen["comfyui"]["comfyui_t2v"] == {"applied": 95, "ignored": [], "refused": False}
    assert seen["wanvideowrapper"]["lightx2v_t2v"] == {"applied": 95, "ignored": [], "refused": False}
    assert seen["wan2gp"]["lightx2v_t2v"]["refused"] and seen["wan2gp"]["edge_lora_b_bias"]["refused"]
    lost = seen["wan2gp"]["comfyui_t2v"]["ignored"]
    assert [k for k in lost if "modulation" in k] == [f"diffusion_model.{m}.modulation.diff" for m in ("blocks.0", "blocks.1", "head")]
    assert "diffusion_model.patch_embedding.diff" in lost and "diffusion_model.blocks.0.norm3.diff" in lost


def _left_out(source: str, loader: str) -> list[str]:
    """What each loader's spelling cannot carry of the source file, by the issue's rules and the loader's code."""
    lora = planted(CASES[source][0])
    params = lora.params if not source.startswith("diffusers") else [
        p for p in lora.params if p in lora.factors or p.removesuffix(".bias") + ".weight" in lora.factors]
    dense = [p for p in params if p in lora.diffs]
    lost = {
        "comfyui": [], "wanvideowrapper": [], "lightx2v": [],
        # modulation goes; mmgp never applies a .diff of a non-Linear module (norms, the 5-D patch_embedding)
        "wan2gp": [p for p in dense if p.endswith("modulation") or (p.endswith(".weight") and lora.diffs[p].dim() != 2)],
        # pairs only: biases, 1-D norms, the 5-D patch_embedding and modulation go
        "diffsynth": dense,
        # peft: factors and the biases of factored modules only
        "diffusers": [p for p in dense if p.removesuffix(".bias") + ".weight" not in lora.factors],
    }[loader]
    return sorted(lost)


@pytest.mark.parametrize("loader", LOADER_NAMES)
@pytest.mark.parametrize("source", FOR_SOURCES)
def test_for_output_is_applied_in_full_with_the_expected_merged_weights(tmp_path, loader, source):
    kind = CASES[source][0]
    path, tensors, left_out = for_loader(str(tmp_path), source, loader)
    assert left_out == _left_out(source, loader)
    assert check_keys(shapes(tensors), LOADERS[loader]).complete
    expected = {p: read_lora(open_checkpoint(path)).delta(p, base(kind)[p].shape) for p in base(kind)}
    source_lora = read_lora(open_checkpoint(f"{tmp_path}/{source}.safetensors"))
    if loader in LIVE:
        seen = observe(lambda: LIVE[loader](path, kind), tensors, base(kind))
        assert not seen["refused"] and seen["ignored"] == [] and seen["unexplained"] == []
        merged = LIVE[loader](path, kind)
        for p, w in base(kind).items():
            change = torch.zeros_like(w) if expected[p] is None else expected[p]
            assert torch.allclose(merged[p], w + change, atol=1e-5), p
    else:
        recorded = RECORDED["observed"][loader][f"{source}_for_{loader}"]
        assert fingerprint(tensors) == RECORDED["fingerprints"][f"{source}_for_{loader}"]
        assert recorded["ignored"] == [] and not recorded["refused"]
        assert recorded["deltas"] == {p: pytest.approx(float(d.norm()), rel=1e-4) for p, d in expected.items() if d is not None}
    for p, change in expected.items():  # what is written is the source's change, where it is written at all
        want = source_lora.delta(p, base(kind)[p].shape)
        assert (change is None) == (p in left_out or want is None), p
        if change is not None:
            assert torch.allclose(change, want, atol=1e-6), p


@pytest.mark.parametrize("loader,source", [("diffsynth", "edge_dense"), ("diffusers", "edge_dense"),
                                           ("lightx2v", "edge_5d"), ("diffsynth", "edge_both"), ("lightx2v", "edge_both")])
def test_for_rewrites_what_a_loader_would_drop_into_what_it_applies(tmp_path, loader, source):
    """Dense 2-D changes become exact full-rank pairs (diffsynth, diffusers), 5-D factors a dense diff
    (LightX2V), factors plus a diff of one weight their sum; the loader's own code applies it all."""
    kind = CASES[source][0]
    path, tensors, left_out = for_loader(str(tmp_path), source, loader)
    src = read_lora(open_checkpoint(f"{tmp_path}/{source}.safetensors"))
    merged = LIVE[loader](path, kind)
    for p in src.params:
        if p not in left_out:
            assert torch.allclose(merged[p], base(kind)[p] + src.delta(p, base(kind)[p].shape), atol=1e-5), p
    if source == "edge_dense" and loader == "diffsynth":
        assert sorted(k for k in tensors if k.endswith("lora_up.weight")) == [
            "diffusion_model.blocks.0.ffn.0.lora_up.weight", "diffusion_model.blocks.0.self_attn.q.lora_up.weight",
            "diffusion_model.head.head.lora_up.weight"]
        assert left_out == ["blocks.0.self_attn.q.bias", "head.head.bias"]


# The command line


@pytest.fixture(scope="module")
def default_lora(tmp_path_factory) -> str:
    """What `sftools lora extract` writes by default (comfyui form) for a tiny T2V pair."""
    tmp = tmp_path_factory.mktemp("extract")
    base_state = random_state_dict(TINY, seed=0)
    b = write_checkpoint(str(tmp / "base.safetensors"), base_state)
    t = write_checkpoint(str(tmp / "tuned.safetensors"), perturbed(base_state, rank=None))
    out = str(tmp / "lora.safetensors")
    assert run(None, "lora", "extract", b, t, "-o", out, "--rank", "4", "--report", str(tmp / "r.json"))[0] == 0
    return out


def test_check_json_says_per_loader_what_it_applies_ignores_or_refuses(capsys, default_lora):
    code, out, err = run(capsys, "lora", "check", default_lora, "--json")
    report = json.loads(out)["loaders"]
    assert list(report) == list(LOADER_NAMES) and code == 1
    assert report["comfyui"] == report["wanvideowrapper"] == {"applied": 94, "ignored": [], "refused": None}
    modulation = [f"diffusion_model.{m}.modulation.diff" for m in ("blocks.0", "blocks.1", "head")]
    assert report["lightx2v"] == {"applied": 91, "ignored": modulation, "refused": None}
    assert report["wan2gp"]["applied"] == 80 and set(modulation) <= set(report["wan2gp"]["ignored"])
    assert report["diffsynth"]["applied"] == 52 and report["diffusers"]["applied"] == 78
    assert err.count("\n") == 1 and err.startswith(f"sftools: {default_lora}: LightX2V applies 91 of 94 keys, ignores 3;")


def test_check_text_names_each_ignored_key_and_exits_0_when_the_named_loaders_apply_all(capsys, default_lora):
    code, out, err = run(capsys, "lora", "check", default_lora, "--loader", "comfyui", "--loader", "wanvideowrapper")
    assert code == 0 and err == ""
    assert "checked against a Wan 2.1 T2V model" in out and "comfyui          applies all 94 keys" in out
    code, out, err = run(capsys, "lora", "check", default_lora, "--loader", "lightx2v")
    assert code == 1 and "diff_m" in out and "        diffusion_model.head.modulation.diff" in out


def test_check_refusals_and_bad_input(capsys, tmp_path, files):
    code, out, _ = run(capsys, "lora", "check", files["lightx2v_t2v"], "--loader", "wan2gp", "--json")
    assert code == 1 and json.loads(out)["loaders"]["wan2gp"]["refused"].startswith(
        "diffusion_model.blocks.0.diff_m: diff_m is a 'non Lora key' to mmgp")
    code, out, err = run(capsys, "lora", "check", files["comfyui_i2v"], "--loader", "comfyui")
    assert code == 0 and "Wan 2.1 I2V model" in out
    assert run(capsys, "lora", "check", files["comfyui_t2v"], "--loader", "kohya")[0] == 2
    model = write_checkpoint(str(tmp_path / "model.safetensors"), random_state_dict(TINY))
    code, _, err = run(capsys, "lora", "check", model)
    assert code == 1 and err.count("\n") == 1 and "is not a LoRA key" in err
    code, _, err = run(capsys, "lora", "check", str(tmp_path / "missing.safetensors"))
    assert code == 1 and err.count("\n") == 1


def test_convert_for_writes_the_loaders_spelling_and_names_what_goes(capsys, tmp_path, default_lora):
    out = str(tmp_path / "lx.safetensors")
    code, _, err = run(capsys, "lora", "convert", default_lora, "-o", out, "--for", "lightx2v")
    keys = set(load_file(out))
    assert code == 0 and err == "" and "diffusion_model.blocks.1.diff_m" in keys and "diffusion_model.head.diff_m" in keys
    assert run(capsys, "lora", "check", out, "--loader", "lightx2v")[0] == 0
    code, out_json, err = run(capsys, "lora", "convert", default_lora, "-o", str(tmp_path / "w.safetensors"),
                              "--for", "wan2gp", "--json")
    assert code == 0 and "modulation" in err and err.count("\n") == 1
    assert json.loads(out_json)["for"] == "wan2gp" and "blocks.0.modulation" in json.loads(out_json)["not_in_form"]
    code, _, err = run(capsys, "lora", "convert", default_lora, "-o", str(tmp_path / "d.safetensors"), "--for", "diffusers")
    assert code == 0 and set(load_file(str(tmp_path / "d.safetensors"))) and all(
        k.startswith("transformer.") for k in load_file(str(tmp_path / "d.safetensors")))
    for both in (["--format", "comfyui", "--for", "lightx2v"], []):
        assert run(capsys, "lora", "convert", default_lora, "-o", str(tmp_path / "x.safetensors"), *both)[0] == 2
    assert run(capsys, "lora", "convert", default_lora, "-o", default_lora, "--for", "diffsynth")[0] == 1


def test_extract_for_and_the_report_say_what_each_loader_loses(capsys, tmp_path):
    base_state = random_state_dict(TINY, seed=0)
    b = write_checkpoint(str(tmp_path / "base.safetensors"), base_state)
    t = write_checkpoint(str(tmp_path / "tuned.safetensors"), perturbed(base_state, rank=None))
    code, out, err = run(capsys, "lora", "extract", b, t, "-o", str(tmp_path / "d.safetensors"), "--rank", "4",
                         "--report", str(tmp_path / "d.json"))
    report = json.loads((tmp_path / "d.json").read_text())
    assert code == 0 and report["loader"] is None and report["loaders"]["comfyui"]["ignored"] == []
    assert report["loaders"]["lightx2v"]["ignored"] == [f"diffusion_model.{m}.modulation.diff" for m in ("blocks.0", "blocks.1", "head")]
    assert "  lightx2v ignores 3 keys (first: diffusion_model.blocks.0.modulation.diff); --for lightx2v writes" in out
    code, out, err = run(capsys, "lora", "extract", b, t, "-o", str(tmp_path / "s.safetensors"), "--rank", "4",
                         "--for", "diffsynth", "--report", str(tmp_path / "s.json"))
    report = json.loads((tmp_path / "s.json").read_text())
    assert code == 0 and report["loader"] == "diffsynth" and report["form"] == "comfyui"
    assert report["loaders"]["diffsynth"] == {"applied": 52, "ignored": [], "refused": None}
    assert "blocks.0.modulation" in report["not_in_form"] and "modulation" in err
    assert all(k.endswith(("lora_up.weight", "lora_down.weight")) for k in load_file(str(tmp_path / "s.safetensors")))
    assert run(capsys, "lora", "extract", b, t, "-o", str(tmp_path / "x.safetensors"), "--for", "lightx2v",
               "--format", "diffusers")[0] == 2


def test_a_file_sftools_cannot_read_is_still_checked_key_by_key(capsys, tmp_path):
    """A lone lora_up: ComfyUI and DiffSynth fail on it, LightX2V skips it (recorded and live above)."""
    path = str(tmp_path / "orphan.safetensors")
    save_file(CASES["edge_orphan_up"][1], path)
    code, out, _ = run(capsys, "lora", "check", path, "--json", "--loader", "comfyui", "--loader", "lightx2v",
                       "--loader", "diffsynth")
    report = json.loads(out)["loaders"]
    assert code == 1 and report["comfyui"]["refused"] and report["diffsynth"]["refused"]
    assert report["lightx2v"] == {"applied": 2, "ignored": ["diffusion_model.blocks.0.self_attn.q.lora_up.weight"],
                                  "refused": None}
