"""The streaming safetensors writer against safetensors' own reader, and bad inputs by name."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sftools.errors import SftoolsError
from sftools.io.lazy import LazyTensor
from sftools.io.output import write_file
from sftools.io.safetensors_io import read_header
from sftools.io.sources import open_checkpoint
from sftools.io.units import parse_size


def planned(tensors: dict[str, torch.Tensor]) -> dict[str, LazyTensor]:
    return {k: LazyTensor.of(v) for k, v in tensors.items()}


def test_streamed_file_reads_back_identically_with_aligned_tensors_and_metadata(tmp_path):
    tensors = {
        "odd_bytes": torch.arange(3, dtype=torch.uint8),  # 3 bytes: would misalign what follows
        "f32": torch.randn(5, 3),
        "bf16": torch.randn(7).bfloat16(),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        'quote"back\\slash': torch.ones(2),
        "ünïcode.weight": torch.ones(1, dtype=torch.int16),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
    }
    out = tmp_path / "o.safetensors"
    write_file(str(out), planned(tensors), {"format": "pt", "note": "x"})
    back = load_file(str(out))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    header, start = read_header(str(out))
    assert start % 8 == 0
    for name, info in header.items():
        if name != "__metadata__":
            assert (start + info["data_offsets"][0]) % back[name].element_size() == 0, name
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}


def write_raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("case,message", [
    ("truncated", "truncated"),
    ("huge_header", "header length"),
    ("not_json", "not JSON"),
    ("gap", "does not follow"),
    ("wrong_span", "spans"),
    ("short", "shorter than 8 bytes"),
])
def test_corrupt_safetensors_are_refused_naming_the_file(tmp_path, case, message):
    path = tmp_path / "bad.safetensors"
    if case == "truncated":
        save_file({"a": torch.ones(100)}, str(path))
        path.write_bytes(path.read_bytes()[:-10])
    elif case == "huge_header":
        path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    elif case == "not_json":
        path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    elif case == "gap":
        write_raw(path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8)
    elif case == "wrong_span":
        write_raw(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4)
    else:
        path.write_bytes(b"abc")
    with pytest.raises(SftoolsError, match=message) as err:
        open_checkpoint(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_sharded_index_naming_a_missing_shard_is_refused_by_name(tmp_path):
    save_file({"a": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(SftoolsError, match="shard s2.safetensors is missing"):
        open_checkpoint(str(tmp_path / "m.safetensors.index.json"))


def test_missing_paths_and_empty_folders_are_refused(tmp_path):
    with pytest.raises(SftoolsError, match="no such file"):
        open_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(SftoolsError, match="no .safetensors files"):
        open_checkpoint(str(tmp_path))


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("1.5GiB", int(1.5 * 2**30)), ("2048", 2048)])
def test_shard_sizes_parse_like_diffusers(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "5XB", "five"])
def test_bad_shard_sizes_are_refused(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)
