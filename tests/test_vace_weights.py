"""VACE add-ons as weights: `vace extract` and `vace graft` round-trip bit for bit from every input
form, the grafted file loads strictly in diffusers and is named VACE, and every add-on that cannot fit
a base is refused in one line, writing nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli_runner import run
from sftools.errors import SftoolsError
from sftools.io.lazy import Checkpoint, LazyTensor
from sftools.io.safetensors_io import read_header
from sftools.wan.config import (PRESETS, TINY, TINY_128, TINY_VACE, base_shapes, diffusers_config, model_shapes,
                                vace_shapes, wan_config)
from sftools.wan.keys import original_to_diffusers
from sftools.wan.tiny import random_state_dict, write_checkpoint
from sftools.wan.vace import addon_of, fit, graft_order

TINY_T2V = replace(TINY_VACE, model_type="t2v", vace_layers=())  # the 4-layer base of TINY_VACE
SOURCE_NAMES = {"original": "vace.safetensors", "comfyui": "vace_comfy.safetensors", "diffusers": "vace-diffusers",
                "self-forcing": "vace.pt", "wan-ai": "Wan2.1-VACE-tiny"}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def digest(path: str) -> str:
    files = [os.path.join(path, n) for n in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    return hashlib.sha256(b"".join(open(f, "rb").read() for f in files)).hexdigest()


def write_wan_ai_folder(folder, state: dict[str, torch.Tensor], config) -> str:
    """Wan-AI's form: two shards, their index and the `WanModel` config.json, no sftools metadata."""
    os.makedirs(folder)
    names, weight_map = sorted(state), {}
    for i in range(2):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
        part = {n: state[n].contiguous() for n in names[i::2]}
        save_file(part, os.path.join(folder, shard))
        weight_map.update(dict.fromkeys(part, shard))
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**wan_config(config), "vace_layers": list(config.vace_layers)}, f)
    return str(folder)


def write_form(path, state, form: str, config) -> str:
    if form == "wan-ai":
        return write_wan_ai_folder(path, state, config)
    return write_checkpoint(str(path), state, form, config)


@pytest.fixture(scope="module")
def vace_state() -> dict[str, torch.Tensor]:
    return random_state_dict(TINY_VACE, seed=1)


def base_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k in base_shapes(TINY_VACE)}


def vace_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("vace_")}


@pytest.fixture(scope="module")
def files(tmp_path_factory, vace_state):
    d = tmp_path_factory.mktemp("vace")
    out = {"dir": str(d)}
    out["vace"] = write_checkpoint(str(d / "vace.safetensors"), vace_state, "original", TINY_VACE)
    out["base"] = write_checkpoint(str(d / "base.pt"), base_part(vace_state), "self-forcing", TINY_T2V)
    out["module"] = str(d / "module.safetensors")
    assert run(None, "vace", "extract", out["vace"], "-o", out["module"])[0] == 0
    return out


@pytest.mark.parametrize("form", list(SOURCE_NAMES))
def test_graft_of_the_extracted_add_on_onto_the_base_part_is_the_vace_model_bit_for_bit(tmp_path, capsys, vace_state,
                                                                                        form):
    vace = write_form(tmp_path / SOURCE_NAMES[form], vace_state, form, TINY_VACE)
    base = write_form(tmp_path / ("base_" + SOURCE_NAMES[form]), base_part(vace_state), form, TINY_T2V)
    module, grafted = str(tmp_path / "m.safetensors"), str(tmp_path / "g.safetensors")
    code, out, err = run(capsys, "vace", "extract", vace, "-o", module)
    assert code == 0, err
    assert "2 VACE blocks after layers [0, 2] of a 4-layer model" in out
    same(load_file(module), vace_part(vace_state))
    code, out, err = run(capsys, "vace", "graft", base, module, "-o", grafted)
    assert code == 0, err
    same(load_file(grafted), vace_state)
    header, _ = read_header(grafted)
    offsets = {n: h["data_offsets"][0] for n, h in header.items() if n != "__metadata__"}
    assert max(o for n, o in offsets.items() if not n.startswith("vace_")) < \
        min(o for n, o in offsets.items() if n.startswith("vace_"))  # the base's tensors, then the add-on's


def test_extract_of_a_graft_is_the_module_and_a_diffusers_module_grafts_the_same(tmp_path, capsys, files):
    grafted, again = str(tmp_path / "g.safetensors"), str(tmp_path / "again.safetensors")
    assert run(capsys, "vace", "graft", files["base"], files["module"], "-o", grafted)[0] == 0
    assert run(capsys, "vace", "extract", grafted, "-o", again)[0] == 0
    same(load_file(again), load_file(files["module"]))
    as_diffusers = str(tmp_path / "m_diffusers.safetensors")
    code, _, err = run(capsys, "vace", "extract", files["vace"], "-o", as_diffusers, "--layout", "diffusers")
    assert code == 0, err
    module = load_file(files["module"])
    names = original_to_diffusers(module)
    same(load_file(as_diffusers), {names[k]: v for k, v in module.items()})
    assert "vace_blocks.0.proj_in.weight" in names.values()
    from_diffusers = str(tmp_path / "g2.safetensors")
    code, _, err = run(capsys, "vace", "graft", files["base"], as_diffusers, "-o", from_diffusers)
    assert code == 0, err
    same(load_file(from_diffusers), load_file(grafted))
    bare = str(tmp_path / "bare.safetensors")  # a module without sftools' metadata, as Kijai's files are
    save_file(module, bare)
    code, out, err = run(capsys, "vace", "graft", files["base"], bare, "-o", str(tmp_path / "g3.safetensors"))
    assert code == 0, err
    assert "not recorded: spread evenly" in out
    same(load_file(str(tmp_path / "g3.safetensors")), load_file(grafted))


def test_extract_keeps_or_casts_dtypes_and_graft_keeps_the_bases_bits(tmp_path, capsys, files, vace_state):
    half = str(tmp_path / "m_bf16.safetensors")
    assert run(capsys, "vace", "extract", files["vace"], "-o", half, "--dtype", "bf16")[0] == 0
    same(load_file(half), {k: v.bfloat16() for k, v in vace_part(vace_state).items()})
    grafted = str(tmp_path / "g.safetensors")
    assert run(capsys, "vace", "graft", files["base"], half, "-o", grafted)[0] == 0
    same(load_file(grafted), {**base_part(vace_state), **load_file(half)})  # fp32 base, bf16 add-on


def test_a_scaled_fp8_model_gives_a_plain_module(tmp_path, capsys, files, vace_state):
    scaled, module = str(tmp_path / "fp8.safetensors"), str(tmp_path / "m.safetensors")
    assert run(capsys, "convert", files["vace"], scaled, "--dtype", "fp8_e4m3fn_scaled")[0] == 0
    code, out, err = run(capsys, "vace", "extract", scaled, "-o", module)
    assert code == 0, err
    assert "dequantized" in out
    written = load_file(module)
    assert set(written) == set(vace_part(vace_state)) and {t.dtype for t in written.values()} == {torch.float32}
    for k, v in vace_part(vace_state).items():
        assert torch.allclose(written[k], v, rtol=0.07, atol=1e-3 * v.abs().max().item()), k


def test_the_grafted_file_loads_strictly_in_diffusers_and_is_named_vace_everywhere(tmp_path, capsys, files, vace_state):
    from diffusers import WanVACETransformer3DModel
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, convert_wan_transformer_to_diffusers

    grafted = str(tmp_path / "g.safetensors")
    assert run(capsys, "vace", "graft", files["base"], files["module"], "-o", grafted)[0] == 0
    written = load_file(grafted)
    # diffusers' single-file detection: a Wan model (head.modulation) with vace_blocks.0.after_proj.bias.
    assert any(k in written for k in CHECKPOINT_KEY_NAMES["wan"]) and CHECKPOINT_KEY_NAMES["wan_vace"] in written
    model = WanVACETransformer3DModel.from_config(diffusers_config(TINY_VACE))
    converted = convert_wan_transformer_to_diffusers(dict(written))
    result = model.load_state_dict(converted, strict=True)
    assert result.missing_keys == result.unexpected_keys == []
    names = original_to_diffusers(vace_state)
    loaded = model.state_dict()
    for k, v in vace_state.items():
        assert torch.equal(loaded[names[k]], v), k
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(diffusers_config(TINY_VACE)))
    single = WanVACETransformer3DModel.from_single_file(grafted, config=str(config_dir), local_files_only=True)
    assert single.config.vace_layers == [0, 2]
    for k, v in single.state_dict().items():
        assert torch.equal(v, loaded[k]), k
    with safe_open(grafted, "pt") as f:
        stored = json.loads(f.metadata()["sftools.config"])
    assert (stored["model_type"], stored["vace_layers"], stored["num_heads"]) == ("vace", [0, 2], 2)
    # ComfyUI's detection: vace_patch_embedding makes it VACE, blocks hang at range(0, L, L // count).
    count = len({k.split(".")[1] for k in written if k.startswith("vace_blocks.")})
    layers = len({k.split(".")[1] for k in written if k.startswith("blocks.")})
    assert list(range(0, layers, layers // count)) == stored["vace_layers"]


def test_inspect_names_the_grafted_model_and_the_module(tmp_path, capsys, files):
    grafted = str(tmp_path / "g.safetensors")
    assert run(capsys, "vace", "graft", files["base"], files["module"], "-o", grafted)[0] == 0
    info = json.loads(run(capsys, "inspect", grafted, "--json")[1])
    assert info["kind"] == "wan2.1 vace" and info["config"]["vace_layers"] == [0, 2] and info["missing"] == []
    module = json.loads(run(capsys, "inspect", files["module"], "--json")[1])
    assert module["kind"] == "vace module" and module["tensors"] == len(vace_part(random_state_dict(TINY_VACE)))
    assert json.loads(module["sftools_metadata"]["sftools.vace"]) == {"num_heads": 2, "num_layers": 4,
                                                                      "vace_layers": [0, 2]}


def test_replace_swaps_an_add_on_the_base_already_holds(tmp_path, capsys, files, vace_state):
    other = random_state_dict(TINY_VACE, seed=7)
    old = write_checkpoint(str(tmp_path / "old_vace.safetensors"), {**vace_state, **vace_part(other)}, "original",
                           TINY_VACE)
    out = str(tmp_path / "g.safetensors")
    code, _, err = run(capsys, "vace", "graft", old, files["module"], "-o", out)
    assert code == 1 and "already holds a VACE add-on" in err and "--replace" in err and not os.path.exists(out)
    code, out_text, err = run(capsys, "vace", "graft", old, files["module"], "-o", out, "--replace")
    assert code == 0, err
    assert "replaced the base's add-on" in out_text
    same(load_file(out), vace_state)


def _module_of(config, path) -> str:
    """A module file cut from a tiny VACE model of `config` (its placement recorded by extract)."""
    model = write_checkpoint(str(path) + ".model.safetensors", random_state_dict(config, seed=3), "original", config)
    assert run(None, "vace", "extract", model, "-o", str(path))[0] == 0
    return str(path)


@pytest.fixture(scope="module")
def misfits(files, tmp_path_factory):
    d = tmp_path_factory.mktemp("misfits")
    m = dict(files)
    m["wide_base"] = write_checkpoint(str(d / "wide.safetensors"), random_state_dict(TINY_128), "original", TINY_128)
    m["short_base"] = write_checkpoint(str(d / "short.safetensors"), random_state_dict(TINY), "original", TINY)
    i2v = PRESETS["tiny-i2v"]
    m["i2v_base"] = write_checkpoint(str(d / "i2v.safetensors"), random_state_dict(i2v), "original", i2v)
    narrow = replace(TINY_T2V, ffn_dim=48)
    m["ffn_base"] = write_checkpoint(str(d / "ffn48.safetensors"), random_state_dict(narrow), "original", narrow)
    heads = replace(TINY_T2V, num_heads=4)
    m["heads_base"] = write_checkpoint(str(d / "heads4.safetensors"), random_state_dict(heads), "original", heads)
    module = load_file(files["module"])
    save_file({k: v for k, v in module.items() if ".before_proj." not in k}, str(d / "no_before.safetensors"))
    m["no_before"] = str(d / "no_before.safetensors")
    m["three_blocks"] = _module_of(replace(TINY_VACE, vace_layers=(0, 1, 2)), d / "three.safetensors")
    m["odd_placement"] = _module_of(replace(TINY_VACE, vace_layers=(0, 1)), d / "odd.safetensors")
    save_file({"diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.ones(64, 4),
               "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.ones(4, 32)}, str(d / "lora.safetensors"))
    m["lora"] = str(d / "lora.safetensors")
    save_file({"encoder.conv.weight": torch.ones(4, 3)}, str(d / "other.safetensors"))
    m["other"] = str(d / "other.safetensors")
    m["out"] = str(d / "out.safetensors")
    m["d"] = str(d)
    return m


REFUSED = [
    (["graft", "{wide_base}", "{module}"], "gives width 32, the base {wide_base} has 256"),
    (["graft", "{ffn_base}", "{module}"], "gives ffn_dim 64, the base {ffn_base} has 48"),
    (["graft", "{heads_base}", "{module}"], "gives num_heads 2, the base {heads_base} has 4"),
    (["graft", "{base}", "{no_before}"], "{no_before}: has no vace_blocks.0.before_proj.weight"),
    (["graft", "{short_base}", "{three_blocks}"], "has 3 VACE blocks (vace_blocks.2), more than the 2 layers"),
    (["graft", "{short_base}", "{module}"], "puts vace_blocks.1 after layer 2, beyond the 2 layers (0-1)"),
    (["graft", "{base}", "{odd_placement}"], "follow layers [0, 1], but ComfyUI hangs 2 VACE blocks"),
    (["graft", "{i2v_base}", "{module}"], "is a Wan 2.1 I2V model"),
    (["graft", "{lora}", "{module}"], "{lora}: is not a Wan model or VACE module (first key blocks.0.ffn.0.lora_"),
    (["graft", "{base}", "{lora}"], "{lora}: is not a Wan model or VACE module"),
    (["graft", "{other}", "{module}"], "{other}: is not a Wan model or VACE module (first key encoder.conv.weight)"),
    (["graft", "{base}", "{other}"], "{other}: is not a Wan model or VACE module"),
    (["graft", "{module}", "{module}"], "{module}: is a VACE module, not a base model"),
    (["graft", "{base}", "{base}"], "{base}: holds no VACE add-on"),
    (["extract", "{base}"], "{base}: holds no VACE add-on"),
    (["extract", "{lora}"], "is not a Wan model or VACE module"),
    (["graft", "{base}", "{module}", "-o", "{module}"], "is the input"),
    (["graft", "{vace}", "{module}", "-o", "{vace}", "--replace"], "is the input"),
    (["extract", "{vace}", "-o", "{vace}"], "is the input"),
    (["extract", "{vace}", "-o", "{d}/module.pt"], "give a name ending in .safetensors"),
    (["graft", "{base}", "{module}", "-o", "{d}/grafted.pt"], "give a name ending in .safetensors"),
]


@pytest.mark.parametrize("args,message", REFUSED, ids=[f"{a[0]} #{i}" for i, (a, _) in enumerate(REFUSED)])
def test_what_cannot_fit_is_refused_in_one_line_writing_nothing(capsys, misfits, args, message):
    args = [a.format(**misfits) for a in args]
    if "-o" not in args:
        args += ["-o", misfits["out"]]
    inputs = [misfits[k] for k in ("vace", "base", "module", "no_before", "three_blocks", "wide_base")]
    before = {p: digest(p) for p in inputs}
    listings = {d: sorted(os.listdir(d)) for d in (misfits["dir"], misfits["d"])}
    code, out, err = run(capsys, "vace", *args)
    assert code == 1, (out, err)
    assert err.count("\n") == 1 and err.startswith("sftools: error:") and "Traceback" not in err
    assert message.format(**misfits) in err, err
    if "I2V" in message:
        assert "trained on T2V bases" in err
    assert {p: digest(p) for p in inputs} == before
    assert {d: sorted(os.listdir(d)) for d in listings} == listings


@pytest.mark.parametrize("args", [["graft", "{base}"], ["graft", "{base}", "{module}"], ["extract", "{vace}"],
                                  ["extract", "{vace}", "-o", "{out}", "--layout", "comfy"],
                                  ["extract", "{vace}", "-o", "{out}", "--dtype", "int4"]])
def test_usage_errors_exit_2(capsys, misfits, args):
    code, _, err = run(capsys, "vace", *[a.format(**misfits) for a in args])
    assert code == 2 and "Error" in err and "Traceback" not in err
    assert not os.path.exists(misfits["out"])


def shapes_only(path: str, shapes: dict[str, tuple[int, ...]]) -> Checkpoint:
    """Real-size weights as names and shapes only: fitting never reads a byte."""
    return Checkpoint(path, "safetensors", {n: LazyTensor(torch.bfloat16, s, lambda: None) for n, s in shapes.items()})


@pytest.mark.parametrize("module,base,expected", [
    (vace_shapes(PRESETS["vace-1.3B"]), "t2v-1.3B", tuple(range(0, 30, 2))),
    (vace_shapes(PRESETS["vace-14B"]), "t2v-14B", tuple(range(0, 40, 5))),
    (model_shapes(PRESETS["vace-14B"]), "t2v-14B", tuple(range(0, 40, 5))),  # a whole VACE model as MODULE
    (vace_shapes(PRESETS["vace-14B"]), "t2v-A14B", tuple(range(0, 40, 5))),  # shaped like Wan 2.1 T2V-14B
    (vace_shapes(PRESETS["vace-1.3B"]), "t2v-14B", "gives width 1536, the base base.safetensors has 5120"),
    (vace_shapes(PRESETS["vace-14B"]), "t2v-1.3B", "gives width 5120"),
    (vace_shapes(PRESETS["vace-14B"]), "i2v-14B", "is a Wan 2.1 I2V model"),
])
def test_real_sizes_fit_with_wans_placement_and_misfits_are_refused(module, base, expected):
    addon = addon_of("module.safetensors", shapes_only("module.safetensors", module))
    base_ckpt = shapes_only("base.safetensors", base_shapes(PRESETS[base]))
    if isinstance(expected, str):
        with pytest.raises(SftoolsError, match=expected):
            fit("base.safetensors", base_ckpt, addon, "module.safetensors")
        return
    own, config = fit("base.safetensors", base_ckpt, addon, "module.safetensors")
    assert set(own) == set(base_shapes(PRESETS[base])) and config.vace_layers == expected
    assert model_shapes(config) == {**base_shapes(PRESETS[base]), **vace_shapes(config)}
    assert len(own) + len(addon.tensors) == {30: 1264, 40: 1331}[config.num_layers]


def test_the_add_on_follows_the_base_unless_that_would_misalign_it():
    lazy = {n: LazyTensor(dtype, (n_values,), lambda: None)
            for n, dtype, n_values in [("a", torch.bfloat16, 3), ("b", torch.float32, 2)]}
    addon = {"vace_x": LazyTensor(torch.float32, (2,), lambda: None)}
    assert [n for n, _ in graft_order({"b": lazy["b"]}, addon)] == ["b", "vace_x"]
    # 6 bytes of bf16 would leave the fp32 add-on tensor at byte 14: one plan, widest elements first.
    assert [n for n, _ in graft_order(lazy, addon)] == ["b", "vace_x", "a"]


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


def test_help_and_usage_errors_answer_without_importing_torch():
    for args in (["vace", "--help"], ["vace", "graft", "--help"], ["vace", "extract", "x"]):
        r = subprocess.run([sys.executable, "-c", HELP_PROBE, *args], capture_output=True, text=True, timeout=60)
        assert r.stdout.strip().endswith("NO-TORCH"), r.stdout + r.stderr


def test_a_graft_keeps_the_bases_text_len(tmp_path, capsys, vace_state):
    from sftools.io.sources import open_checkpoint
    from sftools.wan.source import stored_config

    vace = write_checkpoint(str(tmp_path / "vace.safetensors"), vace_state, "original", TINY_VACE)
    base = write_checkpoint(str(tmp_path / "base.safetensors"), base_part(vace_state), "original",
                            replace(TINY_T2V, text_len=64))
    module, grafted = str(tmp_path / "m.safetensors"), str(tmp_path / "g.safetensors")
    assert run(capsys, "vace", "extract", vace, "-o", module)[0] == 0
    assert run(capsys, "vace", "graft", base, module, "-o", grafted)[0] == 0
    assert stored_config(open_checkpoint(grafted)) == replace(TINY_VACE, text_len=64)
