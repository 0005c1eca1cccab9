"""Prompt embeddings for the sampler: umT5 from a local folder, or a safetensors file of them.

Encoding is diffusers' own `WanPipeline.encode_prompt` (prompt cleaning, 512-token padding, trimming
each embedding to its true length and zero-padding it back), called on a pipeline that holds only
the tokenizer and the text encoder, so the embeddings are the ones diffusers would feed the model.
The encoder is loaded for one call and dropped: the sampler never holds it.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch

from sftools.errors import SftoolsError
from sftools.io.sources import open_checkpoint
from sftools.sampling.settings import TEXT_LEN as MAX_TOKENS

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def _find_parts(folder: str) -> tuple[str, str]:
    """(encoder folder, tokenizer folder) of a pipeline folder or of an encoder folder itself."""
    if os.path.isfile(os.path.join(folder, "text_encoder", "config.json")):
        encoder, tokenizer = os.path.join(folder, "text_encoder"), os.path.join(folder, "tokenizer")
    elif os.path.isfile(os.path.join(folder, "config.json")):
        encoder = tokenizer = folder
    else:
        raise SftoolsError(f"{folder}: no text encoder (text_encoder/ with a config.json) found; pass --text-encoder "
                           "a Wan diffusers folder, or --prompt-embeds FILE")
    if not any(os.path.isfile(os.path.join(tokenizer, name)) for name in TOKENIZER_FILES):
        raise SftoolsError(f"{folder}: no tokenizer (tokenizer/ with tokenizer.json or spiece.model) found; pass "
                           "--text-encoder a Wan diffusers folder, or --prompt-embeds FILE")
    return encoder, tokenizer


def _load_encoder(folder: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import T5EncoderModel, UMT5EncoderModel
    from transformers.utils import logging as transformers_logging

    if not sys.stderr.isatty():  # its loading bar is for terminals, like ours
        transformers_logging.disable_progress_bar()

    try:
        with open(os.path.join(folder, "config.json")) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as exc:
        raise SftoolsError(f"{folder}/config.json: unreadable ({exc})") from None
    classes = {"umt5": UMT5EncoderModel, "t5": T5EncoderModel}
    if model_type not in classes:
        raise SftoolsError(f"{folder}/config.json: model_type {model_type!r} is not a T5/umT5 text encoder; "
                           "pass --text-encoder a Wan diffusers folder")
    try:
        model, info = classes[model_type].from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                          output_loading_info=True)
    except Exception as exc:  # transformers raises many types for broken folders; all are one line here
        raise SftoolsError(f"{folder}: cannot load the text encoder ({str(exc).splitlines()[0]})") from None
    if info.get("missing_keys"):  # transformers would fill them with random values and go on
        raise SftoolsError(f"{folder}: the text encoder's weights lack {info['missing_keys'][0]} "
                           f"({len(info['missing_keys'])} missing); is this the umT5 of a Wan model?")
    return model.eval()


def encode_prompts(text_encoder_dir: str, prompt: str, negative_prompt: str | None, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[1, 512, text_dim] embeddings of `prompt` and of `negative_prompt` (None when not given)."""
    from diffusers import WanPipeline
    from transformers import AutoTokenizer

    encoder_dir, tokenizer_dir = _find_parts(text_encoder_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SftoolsError(f"{tokenizer_dir}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=_load_encoder(encoder_dir, dtype).to(device),
                       transformer=None, vae=None, scheduler=None)
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(
            prompt, negative_prompt, do_classifier_free_guidance=negative_prompt is not None,
            max_sequence_length=MAX_TOKENS, device=device, dtype=dtype)
    del pipe  # free the encoder (GBs for umT5-XXL) before the transformer is loaded
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return positive, negative


def load_prompt_embeds(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`prompt_embeds` and the optional `negative_prompt_embeds` of a safetensors file as float
    [1, tokens, dim] tensors, unpadded; a one-line error naming the file and key for anything else."""
    tensors = open_checkpoint(path).tensors
    if "prompt_embeds" not in tensors:
        raise SftoolsError(f"{path}: no prompt_embeds tensor (holds {', '.join(sorted(tensors)[:4]) or 'nothing'})")
    positive = _embeds(path, "prompt_embeds", tensors["prompt_embeds"].load())
    if "negative_prompt_embeds" not in tensors:
        return positive, None
    negative = _embeds(path, "negative_prompt_embeds", tensors["negative_prompt_embeds"].load())
    if negative.shape[-1] != positive.shape[-1]:
        raise SftoolsError(f"{path}: negative_prompt_embeds has width {negative.shape[-1]}, prompt_embeds "
                           f"{positive.shape[-1]}; both must come from one text encoder")
    return positive, negative


def _embeds(path: str, key: str, value: torch.Tensor) -> torch.Tensor:
    if value.dim() == 3 and value.shape[0] == 1:
        value = value[0]
    if value.dim() != 2:
        raise SftoolsError(f"{path}: {key} has shape {list(value.shape)}; expected [tokens, dim] or [1, tokens, dim]")
    if not value.is_floating_point():
        raise SftoolsError(f"{path}: {key} is {value.dtype}; expected floating-point embeddings")
    if not 0 < value.shape[0] <= MAX_TOKENS:
        raise SftoolsError(f"{path}: {key} has {value.shape[0]} tokens; expected 1 to {MAX_TOKENS}")
    value = value.float()
    if not torch.isfinite(value).all():
        raise SftoolsError(f"{path}: {key} holds NaN or infinite values")
    return value.unsqueeze(0)
