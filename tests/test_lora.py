"""LoRA extraction, merge, resize and forms on tiny Wan models, checked against exact linear algebra
and against diffusers' own Wan LoRA loader."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli_runner import completed
from sftools.errors import SettingsError, SftoolsError
from sftools.io.sources import open_checkpoint
from sftools.lora.extract import extract
from sftools.lora.settings import ExtractSettings, RankRule, Selection, SvdSettings
from sftools.lora.forms import Lora, read_lora, write_lora
from sftools.lora.merge import merge, parse_lora_arg
from sftools.lora.resize import resize
from sftools.wan.config import PRESETS, TINY, diffusers_config
from sftools.wan.keys import original_to_diffusers
from sftools.wan.tiny import perturbed, random_state_dict, write_checkpoint


def planted(seed: int = 1, rank: int | None = 3, scale: float = 0.05, config=TINY) -> tuple[dict, dict]:
    """Base and tuned states: low-rank (or full-rank, rank=None) changes on Linear weights, small dense
    changes on biases, norms and modulation, patch_embedding.bias left unchanged."""
    base = random_state_dict(config, seed=0)
    return base, perturbed(base, rank, scale, seed)


def write_pair(tmp_path, base, tuned, base_layout="original", tuned_layout="original", config=TINY) -> tuple[str, str]:
    names = {"original": "{}.safetensors", "comfyui": "{}_comfy.safetensors", "diffusers": "{}_diffusers",
             "self-forcing": "{}.pt"}
    b = write_checkpoint(str(tmp_path / names[base_layout].format("base")), base, base_layout, config)
    t = write_checkpoint(str(tmp_path / names[tuned_layout].format("tuned")), tuned, tuned_layout, config)
    return b, t


def rel(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / ref.double().norm())


def test_planted_low_rank_difference_is_recovered_to_float_precision(tmp_path):
    base, tuned = planted(rank=3)
    b, t = write_pair(tmp_path, base, tuned)
    for method in ("randomized", "exact"):
        lora, report = extract(b, t, ExtractSettings(rank=RankRule(rank=4), svd=SvdSettings(method=method), dtype="fp32"))
        assert report.summary["unchanged"] == 1 and report.summary["lora_modules"] == 26
        for layer in report.layers:
            assert layer.rel_error < 1e-5, (method, layer)
        for name in base:
            if name in lora.params:
                merged = base[name] + lora.delta(name, base[name].shape)
                assert rel(merged, tuned[name], tuned[name] - base[name]) < 1e-5, name
        assert "patch_embedding.bias" not in lora.params


def test_extract_then_merge_reproduces_tuned_within_the_reported_error(tmp_path):
    base, tuned = planted(rank=None)  # full-rank changes: rank 4 loses a lot, and says how much
    b, t = write_pair(tmp_path, base, tuned)
    lora, report = extract(b, t, ExtractSettings(rank=RankRule(rank=4), dtype="bf16"))
    out = str(tmp_path / "lora.safetensors")
    write_lora(out, lora, "comfyui", torch.bfloat16, report.metadata())
    merged_path = str(tmp_path / "merged.safetensors")
    merge(b, [(out, 1.0)], merged_path)
    merged = load_file(merged_path)
    for layer in report.layers:
        name = layer.name
        actual = rel(merged[name], tuned[name], tuned[name] - base[name])
        assert actual == pytest.approx(layer.rel_error, rel=1e-3, abs=1e-6), name
    assert 0.5 < report.summary["weighted_rel_error"] < 1.0


def test_exact_path_error_is_the_optimal_truncation_and_randomized_is_within_1_percent(tmp_path):
    base = random_state_dict(TINY, seed=0)
    gen = torch.Generator().manual_seed(5)
    tuned = dict(base)
    for name in ("blocks.0.ffn.0.weight", "blocks.1.self_attn.q.weight"):
        m, n = base[name].shape
        u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen))
        v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen))
        s = torch.exp(-torch.arange(min(m, n)) / 3.0)  # a decaying spectrum
        tuned[name] = base[name] + (u * s) @ v.T
    b, t = write_pair(tmp_path, base, tuned)
    _, exact = extract(b, t, ExtractSettings(rank=RankRule(rank=4), svd=SvdSettings(method="exact"), dtype="fp32"))
    _, fast = extract(b, t, ExtractSettings(rank=RankRule(rank=4), dtype="fp32"))
    for e, f in zip(exact.layers, fast.layers):
        delta = (tuned[e.name] - base[e.name]).double()
        sv = torch.linalg.svdvals(delta)
        optimal = float(sv[4:].square().sum().sqrt() / delta.norm())
        assert e.optimal_rel_error == pytest.approx(optimal, rel=1e-4)
        assert e.rel_error == pytest.approx(optimal, rel=1e-4)
        assert f.rel_error <= 1.01 * optimal


def test_energy_mode_keeps_the_smallest_rank_reaching_the_fraction_capped_by_rank(tmp_path):
    base = random_state_dict(TINY, seed=0)
    name = "blocks.0.self_attn.o.weight"
    gen = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen))
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5] + [0.01] * 27)
    tuned = dict(base)
    tuned[name] = base[name] + (u * s) @ v.T
    b, t = write_pair(tmp_path, base, tuned)
    energy = (s.double() ** 2).cumsum(0) / (s.double() ** 2).sum()
    for fraction, cap in ((0.9, 32), (0.99, 32), (0.999, 32), (0.999, 3)):
        expected = min(cap, int(torch.nonzero(energy >= fraction)[0]) + 1)  # no kohya +1
        _, report = extract(b, t, ExtractSettings(rank=RankRule(rank=cap, mode="energy", energy=fraction), svd=SvdSettings(method="exact")))
        assert report.layers[0].rank == expected, (fraction, cap)
    # by hand: energies 64, 16, 4, 1, 0.25 (+27e-4) of 85.2527 -> cumulative 0.751, 0.938, 0.985, 0.997, 1.000
    assert [min(32, int(torch.nonzero(energy >= f)[0]) + 1) for f in (0.9, 0.99, 0.999)] == [2, 4, 5]


def test_same_seed_gives_an_identical_file(tmp_path):
    base, tuned = planted(rank=None)
    b, t = write_pair(tmp_path, base, tuned)
    outs = []
    for i in range(2):
        lora, report = extract(b, t, ExtractSettings(rank=RankRule(rank=4), svd=SvdSettings(seed=7)))
        outs.append(tmp_path / f"l{i}.safetensors")
        write_lora(str(outs[-1]), lora, "comfyui", torch.bfloat16, {"seed": "7"})
    assert outs[0].read_bytes() == outs[1].read_bytes()
    other, _ = extract(b, t, ExtractSettings(rank=RankRule(rank=4), svd=SvdSettings(seed=8)))
    name = "blocks.0.ffn.0.weight"
    assert not torch.equal(other.factors[name][0], lora.factors[name][0])  # the seed is used


def diffusers_fused(lora_path: str, base: dict[str, torch.Tensor], config=TINY) -> dict[str, torch.Tensor]:
    """Load a LoRA file with diffusers' own WanPipeline.load_lora_weights, fuse it, return original-named weights."""
    kwargs = diffusers_config(config)
    kwargs.pop("_class_name")
    transformer = WanTransformer3DModel(**kwargs)
    names = original_to_diffusers(base)
    transformer.load_state_dict({names[k]: v for k, v in base.items()})
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.load_lora_weights(lora_path, adapter_name="extracted")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    return {k: fused[names[k]] for k in base}


@pytest.mark.parametrize("form", ["comfyui", "diffusers"])
def test_output_loads_through_diffusers_wan_lora_loader_and_fused_weights_match_our_merge(tmp_path, form):
    base, tuned = planted(rank=None)
    b, t = write_pair(tmp_path, base, tuned)
    lora, report = extract(b, t, ExtractSettings(rank=RankRule(rank=4), dtype="fp32"))
    out = str(tmp_path / f"{form}.safetensors")
    dropped = write_lora(out, lora, form, torch.float32, report.metadata())
    merge(b, [(out, 1.0)], str(tmp_path / "ours.safetensors"))
    ours = load_file(str(tmp_path / "ours.safetensors"))
    fused = diffusers_fused(out, base)
    linear = [n for n in base if base[n].dim() == 2]
    biases = [n[: -len("weight")] + "bias" for n in linear]
    for name in linear + biases:  # what diffusers applies: factors and their biases
        assert torch.allclose(fused[name], ours[name], rtol=1e-5, atol=1e-6), name
        assert not torch.equal(fused[name], base[name]), name
    # dense diffs of norms and modulation: diffusers has no place for them, by its design
    assert "blocks.0.modulation" in lora.diffs and torch.equal(fused["blocks.0.modulation"], base["blocks.0.modulation"])
    if form == "diffusers":
        assert "blocks.0.modulation" in dropped and "blocks.0.self_attn.q.bias" not in dropped
        with safe_open(out, "pt") as f:
            config = json.loads(f.metadata()["lora_adapter_metadata"])
        assert config["transformer.r"] == 4 and config["transformer.lora_bias"] is True


def test_inputs_in_mixed_layouts_pair_by_original_name(tmp_path):
    base, tuned = planted(rank=None)
    b1, t1 = write_pair(tmp_path, base, tuned)
    b2, t2 = write_pair(tmp_path, base, tuned, base_layout="diffusers", tuned_layout="self-forcing")
    a, report_a = extract(b1, t1, ExtractSettings(rank=RankRule(rank=4)))
    c, report_c = extract(b2, t2, ExtractSettings(rank=RankRule(rank=4)))
    assert set(a.factors) == set(c.factors) and set(a.diffs) == set(c.diffs)
    assert (report_a.base_fingerprint, report_a.tuned_fingerprint) == \
        (report_c.base_fingerprint, report_c.tuned_fingerprint)  # the same weights, another layout
    assert report_a.base_fingerprint != report_a.tuned_fingerprint
    for name, (up, down) in a.factors.items():
        assert torch.equal(up, c.factors[name][0]) and torch.equal(down, c.factors[name][1])


def test_fp8_scaled_base_is_dequantized_before_differencing(tmp_path):
    base, _ = planted()
    scales = {n: (w.abs().max() / 448.0).reshape(()) for n, w in base.items() if w.dim() == 2}
    fp8 = {n: (w / scales[n]).to(torch.float8_e4m3fn) if n in scales else w for n, w in base.items()}
    dequant = {n: fp8[n].float() * scales[n] if n in scales else w for n, w in base.items()}
    gen = torch.Generator().manual_seed(3)
    tuned = {n: w + 0.05 * torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)
             if w.dim() == 2 else w.clone() for n, w in dequant.items()}
    stored = {**fp8, **{n[: -len(".weight")] + ".scale_weight": s for n, s in scales.items()},
              "scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    save_file(stored, str(tmp_path / "base_fp8.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    _, report = extract(str(tmp_path / "base_fp8.safetensors"), str(tmp_path / "tuned.safetensors"),
                        ExtractSettings(rank=RankRule(rank=2), dtype="fp32"))
    assert report.summary["lora_modules"] == len(scales) and report.summary["full_diffs"] == 0
    assert report.summary["max_rel_error"] < 1e-5


@pytest.mark.parametrize("suffix,per_channel", [(".scale_weight", True), (".weight_scale", False)])
def test_fp8_scales_per_channel_and_in_kijais_spelling_are_applied(tmp_path, suffix, per_channel):
    base, _ = planted()
    linear = [n for n, w in base.items() if w.dim() == 2]
    scales = {n: (base[n].abs().amax(1) if per_channel else base[n].abs().max()) / 448.0 for n in linear}
    shaped = {n: s[:, None] if per_channel else s for n, s in scales.items()}
    fp8 = {n: (w / shaped[n]).to(torch.float8_e4m3fn) if n in scales else w for n, w in base.items()}
    dequant = {n: fp8[n].float() * shaped[n] if n in scales else w for n, w in base.items()}
    gen = torch.Generator().manual_seed(3)
    tuned = {n: w + 0.05 * torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)
             if n in scales else w.clone() for n, w in dequant.items()}
    save_file({**fp8, **{n[: -len(".weight")] + suffix: s.reshape(-1) if per_channel else s.reshape(())
                         for n, s in scales.items()}}, str(tmp_path / "base_fp8.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    _, report = extract(str(tmp_path / "base_fp8.safetensors"), str(tmp_path / "tuned.safetensors"),
                        ExtractSettings(rank=RankRule(rank=2), dtype="fp32"))
    assert report.summary["lora_modules"] == len(linear) and report.summary["max_rel_error"] < 1e-5


def test_loras_identical_models_and_non_wan_files_are_refused_as_inputs(tmp_path):
    base, tuned = planted()
    b, t = write_pair(tmp_path, base, tuned)
    lora, report = extract(b, t, ExtractSettings(rank=RankRule(rank=4)))
    write_lora(str(tmp_path / "l.safetensors"), lora, "comfyui", torch.bfloat16, {})
    with pytest.raises(SftoolsError, match="is a LoRA, not a model"):
        extract(str(tmp_path / "l.safetensors"), t, ExtractSettings())
    with pytest.raises(SftoolsError, match="nothing to extract"):
        extract(b, b, ExtractSettings())
    save_file({"encoder.conv.weight": torch.ones(2, 2)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(SftoolsError, match="is not a Wan 2.1 transformer"):
        extract(str(tmp_path / "vae.safetensors"), str(tmp_path / "vae.safetensors"), ExtractSettings())


def test_selections_diffusers_cannot_load_are_reported(tmp_path):
    from sftools.lora.check import check_keys
    from sftools.lora.forms import lora_tensors
    from sftools.lora.loaders import LOADERS

    def diffusers_refusal(lora: Lora) -> str | None:
        tensors = lora_tensors(lora, "comfyui")[0]
        return check_keys({k: tuple(v.shape) for k, v in tensors.items()}, LOADERS["diffusers"]).refused

    base, tuned = planted()
    b, t = write_pair(tmp_path, base, tuned)
    full, _ = extract(b, t, ExtractSettings(rank=RankRule(rank=4)))
    assert diffusers_refusal(full) is None
    head_only, _ = extract(b, t, ExtractSettings(rank=RankRule(rank=4), selection=Selection(include=r"^head\.")))
    assert "blocks.N keys" in diffusers_refusal(head_only)
    no_text, _ = extract(b, t, ExtractSettings(rank=RankRule(rank=4), selection=Selection(exclude=r"^text_embedding\.0\.weight$")))
    assert diffusers_refusal(no_text).startswith("diffusion_model.text_embedding.0.diff_b: text_embedding/time_embedding "
                                                 "factors are read whenever the module has a key (KeyError)")


def test_different_model_kinds_and_shapes_are_refused_before_any_work(tmp_path):
    i2v = PRESETS["tiny-i2v"]
    b = write_checkpoint(str(tmp_path / "t2v.safetensors"), random_state_dict(TINY), "original")
    t = write_checkpoint(str(tmp_path / "i2v.safetensors"), random_state_dict(i2v), "original", i2v)
    with pytest.raises(SftoolsError, match="different kinds"):
        extract(b, t, ExtractSettings())
    wider = random_state_dict(TINY)
    wider["blocks.0.ffn.0.weight"] = torch.zeros(65, 32)
    save_file(wider, str(tmp_path / "wider.safetensors"))
    with pytest.raises(SftoolsError, match=r"blocks.0.ffn.0.weight: base shape \[64, 32\] but tuned shape \[65, 32\]"):
        extract(b, str(tmp_path / "wider.safetensors"), ExtractSettings())


def test_patterns_and_no_full_diffs_select_what_is_extracted(tmp_path):
    base, tuned = planted()
    b, t = write_pair(tmp_path, base, tuned)
    lora, report = extract(b, t, ExtractSettings(rank=RankRule(rank=4), selection=Selection(exclude=r"\.ffn\.", full_diffs=False)))
    assert lora.diffs == {} and lora.factors and not [p for p in lora.factors if ".ffn." in p]
    assert report.summary["excluded"] == 4 + 43  # 4 ffn weights, 43 dense tensors (1 unchanged among them)
    lora, _ = extract(b, t, ExtractSettings(rank=RankRule(rank=4), selection=Selection(include=r"^blocks\.1\.self_attn\.q\.")))
    assert sorted(lora.params) == ["blocks.1.self_attn.q.bias", "blocks.1.self_attn.q.weight"]


def test_resize_equals_the_best_lower_rank_approximation_of_the_product():
    gen = torch.Generator().manual_seed(4)
    up, down = torch.randn(48, 8, generator=gen), torch.randn(8, 32, generator=gen)
    lora = Lora(factors={"blocks.0.ffn.0.weight": (up, down)}, diffs={"blocks.0.norm3.weight": torch.ones(32)})
    smaller, layers = resize(lora, RankRule(rank=3))
    product = (up @ down).double()
    u, s, vh = torch.linalg.svd(product)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    new_up, new_down = smaller.factors["blocks.0.ffn.0.weight"]
    assert new_down.shape == (3, 32)
    assert torch.allclose((new_up @ new_down).double(), best, atol=1e-4)
    assert layers[0].rel_error == pytest.approx(float(s[3:].square().sum().sqrt() / s.square().sum().sqrt()), rel=1e-4)
    assert torch.equal(smaller.diffs["blocks.0.norm3.weight"], torch.ones(32))
    by_energy, layers = resize(lora, RankRule(rank=None, mode="energy", energy=0.999))
    energy = (s ** 2).cumsum(0) / (s ** 2).sum()
    assert layers[0].rank == int(torch.nonzero(energy >= 0.999)[0]) + 1


def test_forms_round_trip_and_kohya_and_lightx2v_files_are_read(tmp_path):
    base, tuned = planted()
    b, t = write_pair(tmp_path, base, tuned)
    lora, report = extract(b, t, ExtractSettings(rank=RankRule(rank=4), dtype="fp32"))
    write_lora(str(tmp_path / "d.safetensors"), lora, "diffusers", torch.float32, {})
    back = read_lora(open_checkpoint(str(tmp_path / "d.safetensors")))
    for name, (up, down) in lora.factors.items():
        assert torch.allclose(back.delta(name, base[name].shape), up @ down, atol=1e-7)
    gen = torch.Generator().manual_seed(6)
    up, down = torch.randn(32, 4, generator=gen), torch.randn(4, 32, generator=gen)
    kohya = {"lora_unet_blocks_0_cross_attn_k_img.lora_up.weight": up,
             "lora_unet_blocks_0_cross_attn_k_img.lora_down.weight": down,
             "lora_unet_blocks_0_cross_attn_k_img.alpha": torch.tensor(8.0),
             "lora_unet_time_projection_1.lora_up.weight": torch.randn(192, 4, generator=gen),
             "lora_unet_time_projection_1.lora_down.weight": down.clone()}
    save_file(kohya, str(tmp_path / "k.safetensors"))
    k = read_lora(open_checkpoint(str(tmp_path / "k.safetensors")))
    assert torch.allclose(k.delta("blocks.0.cross_attn.k_img.weight", (32, 32)), 2.0 * up @ down)  # alpha 8 / rank 4
    assert "time_projection.1.weight" in k.factors
    lightx2v = {"diffusion_model.blocks.1.diff_m": torch.ones(1, 6, 32), "diffusion_model.head.diff_m": torch.ones(1, 2, 32),
                "diffusion_model.head.head.diff": torch.ones(64, 32)}
    save_file(lightx2v, str(tmp_path / "x.safetensors"))
    x = read_lora(open_checkpoint(str(tmp_path / "x.safetensors")))
    assert sorted(x.diffs) == ["blocks.1.modulation", "head.head.weight", "head.modulation"]


def test_diffusers_form_alpha_scales_factors_and_bias_like_peft(tmp_path):
    gen = torch.Generator().manual_seed(7)
    a, bm, bias = torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen), torch.randn(32, generator=gen)
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": a, "transformer.blocks.0.attn1.to_q.lora_B.weight": bm,
               "transformer.blocks.0.attn1.to_q.lora_B.bias": bias}, str(tmp_path / "d.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})})
    lora = read_lora(open_checkpoint(str(tmp_path / "d.safetensors")))
    assert torch.allclose(lora.delta("blocks.0.self_attn.q.weight", (32, 32)), 2.0 * bm @ a)
    assert torch.allclose(lora.diffs["blocks.0.self_attn.q.bias"], 2.0 * bias)


def test_rank_rules_refuse_meaningless_targets():
    for kwargs in ({"rank": 0}, {"rank": None}, {"rank": None, "mode": "energy", "energy": 0.0},
                   {"rank": None, "mode": "energy", "energy": 1.5}, {"mode": "most"}):
        with pytest.raises(SettingsError, match="--rank|--energy|--rank-mode"):
            RankRule(**kwargs)


def test_lora_strength_argument_parsing():
    assert parse_lora_arg("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("dir:with:colons/a.safetensors:2") == ("dir:with:colons/a.safetensors", 2.0)


def test_merge_applies_strength_and_refuses_loras_for_another_model(tmp_path):
    base, tuned = planted(rank=3)
    b, t = write_pair(tmp_path, base, tuned)
    lora, report = extract(b, t, ExtractSettings(rank=RankRule(rank=3), dtype="fp32"))
    out = str(tmp_path / "l.safetensors")
    write_lora(out, lora, "comfyui", torch.float32, {})
    merge(b, [(out, 0.5)], str(tmp_path / "half.safetensors"))
    half = load_file(str(tmp_path / "half.safetensors"))
    name = "blocks.0.ffn.2.weight"
    assert torch.allclose(half[name], base[name] + 0.5 * (tuned[name] - base[name]), atol=1e-6)
    save_file({"diffusion_model.blocks.9.self_attn.q.diff_b": torch.ones(32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SftoolsError, match="targets blocks.9.self_attn.q.bias"):
        merge(b, [(str(tmp_path / "other.safetensors"), 1.0)], str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_extracts_with_a_report_and_refuses_bad_input_in_one_line(tmp_path):
    base, tuned = planted()
    b, t = write_pair(tmp_path, base, tuned, tuned_layout="self-forcing")
    out, report = tmp_path / "l.safetensors", tmp_path / "r.json"
    r = completed("lora", "extract", b, t, "-o", str(out), "--rank", "4", "--report", str(report))
    assert r.returncode == 0, r.stderr
    assert "26 LoRA modules (rank 4), 42 full diffs, 1 unchanged" in r.stdout
    data = json.loads(report.read_text())
    assert {"name", "rank", "rel_error", "optimal_rel_error"} <= set(data["layers"][0])
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["sftools.lora.rank"] == "4" and meta["sftools.lora.tuned_fingerprint"] == data["tuned_fingerprint"]
    assert all(k.startswith("diffusion_model.") for k in keys) and not any(k.endswith(".alpha") for k in keys)
    bad = completed("lora", "extract", b, b, "-o", str(tmp_path / "x.safetensors"))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "nothing to extract" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


def comfyui_loaded_keys(lora_keys: set[str], model_shapes: dict[str, tuple]) -> dict[str, str]:
    """ComfyUI's documented matching (reference/lora_extraction.md §4.1, comfy/lora.py): every model
    key `diffusion_model.X.weight` is reachable as `diffusion_model.X` (and `lora_unet_X_with_underscores`),
    any other parameter by its full key; `load_lora` then consumes `<x>.lora_up/.lora_down.weight`,
    `<x>.alpha`, `<x>.diff` and `<x>.diff_b` (the bias of the same module). Returns lora key -> model key."""
    key_map = {}
    for name in model_shapes:
        full = f"diffusion_model.{name}"
        if name.endswith(".weight"):
            key_map[full[: -len(".weight")]] = full
            key_map["lora_unet_" + name[: -len(".weight")].replace(".", "_")] = full
        else:
            key_map[full] = full
    consumed = {}
    for x, target in key_map.items():
        for suffix in (".lora_up.weight", ".lora_down.weight", ".alpha", ".diff"):
            if x + suffix in lora_keys:
                consumed[x + suffix] = target
        if x + ".diff_b" in lora_keys:
            consumed[x + ".diff_b"] = target[: -len(".weight")] + ".bias"
    return consumed


@pytest.mark.parametrize("preset", ["tiny", "tiny-i2v", "tiny-vace"])
def test_every_comfyui_key_is_consumed_by_comfyuis_matching_rules_with_matching_shapes(tmp_path, preset):
    config = PRESETS[preset]
    base = random_state_dict(config, seed=0)
    tuned = perturbed(base, rank=None)
    b, t = write_pair(tmp_path, base, tuned, config=config)
    lora, report = extract(b, t, ExtractSettings(rank=RankRule(rank=4)))
    out = str(tmp_path / "l.safetensors")
    write_lora(out, lora, "comfyui", torch.bfloat16, report.metadata())
    written = load_file(out)
    consumed = comfyui_loaded_keys(set(written), {k: tuple(v.shape) for k, v in base.items()})
    assert set(consumed) == set(written), sorted(set(written) - set(consumed))[:5]  # no "lora key not loaded"
    for key, target in consumed.items():
        shape = base[target[len("diffusion_model."):]].shape
        if key.endswith(".lora_up.weight"):
            down = written[key.replace(".lora_up.", ".lora_down.")]
            assert (written[key] @ down).shape == shape, key
        elif key.endswith((".diff", ".diff_b")):
            assert written[key].shape == shape, key


def test_t2v_lora_loads_on_an_i2v_model_in_diffusers(tmp_path):
    base, tuned = planted(rank=None)
    b, t = write_pair(tmp_path, base, tuned)
    lora, report = extract(b, t, ExtractSettings(rank=RankRule(rank=4), dtype="fp32"))
    out = str(tmp_path / "t2v_lora.safetensors")
    write_lora(out, lora, "comfyui", torch.float32, report.metadata())
    i2v = PRESETS["tiny-i2v"]
    i2v_base = random_state_dict(i2v, seed=9)
    fused = diffusers_fused(out, i2v_base, i2v)
    name = "blocks.0.cross_attn.q.weight"
    up, down = lora.factors[name]
    assert torch.allclose(fused[name], i2v_base[name] + up @ down, atol=1e-6)
    assert torch.equal(fused["blocks.0.cross_attn.k_img.weight"], i2v_base["blocks.0.cross_attn.k_img.weight"])


@pytest.mark.parametrize("tensors,metadata,message", [
    ({"diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.ones(64), "diffusion_model.blocks.0.ffn.0.lora_down.weight":
      torch.ones(4, 32)}, None, "do not multiply"),
    ({"diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.ones(64, 4), "diffusion_model.blocks.0.ffn.0.lora_down.weight":
      torch.ones(4, 32), "diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(float("nan"))}, None, "one finite number"),
    ({"diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(4.0)}, None, "an alpha but no factors"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 32), "transformer.blocks.0.attn1.to_q.lora_B.weight":
      torch.ones(32, 4)}, {"lora_adapter_metadata": "garbage"}, "is not a LoRA config"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 32), "transformer.blocks.0.attn1.to_q.lora_B.weight":
      torch.ones(32, 4)}, {"lora_adapter_metadata": '{"transformer.r": 0}'}, "not a positive number"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 32), "transformer.blocks.0.attn1.to_q.lora_B.weight":
      torch.ones(32, 4)}, {"lora_adapter_metadata": '{"transformer.r": 4, "transformer.rank_pattern": []}'}, "not a LoRA config"),
])
def test_malformed_loras_are_refused_by_module(tmp_path, tensors, metadata, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(SftoolsError, match=message):
        read_lora(open_checkpoint(str(path)))


def test_a_file_without_lora_tensors_is_not_a_lora(tmp_path):
    torch.save({"step": 3}, tmp_path / "empty.pt")
    with pytest.raises(SftoolsError, match="holds no LoRA factors or diffs"):
        read_lora(open_checkpoint(str(tmp_path / "empty.pt")))


def test_merge_strengths_must_be_finite_numbers(tmp_path):
    with pytest.raises(SettingsError, match="not a finite number"):
        parse_lora_arg(str(tmp_path / "l.safetensors") + ":inf")
    with pytest.raises(SettingsError, match="is not a number"):
        parse_lora_arg(str(tmp_path / "l.safetensors") + ":abc")


def test_a_tensor_holding_nan_is_named_not_decomposed(tmp_path):
    base, tuned = planted()
    tuned["blocks.1.ffn.2.weight"][0, 0] = float("nan")
    b, t = write_pair(tmp_path, base, tuned)
    with pytest.raises(SftoolsError, match=r"blocks.1.ffn.2.weight: the difference holds NaN or inf"):
        extract(b, t, ExtractSettings(rank=RankRule(rank=4)))


def test_a_merged_model_keeps_its_bases_stored_config(tmp_path):
    from dataclasses import replace

    from sftools.wan.source import stored_config

    config = replace(TINY, text_len=64)  # neither the head count nor text_len is in the shapes
    base, tuned = planted(config=config)
    b, t = write_pair(tmp_path, base, tuned, config=config)
    lora, _ = extract(b, t, ExtractSettings(rank=RankRule(rank=3), dtype="fp32"))
    write_lora(str(tmp_path / "l.safetensors"), lora, "comfyui", torch.float32, {})
    merge(b, [(str(tmp_path / "l.safetensors"), 1.0)], str(tmp_path / "merged.safetensors"))
    assert stored_config(open_checkpoint(str(tmp_path / "merged.safetensors"))) == config
