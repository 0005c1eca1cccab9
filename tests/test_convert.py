"""Conversion between every source layout and both output layouts, bit-exact, atomic, sharded."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file

import sftools.io.output as output
from sftools.convert import convert_model as convert
from sftools.errors import SftoolsError
from sftools.io.sources import open_checkpoint
from sftools.wan.config import PRESETS, TINY, diffusers_config
from sftools.wan.keys import diffusers_to_original, original_to_diffusers
from sftools.wan.tiny import LAYOUTS, random_state_dict, write_checkpoint


def bits(t: torch.Tensor) -> list[int]:
    return t.contiguous().reshape(-1).view(torch.uint8).tolist()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert bits(a[k]) == bits(b[k]), k


def source(tmp_path, layout: str, preset: str = "tiny") -> tuple[str, dict[str, torch.Tensor]]:
    config = PRESETS[preset]
    state = random_state_dict(config, seed=1)
    name = {"self-forcing": "sf.pt", "diffusers": "diffusers_src"}.get(layout, f"{layout}.safetensors")
    return write_checkpoint(str(tmp_path / name), state, layout, config), state


@pytest.mark.parametrize("preset", ["tiny", "tiny-i2v", "tiny-vace"])
@pytest.mark.parametrize("src_layout", LAYOUTS)
def test_every_layout_converts_to_original_names_bit_exact(tmp_path, src_layout, preset):
    src, state = source(tmp_path, src_layout, preset)
    out = tmp_path / "out.safetensors"
    report = convert(src, str(out))
    assert report["layout"] == "original"
    assert_same(load_file(str(out)), state)


@pytest.mark.parametrize("preset", ["tiny", "tiny-i2v", "tiny-vace"])
@pytest.mark.parametrize("src_layout", LAYOUTS)
def test_every_layout_converts_to_diffusers_and_back_bit_exact(tmp_path, src_layout, preset):
    src, state = source(tmp_path, src_layout, preset)
    folder = tmp_path / "diffusers_out"
    convert(src, str(folder), layout="diffusers", max_shard_bytes=5 * 10**9)
    written = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    names = original_to_diffusers(state)
    assert_same(written, {names[k]: v for k, v in state.items()})
    back = tmp_path / "back.safetensors"
    convert(str(folder), str(back))
    assert_same(load_file(str(back)), state)


@pytest.mark.parametrize("preset", ["tiny", "tiny-i2v", "tiny-vace"])
def test_diffusers_output_loads_in_the_diffusers_model_class(tmp_path, preset):
    config = PRESETS[preset]
    src, state = source(tmp_path, "self-forcing", preset)
    folder = tmp_path / "model"
    convert(src, str(folder), layout="diffusers", max_shard_bytes=20_000)
    cls = WanVACETransformer3DModel if config.model_type == "vace" else WanTransformer3DModel
    model = cls.from_pretrained(str(folder), local_files_only=True)
    names = original_to_diffusers(state)
    loaded = model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[names[k]], v), k


def test_our_names_match_diffusers_models_and_its_converter_in_both_directions():
    for preset in ("tiny", "tiny-i2v", "tiny-vace"):
        config = diffusers_config(PRESETS[preset])
        cls = WanVACETransformer3DModel if config.pop("_class_name").startswith("WanVACE") else WanTransformer3DModel
        model_keys = {k: tuple(v.shape) for k, v in cls(**config).state_dict().items()}
        state = random_state_dict(PRESETS[preset])
        names = original_to_diffusers(state)
        assert {names[k]: tuple(v.shape) for k, v in state.items()} == model_keys
        back, dropped = diffusers_to_original(model_keys)
        assert dropped == [] and sorted(back.values()) == sorted(state)


def test_diffusers_norm_added_q_keys_are_dropped_with_a_note(tmp_path):
    state = random_state_dict(PRESETS["tiny-i2v"])
    folder = tmp_path / "d"
    write_checkpoint(str(folder), state, "diffusers", PRESETS["tiny-i2v"])
    extra = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    extra["blocks.0.attn2.norm_added_q.weight"] = torch.ones(TINY.dim)
    from safetensors.torch import save_file

    save_file(extra, str(folder / "diffusion_pytorch_model.safetensors"))
    report = convert(str(folder), str(tmp_path / "o.safetensors"))
    assert any("norm_added_q" in n for n in report["notes"])
    assert_same(load_file(str(tmp_path / "o.safetensors")), state)


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_dtype_cast_equals_torch_cast_and_leaves_integers_alone(tmp_path, dtype, torch_dtype):
    src = tmp_path / "mixed.pt"
    tensors = {"w": torch.randn(4, 4, dtype=torch.float64), "h": torch.randn(3).half(), "i": torch.arange(5)}
    torch.save(tensors, src)
    convert(str(src), str(tmp_path / "o.safetensors"), dtype=dtype)
    out = load_file(str(tmp_path / "o.safetensors"))
    assert bits(out["w"]) == bits(tensors["w"].to(torch_dtype))
    assert bits(out["h"]) == bits(tensors["h"].to(torch_dtype))
    assert out["i"].dtype == torch.int64 and torch.equal(out["i"], tensors["i"])


def test_sharded_output_respects_the_size_limit_and_indexes_every_tensor(tmp_path):
    src, state = source(tmp_path, "self-forcing")
    folder = tmp_path / "shards"
    report = convert(src, str(folder), max_shard_bytes=30_000)
    assert len(report["files"]) > 2
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    for name in report["files"]:
        with safe_open(str(folder / name), "pt") as f:
            size = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
            assert size <= 30_000 or len(list(f.keys())) == 1
    assert_same({n: t.load() for n, t in open_checkpoint(str(folder)).tensors.items()}, state)


def test_metadata_says_where_the_output_came_from(tmp_path):
    src, _ = source(tmp_path, "self-forcing")
    out = tmp_path / "o.safetensors"
    convert(src, str(out), dtype="bf16")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["sftools.source"] == "sf.pt"
    assert meta["sftools.source_format"] == "torch-zip"
    assert meta["sftools.layout"] == "original"


def test_select_picks_the_generator_and_defaults_to_the_ema(tmp_path):
    state = random_state_dict(TINY, seed=3)
    path = tmp_path / "sf.pt"
    torch.save({"generator": {f"model.{k}": v * 2 for k, v in state.items()},
                "generator_ema": {f"model.{k}": v for k, v in state.items()}}, path)
    convert(str(path), str(tmp_path / "ema.safetensors"))
    convert(str(path), str(tmp_path / "gen.safetensors"), select="generator")
    assert_same(load_file(str(tmp_path / "ema.safetensors")), state)
    assert_same(load_file(str(tmp_path / "gen.safetensors")), {k: v * 2 for k, v in state.items()})
    with pytest.raises(SftoolsError, match="no sub-dict 'critic'"):
        convert(str(path), str(tmp_path / "x.safetensors"), select="critic")


def test_fsdp_checkpoint_and_compile_wrappers_are_stripped(tmp_path):
    state = random_state_dict(TINY, seed=4)
    path = tmp_path / "wrapped.pt"
    wrapped = {"model._fsdp_wrapped_module._orig_mod." + re.sub(r"^(blocks\.\d+\.)", r"\1_checkpoint_wrapped_module.", k): v
               for k, v in state.items()}
    assert any("._checkpoint_wrapped_module." in k for k in wrapped)
    torch.save({"generator": wrapped}, path)
    convert(str(path), str(tmp_path / "o.safetensors"))
    assert_same(load_file(str(tmp_path / "o.safetensors")), state)


def test_a_failure_midway_leaves_no_output_and_no_temporary_file(tmp_path, monkeypatch):
    src, _ = source(tmp_path, "original")
    before = sorted(os.listdir(tmp_path))
    calls = {"n": 0}
    real = output.write_safetensors

    def failing(path, tensors, metadata=None, on_bytes=None):
        def boom(n):
            calls["n"] += 1
            if calls["n"] == 5:
                raise SftoolsError("disk full (simulated)")
        return real(path, tensors, metadata, on_bytes=boom)

    monkeypatch.setattr(output, "write_safetensors", failing)
    for dst, kwargs in ((tmp_path / "o.safetensors", {}), (tmp_path / "folder", {"max_shard_bytes": 10_000})):
        calls["n"] = 0
        with pytest.raises(SftoolsError, match="simulated"):
            convert(src, str(dst), **kwargs)
        assert sorted(os.listdir(tmp_path)) == before


def test_existing_output_is_replaced_only_on_success(tmp_path):
    src, state = source(tmp_path, "original")
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(SftoolsError):
        convert(src, str(out), layout="diffusers", select="nope")
    assert out.read_bytes() == b"old"
    convert(src, str(out))
    assert_same(load_file(str(out)), state)


def test_shards_without_a_folder_destination_are_refused(tmp_path):
    src, _ = source(tmp_path, "original")
    with pytest.raises(SftoolsError, match="needs a folder"):
        convert(src, str(tmp_path / "x.safetensors"), max_shard_bytes=10**6)


def test_an_existing_output_folder_is_swapped_whole_and_foreign_folders_are_refused_first(tmp_path):
    src, state = source(tmp_path, "original")
    folder = tmp_path / "out"
    convert(src, str(folder), max_shard_bytes=10_000)
    many = sorted(os.listdir(folder))
    convert(src, str(folder), max_shard_bytes=10**9)
    assert sorted(os.listdir(folder)) == ["diffusion_pytorch_model.safetensors"] and len(many) > 2
    assert_same(load_file(str(folder / "diffusion_pytorch_model.safetensors")), state)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SftoolsError, match="holds other files"):
        convert(src, str(tmp_path / "mine"), max_shard_bytes=10**9)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_folders_holding_several_models_and_lora_files_given_to_convert_are_refused(tmp_path):
    src, state = source(tmp_path, "original")
    from safetensors.torch import save_file

    save_file({"diffusion_model.blocks.0.ffn.0.diff_b": torch.ones(64)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(SftoolsError, match="several models or files"):
        open_checkpoint(str(tmp_path))
    with pytest.raises(SftoolsError, match="is a LoRA, not a model"):
        convert(str(tmp_path / "lora.safetensors"), str(tmp_path / "o.safetensors"))


@pytest.mark.parametrize("weight_map,message", [
    ({"a": 5}, "not a map of tensor names"),
    (["a"], "not a map of tensor names"),
    ({"a": "/etc/passwd"}, "is not a file name beside the index"),
    ({"a": "../x.safetensors"}, "is not a file name beside the index"),
])
def test_indexes_pointing_outside_their_folder_or_malformed_are_refused(tmp_path, weight_map, message):
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(SftoolsError, match=message):
        open_checkpoint(str(tmp_path / "m.safetensors.index.json"))


@pytest.mark.parametrize("size", ["nan", "inf", "1e400"])
def test_non_finite_shard_sizes_are_refused(size):
    from sftools.io.units import parse_size

    with pytest.raises(ValueError, match="not a size"):
        parse_size(size)


def test_pickle_keys_that_collide_are_refused_not_dropped(tmp_path):
    from sftools.io.torch_pickle import scan_pickle

    for i, obj in enumerate(({1: torch.ones(1), "1": torch.zeros(1)}, {"x/y": torch.ones(1), "x": {"y": torch.zeros(1)}})):
        torch.save(obj, tmp_path / f"c{i}.pt")
        scan = scan_pickle(str(tmp_path / f"c{i}.pt"))
        assert not scan.safe and any("both named" in r for r in scan.refusals)


def test_slashes_in_safetensors_keys_are_names_not_sub_dicts(tmp_path):
    from safetensors.torch import save_file

    save_file({"a/x": torch.ones(1), "b/x": torch.zeros(1)}, str(tmp_path / "s.safetensors"))
    convert(str(tmp_path / "s.safetensors"), str(tmp_path / "o.safetensors"))
    assert set(load_file(str(tmp_path / "o.safetensors"))) == {"a/x", "b/x"}


def test_a_vace_module_alone_gets_no_guessed_config_and_bad_stored_configs_are_ignored(tmp_path):
    from safetensors.torch import save_file
    from sftools.wan.config import vace_shapes

    module = {k: torch.zeros(s) for k, s in vace_shapes(PRESETS["tiny-vace"]).items()}
    save_file(module, str(tmp_path / "module.safetensors"), metadata={"sftools.config": '{"num_heads": 0}'})
    convert(str(tmp_path / "module.safetensors"), str(tmp_path / "module_diffusers"), layout="diffusers")
    assert sorted(os.listdir(tmp_path / "module_diffusers")) == ["diffusion_pytorch_model.safetensors"]
    assert set(load_file(str(tmp_path / "module_diffusers" / "diffusion_pytorch_model.safetensors"))) == \
        set(original_to_diffusers(module).values())
