"""Wan 2.2: TI2V-5B and the A14B experts (high / low noise) are named, converted and extracted per
expert, checked against diffusers' own WanPipeline with `transformer_2` and `boundary_ratio`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file

from cli_runner import completed as run  # in this process: what subprocess.run gives
from sftools.convert import convert_model as convert
from sftools.errors import SftoolsError
from sftools.inspection import inspect_file
from sftools.io.sources import open_checkpoint
from sftools.lora.extract import extract_experts_to_folder, extract_to_file
from sftools.lora.merge import merge
from sftools.lora.settings import ExtractSettings, RankRule
from sftools.wan.config import PRESETS, diffusers_config, model_shapes
from sftools.wan.detect import describe_weights as describe
from sftools.wan.experts import expert_from_name
from sftools.wan.keys import original_to_diffusers
from sftools.wan.source import load_model
from sftools.wan.tiny import perturbed, random_state_dict, write_a14b, write_checkpoint

T2V, I2V, TI2V = PRESETS["tiny-t2v-a14b"], PRESETS["tiny-i2v-a14b"], PRESETS["tiny-ti2v"]
SETTINGS = ExtractSettings(rank=RankRule(rank=4), dtype="fp32")


def experts(config, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    return {"high_noise": random_state_dict(config, seed=seed), "low_noise": random_state_dict(config, seed=seed + 1)}


def tuned(states: dict) -> dict:
    return {e: perturbed(s, rank=None, seed=i + 5) for i, (e, s) in enumerate(states.items())}


def bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


@pytest.mark.parametrize("preset,title,tensors,params", [
    ("ti2v-5B", "wan2.2 ti2v 5B", 825, 4_999_787_712),
    ("i2v-A14B", "wan2.2 i2v A14B", 1095, 14_288_901_184),
])
def test_real_wan22_shapes_are_named_in_both_layouts(preset, title, tensors, params):
    shapes = model_shapes(PRESETS[preset])
    assert len(shapes) == tensors and sum(math.prod(s) for s in shapes.values()) == params
    for layout_shapes in (shapes, {original_to_diffusers(shapes)[k]: v for k, v in shapes.items()}):
        d = describe(layout_shapes)
        assert d.title == title and d.config == PRESETS[preset]
        assert d.details["missing"] == d.details["unexpected"] == d.details["mismatched"] == []


def test_a_t2v_expert_is_told_from_wan21_only_by_its_name_and_i2v_by_its_missing_clip_keys():
    t2v = model_shapes(PRESETS["t2v-A14B"])
    assert describe(t2v).title == "wan2.1 t2v 14B"  # shape-identical: nothing else can tell
    named = describe(t2v, name="split_files/wan2.2_t2v_high_noise_14B_fp16.safetensors")
    assert named.title == "wan2.2 t2v A14B high_noise expert" and named.config == PRESETS["t2v-A14B"]
    assert describe(model_shapes(PRESETS["i2v-A14B"]), name="Wan2.2-I2V-A14B/low_noise_model").expert == "low_noise"
    wan21 = describe(model_shapes(PRESETS["i2v-14B"]), name="i2v_high_noise.safetensors")
    assert (wan21.title, wan21.expert) == ("wan2.1 i2v 14B", "")  # CLIP keys: Wan 2.1 whatever the name
    assert diffusers_config(PRESETS["i2v-A14B"])["image_dim"] is None
    assert diffusers_config(PRESETS["i2v-A14B"])["added_kv_proj_dim"] is None
    assert diffusers_config(PRESETS["ti2v-5B"])["in_channels"] == diffusers_config(PRESETS["ti2v-5B"])["out_channels"] == 48


@pytest.mark.parametrize("path,expert", [
    ("Wan2.2-T2V-A14B/high_noise_model", "high_noise"),
    ("Wan2.2-T2V-A14B/low_noise_model/diffusion_pytorch_model-00001-of-00006.safetensors", "low_noise"),
    ("wan2.2_i2v_A14b_low_noise_lora_rank64_lightx2v_4step_1022.safetensors", "low_noise"),
    ("low_noise_runs/model_high-noise.safetensors", "high_noise"),
    ("both_high_noise_low_noise.safetensors", None),
    ("Wan2.1-T2V-14B/diffusion_pytorch_model.safetensors", None),
])
def test_expert_names(path, expert):
    assert expert_from_name(path) == expert


def test_ti2v_file_and_i2v_expert_are_inspected_as_wan22(tmp_path):
    ti2v = write_checkpoint(str(tmp_path / "ti2v.safetensors"), random_state_dict(TI2V), "original", TI2V)
    i2v = write_checkpoint(str(tmp_path / "expert.safetensors"), random_state_dict(I2V), "comfyui", I2V)
    wan21 = PRESETS["tiny-i2v"]
    old = write_checkpoint(str(tmp_path / "old_high_noise.safetensors"), random_state_dict(wan21), "original", wan21)
    assert inspect_file(ti2v)["kind"] == "wan2.2 ti2v" and inspect_file(ti2v)["config"]["out_dim"] == 48
    assert (inspect_file(i2v)["kind"], inspect_file(i2v).get("expert")) == ("wan2.2 i2v", None)
    assert inspect_file(old)["kind"] == "wan2.1 i2v"
    r = run("inspect", ti2v)
    assert r.returncode == 0 and "wan2.2 ti2v" in r.stdout.splitlines()[0], r.stderr


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_a14b_folder_is_inspected_as_one_model_naming_both_experts(tmp_path, layout):
    folder = write_a14b(str(tmp_path / "Wan2.2-T2V-A14B"), experts(T2V), layout, T2V, shards=2)
    info = inspect_file(folder)
    assert (info["kind"], info["task"], info["layout"]) == ("wan2.2 t2v", "t2v", layout)
    assert set(info["experts"]) == {"high_noise", "low_noise"}
    for expert, part in info["experts"].items():
        assert (part["kind"], part["expert"], part["missing"]) == ("wan2.2 t2v", expert, [])
    assert info["tensors"] == 2 * len(model_shapes(T2V))
    r = run("inspect", folder, *(["--json"] if layout == "original" else []))
    assert r.returncode == 0, r.stderr
    if layout == "original":
        assert json.loads(r.stdout)["experts"]["low_noise"]["expert"] == "low_noise"
    else:
        first, *rest = r.stdout.splitlines()
        assert "wan2.2 t2v" in first and "experts: high_noise, low_noise" in first
        assert any(line.startswith("  high_noise: ") for line in rest) and any("  low_noise: " in line for line in rest)
    with pytest.raises(SftoolsError, match="holds two Wan 2.2 A14B experts; name one"):
        load_model(folder)  # commands taking one model never read one expert silently


@pytest.mark.parametrize("config", [T2V, I2V], ids=["t2v", "i2v"])
def test_a14b_converts_to_diffusers_experts_that_load_strictly_and_back_bit_exact(tmp_path, config):
    states = experts(config)
    src = write_a14b(str(tmp_path / "Wan2.2-A14B"), states, "original", config, shards=2)
    out = tmp_path / "out"
    report = convert(src, str(out), layout="diffusers")
    assert set(report["experts"]) == {"high_noise", "low_noise"} and report["task"] == config.model_type
    for expert, sub in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
        assert json.loads((out / sub / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
        model = WanTransformer3DModel.from_pretrained(str(out), subfolder=sub, local_files_only=True)
        loaded, names = model.state_dict(), original_to_diffusers(states[expert])
        assert set(loaded) == set(names.values())  # strict: nothing missing, nothing unexpected
        for k, v in states[expert].items():
            assert torch.equal(loaded[names[k]], v), k
    back = tmp_path / "back"
    convert(str(out), str(back))  # a diffusers pipeline folder with transformer_2 is an A14B folder too
    for expert in states:
        sub = back / f"{expert}_model"
        assert json.loads((sub / "config.json").read_text())["model_type"] == config.model_type
        bits_equal({n: t.load() for n, t in open_checkpoint(str(sub)).tensors.items()}, states[expert])


@pytest.mark.parametrize("config,name", [(TI2V, "ti2v_5B.safetensors"), (I2V, "wan2.2_i2v_high_noise.safetensors")])
def test_single_expert_and_ti2v_files_convert_both_ways_bit_exact(tmp_path, config, name):
    state = random_state_dict(config, seed=3)
    src = write_checkpoint(str(tmp_path / name), state, "original", config)
    folder = tmp_path / "d"
    convert(src, str(folder), layout="diffusers")
    model = WanTransformer3DModel.from_pretrained(str(folder), local_files_only=True)
    assert (model.config.in_channels, model.config.out_channels) == (config.in_dim, config.out_dim)
    assert model.config.added_kv_proj_dim is None and set(model.state_dict()) == set(original_to_diffusers(state).values())
    convert(str(folder), str(tmp_path / "back.safetensors"))
    bits_equal(load_file(str(tmp_path / "back.safetensors")), state)


def test_a14b_conversion_refuses_a_file_destination_and_its_own_input(tmp_path):
    src = write_a14b(str(tmp_path / "A14B"), experts(T2V), "original", T2V)
    r = run("convert", src, str(tmp_path / "out.safetensors"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "give a folder as DST" in r.stderr
    with pytest.raises(SftoolsError, match="holds the input"):
        convert(src, str(tmp_path), layout="diffusers")
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "transformer").exists()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Two tiny T2V-A14B folders (base, distilled) and the per-expert LoRAs sftools extracts from them."""
    root = tmp_path_factory.mktemp("a14b")
    base_states = experts(T2V)
    tuned_states = tuned(base_states)
    base = write_a14b(str(root / "Wan2.2-T2V-A14B"), base_states, "original", T2V, shards=2)
    tuned_folder = write_a14b(str(root / "Wan2.2-T2V-A14B-distill"), tuned_states, "diffusers", T2V)
    reports = extract_experts_to_folder(base, tuned_folder, str(root / "loras"), SETTINGS,
                                        report_path=str(root / "report.json"))
    return root, base_states, reports


def test_each_expert_lora_equals_extracting_that_pair_alone_bit_for_bit(extracted):
    root, _, reports = extracted
    assert sorted(p.name for p in (root / "loras").iterdir()) == [
        "Wan2.2-T2V-A14B-distill_high_noise_lora.safetensors", "Wan2.2-T2V-A14B-distill_low_noise_lora.safetensors"]
    for expert, sub in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
        alone = root / f"{expert}_alone.safetensors"
        extract_to_file(str(root / "Wan2.2-T2V-A14B" / f"{expert}_model"), str(root / "Wan2.2-T2V-A14B-distill" / sub),
                        str(alone), SETTINGS)
        assert alone.read_bytes() == (root / "loras" / f"Wan2.2-T2V-A14B-distill_{expert}_lora.safetensors").read_bytes()
    report = json.loads((root / "report.json").read_text())
    assert set(report["experts"]) == {"high_noise", "low_noise"} and report["experts"]["low_noise"]["layers"]


def test_wan_pipeline_takes_the_high_lora_and_the_low_one_into_transformer_2_as_sftools_merges_them(extracted):
    root, base_states, reports = extracted
    pipeline_dir = root / "pipeline"
    convert(str(root / "Wan2.2-T2V-A14B"), str(pipeline_dir), layout="diffusers")
    kwargs = {"subfolder": "transformer", "local_files_only": True}
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=12.0),
        vae=AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True]),
        transformer=WanTransformer3DModel.from_pretrained(str(pipeline_dir), **kwargs),
        transformer_2=WanTransformer3DModel.from_pretrained(str(pipeline_dir), **{**kwargs, "subfolder": "transformer_2"}),
        boundary_ratio=0.875,
    )
    pipe.load_lora_weights(reports["high_noise"].output, adapter_name="high")
    pipe.load_lora_weights(reports["low_noise"].output, adapter_name="low", load_into_transformer_2=True)
    pipe.fuse_lora(components=["transformer", "transformer_2"], lora_scale=1.0)
    pipe.unload_lora_weights()
    for expert, module in (("high_noise", pipe.transformer), ("low_noise", pipe.transformer_2)):
        ours = root / f"merged_{expert}.safetensors"
        merge(str(root / "Wan2.2-T2V-A14B" / f"{expert}_model"), [(reports[expert].output, 1.0)], str(ours))
        merged, fused = load_file(str(ours)), module.state_dict()
        base = base_states[expert]
        names = original_to_diffusers(base)
        linear = [n for n in base if base[n].dim() == 2]
        for name in linear + [n[: -len("weight")] + "bias" for n in linear]:  # what diffusers applies
            assert torch.allclose(fused[names[name]], merged[name], rtol=1e-5, atol=1e-6), (expert, name)
            assert not torch.equal(fused[names[name]], base[name]), (expert, name)


def test_crossed_or_mixed_expert_inputs_are_refused_in_one_line(tmp_path):
    base_states = experts(T2V)
    tuned_states = tuned(base_states)
    high = write_checkpoint(str(tmp_path / "wan2.2_t2v_high_noise_14B.safetensors"), base_states["high_noise"], "original", T2V)
    low = write_checkpoint(str(tmp_path / "distill_low_noise.safetensors"), tuned_states["low_noise"], "original", T2V)
    r = run("lora", "extract", high, low, "-o", str(tmp_path / "x.safetensors"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "is the high_noise expert but" in r.stderr
    folder = write_a14b(str(tmp_path / "A14B"), base_states, "original", T2V)
    tuned_folder = write_a14b(str(tmp_path / "A14B-distill"), tuned_states, "original", T2V)
    with pytest.raises(SftoolsError, match="holds two A14B experts but .* is one model"):
        extract_experts_to_folder(folder, low, str(tmp_path / "loras"))
    with pytest.raises(SftoolsError, match="-o names a folder"):
        extract_experts_to_folder(folder, tuned_folder, str(tmp_path / "x.safetensors"))
    with pytest.raises(SftoolsError, match="is inside the input"):
        extract_experts_to_folder(folder, tuned_folder, str(tmp_path / "A14B" / "loras"))
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "loras").exists()
