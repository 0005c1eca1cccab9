"""The sampler's I/O around the model: prompt embeddings, block-wise VAE decoding, mp4 and latents."""

from __future__ import annotations

import os
import shutil

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sftools.errors import SftoolsError
from sftools.sampling import video
from sftools.sampling.text import encode_prompts, load_prompt_embeds
from sftools.sampling.video import Mp4Writer, StreamingDecoder, to_uint8, write_latents
from sftools.wan.tiny_parts import write_tiny_text_encoder, write_tiny_vae

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("pipeline"))
    write_tiny_text_encoder(folder)
    write_tiny_vae(folder)
    return folder


def hand_embeds(folder: str, text: str) -> torch.Tensor:
    """What WanPipeline._get_t5_prompt_embeds computes, restated."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"), local_files_only=True)
    enc = UMT5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder"), local_files_only=True).eval()
    ids = tok([text], padding="max_length", max_length=512, truncation=True, add_special_tokens=True,
              return_attention_mask=True, return_tensors="pt")
    n = int(ids.attention_mask.sum())
    with torch.no_grad():
        hidden = enc(ids.input_ids, ids.attention_mask).last_hidden_state[0, :n]
    out = torch.zeros(1, 512, hidden.shape[-1])
    out[0, :n] = hidden
    return out


def test_prompt_embeds_are_diffusers_ones(parts):
    positive, negative = encode_prompts(parts, "A cat walks on the beach at sunset", "blurry, static", CPU,
                                        torch.float32)
    assert positive.shape == negative.shape == (1, 512, 32) and positive.dtype == torch.float32
    assert torch.equal(positive, hand_embeds(parts, "A cat walks on the beach at sunset"))
    assert torch.equal(negative, hand_embeds(parts, "blurry, static"))
    n = 8 + 1  # eight words, all in the vocabulary, and </s>
    assert positive[0, :n].abs().sum(-1).gt(0).all() and positive[0, n:].eq(0).all()
    assert not positive.requires_grad


def test_prompts_are_cleaned_and_negative_is_optional(parts):
    messy, none = encode_prompts(parts, "  A cat\n\twalks &amp; runs ", None, CPU, torch.float32)
    assert none is None
    assert torch.equal(messy, hand_embeds(parts, "A cat walks & runs"))


def test_encoder_folder_with_tokenizer_beside_it(parts, tmp_path):
    flat = tmp_path / "umt5"
    shutil.copytree(os.path.join(parts, "text_encoder"), flat)
    for name in os.listdir(os.path.join(parts, "tokenizer")):
        shutil.copy(os.path.join(parts, "tokenizer", name), flat)
    got, _ = encode_prompts(str(flat), "a dog", None, CPU, torch.float32)
    assert torch.equal(got, hand_embeds(parts, "a dog"))


def test_missing_parts_name_the_flag(parts, tmp_path):
    with pytest.raises(SftoolsError, match="--text-encoder") as err:
        encode_prompts(str(tmp_path), "a cat", None, CPU, torch.float32)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    no_tokenizer = tmp_path / "te"
    shutil.copytree(os.path.join(parts, "text_encoder"), no_tokenizer / "text_encoder")
    with pytest.raises(SftoolsError, match="no tokenizer"):
        encode_prompts(str(no_tokenizer), "a cat", None, CPU, torch.float32)
    with pytest.raises(SftoolsError, match="--vae") as err:
        StreamingDecoder(str(tmp_path), CPU, torch.float32)
    assert "\n" not in str(err.value)


def test_load_prompt_embeds(tmp_path):
    path = str(tmp_path / "embeds.safetensors")
    save_file({"prompt_embeds": torch.randn(5, 32).bfloat16(), "negative_prompt_embeds": torch.randn(1, 7, 32)}, path)
    positive, negative = load_prompt_embeds(path)
    assert positive.shape == (1, 5, 32) and negative.shape == (1, 7, 32) and positive.dtype == torch.float32
    save_file({"prompt_embeds": torch.randn(1, 512, 8)}, path)
    positive, negative = load_prompt_embeds(path)
    assert positive.shape == (1, 512, 8) and negative is None


@pytest.mark.parametrize("tensors, key", [
    ({"embeds": torch.randn(4, 8)}, "prompt_embeds"),
    ({"prompt_embeds": torch.randn(2, 4, 8)}, "prompt_embeds"),
    ({"prompt_embeds": torch.randn(8)}, "prompt_embeds"),
    ({"prompt_embeds": torch.randn(513, 8)}, "prompt_embeds"),
    ({"prompt_embeds": torch.randn(4, 8), "negative_prompt_embeds": torch.randn(4, 16)}, "negative_prompt_embeds"),
    ({"prompt_embeds": torch.tensor([[1.0, float("nan")]])}, "prompt_embeds"),
    ({"prompt_embeds": torch.randn(4, 8), "negative_prompt_embeds": torch.full((3, 8), float("inf"))},
     "negative_prompt_embeds"),
    ({"prompt_embeds": torch.ones(4, 8, dtype=torch.int32)}, "prompt_embeds"),
])
def test_bad_prompt_embeds_are_refused_in_one_line(tmp_path, tensors, key):
    path = str(tmp_path / "bad.safetensors")
    save_file(tensors, path)
    with pytest.raises(SftoolsError) as err:
        load_prompt_embeds(path)
    message = str(err.value)
    assert path in message and key in message and "\n" not in message


def diffusers_pixels(folder: str, latents: torch.Tensor) -> np.ndarray:
    """WanPipeline's decode and VideoProcessor.postprocess_video(output_type="np"), then * 255 rounded."""
    from diffusers import AutoencoderKLWan
    from diffusers.video_processor import VideoProcessor

    vae = AutoencoderKLWan.from_pretrained(os.path.join(folder, "vae"), local_files_only=True).eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        pixels = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    frames = VideoProcessor(vae_scale_factor=8).postprocess_video(pixels, output_type="np")[0]
    return (frames * 255).round().astype(np.uint8)


def test_streaming_decode_equals_whole_decode(parts):
    # 4x4 latents: at 2x2, torch's CPU 1x1x1 conv rounds differently for one or two frames than for
    # more, so post_quant_conv on short blocks would differ from the whole tensor in the last bit.
    latents = torch.randn(1, 16, 7, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = diffusers_pixels(parts, latents)
    assert expected.shape == (1 + 4 * 6, 32, 32, 3)
    assert expected.std(axis=(1, 2, 3)).min() > 1 and np.abs(np.diff(expected.astype(int), axis=0)).max() > 2
    for split in ([7], [3, 3, 1], [1] * 7, [4, 3]):
        decoder = StreamingDecoder(parts, CPU, torch.float32)
        pieces = [decoder.decode(block) for block in torch.split(latents, split, dim=2)]
        assert [len(p) for p in pieces] == [4 * n - 3 * (i == 0) for i, n in enumerate(split)]
        assert torch.equal(torch.cat(pieces), torch.from_numpy(expected)), split


def test_pixel_rule():
    x = torch.tensor([-2.0, -1.0, 0.0, 1 / 255, 0.5, 1.0, 3.0]).view(1, 1, 1, 1, 7).expand(1, 3, 1, 1, 7)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 128, 191, 255, 255]


def gradient(frames: int, height: int, width: int) -> np.ndarray:
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    rgb = np.stack([x * 200 / width + 3 * t, y * 200 / height + 2 * t, 128 + 60 * np.sin((x + y + t) / 8)], -1)
    return rgb.clip(0, 255).astype(np.uint8)


def read_mp4(path: str) -> np.ndarray:
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_mp4_round_trip(tmp_path, monkeypatch, codec):
    monkeypatch.setattr(video, "_codec", lambda: codec)
    path = str(tmp_path / "out.mp4")
    frames = gradient(1 + 4 * 4, 32, 48)
    with Mp4Writer(path, fps=16) as writer:
        writer.append(frames[:1])
        for start in range(1, len(frames), 4):
            writer.append(torch.from_numpy(frames[start:start + 4]))
        assert not os.path.exists(path)
    back = read_mp4(path)
    assert back.shape == frames.shape
    # Mostly yuv420p's half-resolution colour on this steep, colourful gradient (about 2.7 either codec).
    assert np.abs(back.astype(float) - frames).mean() < 3.5
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_mp4_is_all_or_nothing(tmp_path):
    path = str(tmp_path / "out.mp4")
    with pytest.raises(RuntimeError):
        with Mp4Writer(path) as writer:
            writer.append(gradient(5, 16, 16))
            raise RuntimeError("sampler failed")
    with pytest.raises(SftoolsError, match="even") as err:
        with Mp4Writer(path) as writer:
            writer.append(gradient(1, 16, 15))
    assert path in str(err.value)
    with pytest.raises(SftoolsError, match="uint8"):
        with Mp4Writer(path) as writer:
            writer.append(gradient(1, 16, 16).astype(np.float32))
    assert os.listdir(tmp_path) == []


def test_write_latents(tmp_path):
    path = str(tmp_path / "x.safetensors")
    latents = torch.randn(1, 16, 3, 2, 2).bfloat16()
    write_latents(path, latents)
    assert torch.equal(load_file(path)["latents"], latents.float())
    with pytest.raises(SftoolsError, match="x.safetensors"):
        write_latents(path, torch.randn(16, 3, 2, 2))
