"""Tiny random text encoder, tokenizer and VAE in the diffusers pipeline layout, for tests and
`sftools demo`: `folder/text_encoder/`, `folder/tokenizer/` and `folder/vae/`, read back by the
same `from_pretrained(..., local_files_only=True)` calls as the real Wan 2.1 parts. Nothing is
downloaded; weights come from a seeded generator, the tokenizer is defined here.
"""

from __future__ import annotations

import os
import sys

import torch

# A handful of prompt words as whole tokens, and single characters so any text still tokenizes.
WORDS = ("a an the cat dog man woman car bird walks runs flies on in at under beach city street forest "
         "night day sunset rain snow red blue green white black slow fast camera video").split()
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
SPACE = "\u2581"  # sentencepiece's word boundary mark, as in umT5's vocabulary


def _quiet_transformers() -> None:
    """transformers shows its save/load bars even off a terminal; sftools' own rule is terminals only."""
    from transformers.utils import logging as transformers_logging

    if not sys.stderr.isatty():
        transformers_logging.disable_progress_bar()


def _tokenizer():
    """A umT5-like fast tokenizer: Unigram over the words above, <pad>=0, </s>=1, <unk>=2, an
    </s> appended to every text (umT5 appends one too)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (SPACE, -2.0)]
    vocab += [(SPACE + w, -1.0) for w in WORDS] + [(c, -5.0) for c in CHARS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def write_tiny_text_encoder(folder: str, text_dim: int = 32, seed: int = 0) -> str:
    """`folder/text_encoder/` (a random 2-layer `UMT5EncoderModel` of width `text_dim`) and
    `folder/tokenizer/`; returns `folder`."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _tokenizer()
    config = UMT5Config(vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                        feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config).eval()
    _quiet_transformers()
    model.save_pretrained(os.path.join(folder, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    return folder


def write_tiny_vae(folder: str, seed: int = 0) -> str:
    """`folder/vae/`: diffusers' own tiny `AutoencoderKLWan` test configuration, random weights
    (its default initialization already gives frames that vary in space and time); returns `folder`."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    vae.save_pretrained(os.path.join(folder, "vae"))
    return folder
