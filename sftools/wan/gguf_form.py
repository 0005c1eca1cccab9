"""Wan weights as the GGUF files city96's ComfyUI-GGUF loads: which tensor is stored as which type.

The rules restate ComfyUI-GGUF's own converter (city96/ComfyUI-GGUF 795e4515; reference
quantized_outputs.md §4):
- `general.architecture` is "wan" (loader.py IMG_ARCH_LIST; tools/lcpp.patch LLM_ARCH_WAN), tensor
  names are the original Wan keys.
- Only the Linears of the blocks (and VACE blocks) take the requested type: its llama.cpp patch
  quantizes 2-D tensors outside `modulation.`, `patch_embedding.`, `text_embedding.`,
  `time_projection.`, `time_embedding.`, `img_emb.` and `head.`, which in a Wan model leaves exactly
  the block Linears (self/cross attention q k v o, k_img, v_img, ffn.0, ffn.2, VACE before/after_proj).
- Tensors that are not 2-D are F32: 1-D ones (tools/convert.py), `modulation` and FLF2V's `emb_pos`
  (nn.Parameters, which the loader cannot take from BF16: `keys_hiprec`), and the 5-D patch
  embeddings, whole (tools/fix_5d_tensors.py adds them back as F32).
- The other 2-D tensors (embeddings, time projection, head, img_emb) are not quantized: they keep the
  source's float type, so they are stored bit for bit.
"""

from __future__ import annotations

import re

import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from sftools.errors import SftoolsError
from sftools.io.gguf_io import GGUFTensor
from sftools.io.lazy import LazyTensor

ARCH = "wan"
BLOCK = re.compile(r"^(vace_)?blocks\.\d+\.")
# The GGUF float type that holds a torch float as it is (float64 is rounded to float32, as gguf-py does).
KEPT = {torch.float32: Q.F32, torch.bfloat16: Q.BF16, torch.float16: Q.F16, torch.float64: Q.F32}


def gguf_tensors(tensors: dict[str, LazyTensor], quant: str) -> list[GGUFTensor]:
    """Every tensor of a Wan model (original names) with the GGUF type it is stored as."""
    return [GGUFTensor(name, t, _qtype(name, t, Q[quant])) for name, t in tensors.items()]


def file_type(quant: str) -> LlamaFileType:
    """`general.file_type` of a file whose bulk is `quant` (llama.cpp's MOSTLY_Q8_0, ...)."""
    return LlamaFileType[f"MOSTLY_{quant}"]


def _qtype(name: str, t: LazyTensor, quant: Q) -> Q:
    if t.dtype not in KEPT:
        raise SftoolsError(f"tensor {name} is {t.dtype}; a GGUF of a Wan model holds floats only")
    if len(t.shape) != 2:
        return Q.F32
    return quant if BLOCK.match(name) else KEPT[t.dtype]
