"""Naming what weights are, from names and shapes alone: real sizes as shapes, tiny ones as files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from sftools.inspection import inspect_file as inspect_path
from sftools.wan.config import PRESETS, TINY, model_shapes, vace_shapes
from sftools.wan.detect import describe_weights as describe
from sftools.wan.keys import original_to_diffusers
from sftools.wan.tiny import random_state_dict, write_checkpoint


@pytest.mark.parametrize("preset,title,tensors,params", [
    ("t2v-1.3B", "wan2.1 t2v 1.3B", 825, 1_418_996_800),
    ("t2v-14B", "wan2.1 t2v 14B", 1095, 14_288_491_584),
    ("i2v-14B", "wan2.1 i2v 14B", 1303, 16_394_878_784),
    ("vace-1.3B", "wan2.1 vace 1.3B", 1264, 1_418_996_800 + 734_975_232),
    ("vace-14B", "wan2.1 vace 14B", 1331, 14_288_491_584 + 3_049_101_312),
])
def test_real_model_shapes_are_named_with_kind_and_size_in_both_layouts(preset, title, tensors, params):
    shapes = model_shapes(PRESETS[preset])
    assert len(shapes) == tensors and sum(math.prod(s) for s in shapes.values()) == params
    for layout_shapes in (shapes, {original_to_diffusers(shapes)[k]: v for k, v in shapes.items()}):
        d = describe(layout_shapes)
        assert d.title == title
        assert d.details["missing"] == d.details["unexpected"] == d.details["mismatched"] == []
        assert d.config == PRESETS[preset]


@pytest.mark.parametrize("preset,size", [("vace-14B", "14B"), ("vace-1.3B", "1.3B")])
def test_vace_module_alone_is_named_with_the_layers_of_its_base(preset, size):
    d = describe(vace_shapes(PRESETS[preset]))
    assert (d.kind, d.size) == ("vace module", size)
    assert d.config.vace_layers == PRESETS[preset].vace_layers
    assert d.details["missing"] == d.details["unexpected"] == []


def test_tiny_files_are_described_exactly_from_their_stored_config(tmp_path):
    for preset in ("tiny", "tiny-i2v", "tiny-vace"):
        config = PRESETS[preset]
        path = write_checkpoint(str(tmp_path / f"{preset}.safetensors"), random_state_dict(config), "comfyui", config)
        info = inspect_path(path)
        assert info["kind"] == f"wan2.1 {config.model_type}"
        assert info["layout"] == "original"
        assert info["config"]["num_heads"] == config.num_heads
        assert info["config"]["vace_layers"] == list(config.vace_layers)
        assert info["parameters"] == sum(math.prod(s) for s in model_shapes(config).values())


def test_lora_files_report_form_rank_and_targets(tmp_path):
    lora = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 32),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(32, 4),
        "diffusion_model.blocks.0.self_attn.q.diff_b": torch.zeros(32),
        "diffusion_model.blocks.0.modulation.diff": torch.zeros(1, 6, 32),
    }
    save_file(lora, str(tmp_path / "l.safetensors"))
    info = inspect_path(str(tmp_path / "l.safetensors"))
    assert (info["kind"], info["form"], info["rank"], info["lora_modules"], info["full_diffs"]) == ("lora", "comfyui", 4, 1, 2)
    assert info["targets"] == ["blocks.N.modulation", "blocks.N.self_attn.q"]


@pytest.mark.parametrize("text_len", ['"64"', "0", "null"])
def test_a_stored_config_with_a_bad_text_len_is_ignored_for_the_shapes(tmp_path, text_len):
    from sftools.io.sources import open_checkpoint
    from sftools.wan.source import stored_config

    path = str(tmp_path / "m.safetensors")
    config = json.loads(TINY.to_json())
    save_file(random_state_dict(TINY), path, metadata={"sftools.config": json.dumps(config).replace(
        '"text_len": 512', f'"text_len": {text_len}')})
    assert stored_config(open_checkpoint(path)) is None
    assert inspect_path(path)["kind"] == "wan2.1 t2v" and inspect_path(path)["config"]["text_len"] == 512


def test_inspect_reports_the_context_rows_a_stored_config_gives(tmp_path):
    from dataclasses import replace

    config = replace(TINY, text_len=64)
    path = write_checkpoint(str(tmp_path / "short.safetensors"), random_state_dict(config), "original", config)
    assert inspect_path(path)["config"]["text_len"] == 64
