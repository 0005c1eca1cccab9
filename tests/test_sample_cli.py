"""`sftools sample` and `sftools verify` as users call them: outputs, draws from a file, refusals."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_runner import run
from sftools.models.causal_wan import CausalWanModel
from sftools.sampling.causal import CausalSampler
from sftools.sampling.load import load_transformer
from sftools.sampling.settings import PRESETS, SampleSettings
from sftools.wan.config import TINY_128
from sftools.wan.tiny import perturbed, random_state_dict, write_checkpoint
from sftools.wan.tiny_parts import write_tiny_text_encoder, write_tiny_vae

SIZE = ["--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    state = random_state_dict(TINY_128, seed=0)
    pipeline = write_checkpoint(str(d / "Wan-tiny"), state, "diffusers", TINY_128)
    write_tiny_text_encoder(pipeline, text_dim=TINY_128.text_dim)
    write_tiny_vae(pipeline)
    g = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(7, TINY_128.text_dim, generator=g),
               "negative_prompt_embeds": torch.randn(5, TINY_128.text_dim, generator=g)}, str(d / "embeds.safetensors"))
    return {"dir": d, "state": state, "pipeline": pipeline, "embeds": str(d / "embeds.safetensors"),
            "pt": write_checkpoint(str(d / "sf.pt"), state, "self-forcing", TINY_128),
            "other": write_checkpoint(str(d / "other.safetensors"), perturbed(state, scale=0.5), "original", TINY_128)}


def test_latents_from_a_noise_file_equal_the_library_sampler_with_those_draws(parts, capsys, tmp_path):
    s = SampleSettings(frames=17, height=32, width=32, **{k: v for k, v in PRESETS["self-forcing"].items()})
    g = torch.Generator().manual_seed(3)
    noise, renoise = torch.randn(1, 16, 5, 4, 4, generator=g), torch.randn(3, 1, 16, 5, 4, 4, generator=g)
    save_file({"noise": noise, "renoise": renoise}, str(tmp_path / "noise.safetensors"))
    out = tmp_path / "latents.safetensors"
    code, _, err = run(capsys, "sample", parts["pt"], "--prompt-embeds", parts["embeds"], "--frames", "17", *SIZE,
                       "--noise", str(tmp_path / "noise.safetensors"), "-o", str(out))
    assert code == 0, err
    latents = load_file(str(out))["latents"]
    assert latents.shape == (1, 16, 5, 4, 4)

    class Draws:
        def initial(self, start, n):
            return noise[:, :, start:start + n]

        def renoise(self, step, start, n):
            return renoise[step][:, :, start:start + n]

    model, config = load_transformer(parts["pipeline"])
    embeds = load_file(parts["embeds"])["prompt_embeds"][None]
    assert torch.equal(latents, CausalSampler(CausalWanModel(model), config, s).sample(embeds, Draws()))


def test_an_mp4_is_decoded_block_by_block_from_a_text_prompt(parts, capsys, tmp_path):
    import av

    out = tmp_path / "fox.mp4"
    code, text, err = run(capsys, "sample", parts["pipeline"], "--prompt", "a fox", "--text-encoder", parts["pipeline"],
                          "--vae", parts["pipeline"], "--frames", "21", *SIZE, "-o", str(out))
    assert code == 0, err
    assert "21 frames (6 latent) in 2 blocks" in text
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 21 and frames[0].shape == (32, 32, 3)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_long_videos_roll_the_cache_and_without_a_window_are_refused_clearly(parts, capsys, tmp_path):
    args = ["sample", parts["pt"], "--prompt-embeds", parts["embeds"], "--frames", "97", *SIZE]
    code, _, err = run(capsys, *args, "-o", str(tmp_path / "a.safetensors"))
    assert code == 2 and err.count("\n") == 1 and "the KV cache holds 21" in err and "--local-attn-frames" in err
    assert not (tmp_path / "a.safetensors").exists()
    code, _, err = run(capsys, *args, "--local-attn-frames", "9", "--sink-frames", "3", "-o", str(tmp_path / "b.safetensors"))
    assert code == 0, err
    assert load_file(str(tmp_path / "b.safetensors"))["latents"].shape[2] == 25


def test_verify_passes_a_model_against_itself_and_its_conversion_and_fails_a_perturbed_one(parts, capsys, tmp_path):
    common = ["--prompt-embeds", parts["embeds"], "--frames", "9", *SIZE, "--min-psnr", "40"]
    code, text, _ = run(capsys, "verify", parts["pt"], parts["pipeline"], *common)
    assert code == 0 and "worst identical" in text
    code, text, err = run(capsys, "verify", parts["pt"], parts["other"], *common, "--json")
    assert code == 1 and '"passed": false' in text and "below --min-psnr 40" in err


@pytest.mark.parametrize("extra,code,message", [
    (["--frames", "80"], 2, "4k+1"),
    (["--height", "40"], 2, "multiple of 16"),
    (["--local-attn-frames", "2"], 2, "must be more than the block"),
    (["--frames-per-block", "x"], 2, "'all'"),
    (["--steps", "0"], 2, "--steps must be"),
    (["--noise", "{embeds}"], 1, "has no tensor 'noise'"),
    (["--lora", "{lora}"], 1, "which {pt} does not have"),
    (["-o", "{dir}/x.mp4"], 2, "needs --vae"),
    (["-o", "{dir}/x.png"], 2, "name a .safetensors file"),
    (["-o", "{pt}"], 2, "name a .safetensors file"),
    (["-o", "{embeds}"], 1, "is the input"),
    (["--device", "tpu"], 2, "is not one of auto, cpu, cuda"),
    (["--device", "cuda:3"], 1, "CUDA device(s)"),
    (["--text-encoder", "{dir}"], 2, "not both"),
])
def test_bad_sampling_input_is_one_line_and_no_output(parts, capsys, tmp_path, extra, code, message):
    lora = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.blocks.7.ffn.0.lora_up.weight": torch.ones(64, 2),
               "diffusion_model.blocks.7.ffn.0.lora_down.weight": torch.ones(2, 256)}, str(lora))
    fill = dict(embeds=parts["embeds"], lora=str(lora), pt=parts["pt"], dir=tmp_path)
    extra = [e.format(**fill) for e in extra]
    output = [] if "-o" in extra else ["-o", str(tmp_path / "out.safetensors")]
    before = sorted(os.listdir(tmp_path))
    got, _, err = run(capsys, "sample", parts["pt"], "--prompt-embeds", parts["embeds"], "--frames", "9", *SIZE,
                      *extra, *output)
    assert got == code and message.format(**fill) in err, err
    assert "Traceback" not in err and sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("output", ["{pipeline}/diffusion_pytorch_model.safetensors", "{pipeline}/vae/out.safetensors",
                                    "{pipeline}/text_encoder/out.safetensors", "{pipeline}/new.safetensors"])
def test_an_output_inside_any_input_folder_is_refused(parts, capsys, output):
    out = output.format(**parts)
    before = sorted(os.listdir(parts["pipeline"]))
    code, _, err = run(capsys, "sample", parts["pipeline"], "--prompt", "a fox", "--text-encoder", parts["pipeline"],
                       "--vae", parts["pipeline"], "--frames", "5", *SIZE, "-o", out)
    assert code == 1 and ("lies inside the input folder" in err or "is the input" in err), err
    assert sorted(os.listdir(parts["pipeline"])) == before


def test_an_image_model_is_refused_before_any_work(capsys, tmp_path, parts):
    from sftools.wan.config import PRESETS as MODELS

    i2v = write_checkpoint(str(tmp_path / "i2v.safetensors"), random_state_dict(MODELS["tiny-i2v"]), "original",
                           MODELS["tiny-i2v"])
    code, _, err = run(capsys, "sample", i2v, "--prompt-embeds", parts["embeds"], "--frames", "5", *SIZE,
                       "-o", str(tmp_path / "o.safetensors"))
    assert code == 1 and "the sampler takes Wan 2.1 T2V" in err


def test_the_command_line_offers_exactly_the_presets_the_library_has():
    from sftools.cli.sample import PRESET_NAMES

    assert set(PRESET_NAMES) == set(PRESETS)


def test_a_lora_given_at_load_samples_like_the_model_it_was_merged_into(parts, capsys, tmp_path):
    lora, merged = str(tmp_path / "l.safetensors"), str(tmp_path / "merged.safetensors")
    assert run(capsys, "lora", "extract", parts["pipeline"], parts["other"], "-o", lora, "--rank", "4", "--dtype", "fp32")[0] == 0
    assert run(capsys, "lora", "merge", parts["pipeline"], lora + ":0.7", "-o", merged)[0] == 0
    common = ["--prompt-embeds", parts["embeds"], "--frames", "9", *SIZE]
    code, _, err = run(capsys, "sample", parts["pipeline"], "--lora", lora + ":0.7", *common, "-o", str(tmp_path / "a.safetensors"))
    assert code == 0, err
    assert run(capsys, "sample", merged, *common, "-o", str(tmp_path / "b.safetensors"))[0] == 0
    a, b = (load_file(str(tmp_path / n))["latents"] for n in ("a.safetensors", "b.safetensors"))
    assert torch.equal(a, b)
    plain = tmp_path / "c.safetensors"
    assert run(capsys, "sample", parts["pipeline"], *common, "-o", str(plain))[0] == 0
    assert not torch.allclose(a, load_file(str(plain))["latents"], atol=1e-3)  # the LoRA did change the model


def test_prompt_embeddings_longer_than_the_models_text_len_are_one_line_and_no_output(parts, capsys, tmp_path):
    from dataclasses import replace

    config = replace(TINY_128, text_len=6)
    model = write_checkpoint(str(tmp_path / "short.safetensors"), random_state_dict(config, seed=0), "original", config)
    code, _, err = run(capsys, "sample", model, "--prompt-embeds", parts["embeds"], "--frames", "9", *SIZE,
                       "-o", str(tmp_path / "out.safetensors"))
    message = f"{parts['embeds']}: prompt_embeds has 7 tokens; {model} takes 6 (its text_len)"
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.safetensors").exists()
