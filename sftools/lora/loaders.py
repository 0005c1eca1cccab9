"""What each Wan LoRA loader does with each key of a file, as data read from the loaders' own source.

A loader is a table: optional `renames` (regex substitutions the loader makes on every key before it
looks at it, in order), then `rules` read top to bottom; the first rule whose conditions all hold
decides the key: `apply`, `ignore` (the loader drops it, with or without a log line) or `refuse`
(the loader fails on the whole file). A key no rule matches is applied. An `.alpha` key is applied
exactly when both factors of its module are. Every rule and rename names the repository, commit,
file and function it restates, so a new loader version is a change of this table and nothing else;
`check.py` is the engine that reads it, `forms.py` writes each loader's `spelling`.

The commits read (the last six are restated, never copied: GPL-3 or custom licences):
- huggingface/diffusers 58eb52c (its Wan functions are those of diffusers 0.42.1, as installed)
- ModelTC/LightX2V f8aee98, modelscope/DiffSynth-Studio fed7b18 (both Apache-2.0)
- Comfy-Org/ComfyUI a125cd8, kijai/ComfyUI-WanVideoWrapper 3317577, deepbeepmeep/Wan2GP 8681e9f with
  deepbeepmeep/mmgp 04b8d1f (mmgp 3.7.10; 3.7.12, the version Wan2GP pins, has the same functions).

No torch here: the command line lists the loader names at once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    repo: str
    commit: str
    path: str
    where: str  # the function (and what in it) the rule restates

    def __str__(self) -> str:
        return f"{self.repo}@{self.commit[:7]}:{self.path} ({self.where})"


@dataclass(frozen=True)
class Rule:
    """A verdict and the conditions (all must hold; None or empty: any) under which a key gets it."""

    effect: str  # apply | ignore | refuse
    why: str
    source: Source
    prefix: tuple[str, ...] | None = None  # the key's prefix as written (keys.PREFIXES)
    part: tuple[str, ...] | None = None  # up | down | alpha | diff | diff_b | diff_m
    suffix: tuple[str, ...] | None = None  # the suffix as written, e.g. ".lora_B.bias"
    module: str | None = None  # regex, matched whole, on the module's original Wan name
    key: str | None = None  # regex, searched in the key as the loader sees it
    ndim: tuple[int, ...] | None = None  # of the key's tensor
    wan: bool | None = None  # whether the key names a parameter a Wan 2.1 model has
    has: tuple[str, ...] = ()  # parts its module also holds in the file (all of them)
    lacks: str | None = None  # a part its module does not hold
    file_has: tuple[str, ...] = ()  # regexes each found in some key of the file
    file_lacks: str | None = None  # a regex found in no key of the file


@dataclass(frozen=True)
class Rename:
    pattern: str  # regex, substituted everywhere in the key
    replacement: str
    source: Source


@dataclass(frozen=True)
class Spelling:
    """How `--for` writes a LoRA for the loader, before its own rules drop what it cannot apply."""

    form: str  # comfyui | diffusers: the layout of `forms.lora_tensors`
    modulation: str | None  # a modulation change as `diff` (<m>.modulation.diff), `diff_m`, or None: left out
    dense_2d: str  # a dense change of a 2-D weight as `diff`, or as an exact full-rank pair: `factors`
    factor_ndims: tuple[int, ...]  # factor pairs of these ranks stay factors; others are written dense


@dataclass(frozen=True)
class Loader:
    name: str
    title: str
    rules: tuple[Rule, ...]
    spelling: Spelling
    renames: tuple[Rename, ...] = ()


EFFECTS = ("apply", "ignore", "refuse")
NOT_A_WEIGHT = r"(?:.*\.)?modulation|img_emb\.emb_pos"  # parameters that are not a module's .weight
_FACTORS = ("up", "down")
_DIFFS = ("diff", "diff_b", "diff_m")


def _src(repo: str, commit: str):
    return lambda path, where: Source(repo, commit, path, where)


_COMFY = _src("Comfy-Org/ComfyUI", "a125cd84b054a57729b5eecab930ca9408719832")
_WRAPPER = _src("kijai/ComfyUI-WanVideoWrapper", "3317577052282dbd76e3fe3c4f72c8321d761523")
_LIGHTX2V = _src("ModelTC/LightX2V", "f8aee98b5462cca8d7288888146ebd95592bf266")
_WAN2GP = _src("deepbeepmeep/Wan2GP", "8681e9f777f9f847f74a0bdefd13d5b9a6efe12d")
_MMGP = _src("deepbeepmeep/mmgp", "04b8d1fb8c29145759067bc5369a0c597e027828")
_DIFFSYNTH = _src("modelscope/DiffSynth-Studio", "fed7b18fac2ed4cb802796eec91970e7659bccde")
_DIFFUSERS = _src("huggingface/diffusers", "58eb52c0803ea9af3abec60841c2a093bdf1f951")

_KEY_MAP = _COMFY("comfy/lora.py", "model_lora_keys_unet: diffusion_model.<module> and lora_unet_<module> of .weight "
                                    "parameters, diffusion_model.<parameter> of the others")
_LOAD_LORA = _COMFY("comfy/lora.py", "load_lora")
COMFYUI_RULES = (
    Rule("ignore", "only diffusion_model.<module> and lora_unet_<module> names reach a Wan model ('lora key not "
         "loaded')", _KEY_MAP, prefix=("", "model.diffusion_model.", "transformer.")),
    Rule("ignore", "lora_unet_ names exist only for .weight parameters ('lora key not loaded')", _KEY_MAP,
         prefix=("lora_unet_",), module=NOT_A_WEIGHT),
    Rule("ignore", "diff_m is no ComfyUI suffix and <blocks.N|head> no model key ('lora key not loaded'); "
         "ComfyUI reads <blocks.N|head>.modulation.diff", _LOAD_LORA, part=("diff_m",)),
    Rule("ignore", "lora_B.bias is no suffix load_lora reads ('lora key not loaded')", _LOAD_LORA,
         suffix=(".lora_B.bias",)),
    Rule("ignore", "names no parameter of a Wan 2.1 model ('lora key not loaded' or 'NOT LOADED')", _KEY_MAP,
         wan=False),
    Rule("refuse", "load_lora reads the lora_down of every lora_up (KeyError)",
         _COMFY("comfy/weight_adapter/lora.py", "LoRAAdapter.load"), part=("up",), lacks="down"),
    Rule("ignore", "a lora_down without its lora_up is not loaded ('lora key not loaded')", _LOAD_LORA,
         part=("down",), lacks="up"),
    Rule("ignore", "the module's .diff replaces its factors in load_lora's patch_dict", _LOAD_LORA,
         part=_FACTORS, has=("diff",)),
)

_STANDARDIZE = _WRAPPER("nodes_model_loading.py", "standardize_lora_key_format, before ComfyUI's "
                                                  "load_lora_for_models (merge_loras defaults to True)")
WRAPPER_RENAMES = (
    Rename(r"^transformer\.", "diffusion_model.", _STANDARDIZE),
    Rename(r"^(vace_)?blocks\.", r"diffusion_model.\1blocks.", _STANDARDIZE),
    Rename(r"\.default\.", ".", _STANDARDIZE),
    Rename(r"\.diff_m$", ".modulation.diff", _STANDARDIZE),
    Rename(r"^base_model\.model\.", "diffusion_model.", _STANDARDIZE),
    # The "Finetrainer" rule maps diffusers' attn1 (self-attention) and attn2 alike to cross_attn.
    Rename(r"\.attn[12]\.to_([qkv])\.", r".cross_attn.\1.", _STANDARDIZE),
    Rename(r"\.attn[12]\.to_out\.0\.", ".cross_attn.o.", _STANDARDIZE),
    Rename(r"\.attn[12]\.", ".cross_attn.", _STANDARDIZE),
)

_LX_LOADER = _LIGHTX2V("lightx2v/utils/lora_loader.py", "LoRALoader.apply_lora, called by "
                                                        "models/networks/lora_adapter.py LoraAdapter (merged LoRAs)")
LIGHTX2V_RULES = (
    Rule("ignore", "_remove_prefixes strips only diffusion_model., model. or unet.; the rest names no weight",
         _LX_LOADER, prefix=("model.diffusion_model.", "lora_unet_", "transformer.")),
    Rule("ignore", "no pattern of LoRAPatternMatcher or extract_lora_diffs ends in lora_B.bias ('Unused')",
         _LX_LOADER, suffix=(".lora_B.bias",)),
    Rule("ignore", "a .diff targets <module>.weight, which <blocks.N|head>.modulation.weight is not; "
         "LightX2V reads <blocks.N|head>.diff_m", _LX_LOADER, part=("diff",), module=NOT_A_WEIGHT),
    Rule("ignore", "apply_lora multiplies only 2-D factors ('Unexpected LoRA shape')", _LX_LOADER,
         part=_FACTORS, ndim=(1, 3, 4, 5)),
    Rule("ignore", "extract_lora_pair needs both factors of a module", _LX_LOADER, part=("up",), lacks="down"),
    Rule("ignore", "extract_lora_pair starts from the lora_up; a lone lora_down is 'Unused'", _LX_LOADER,
         part=("down",), lacks="up"),
    Rule("ignore", "names no weight of a Wan 2.1 model ('Model key not found')", _LX_LOADER, wan=False),
)

_PREPROCESS = _WAN2GP("models/wan/modules/model.py", "WanModel.preprocess_loras, the preprocess_sd of "
                                                     "wgp.py's load_loras_into_model call")
_MMGP_LOAD = _MMGP("src/mmgp/offload.py", "load_loras_into_model")
_KOHYA_TOP = (("lora_unet_head_head", "diffusion_model.head.head"), ("lora_unet_img_emb_proj_", "diffusion_model.img_emb.proj."),
              ("lora_unet_text_embedding_", "diffusion_model.text_embedding."),
              ("lora_unet_time_embedding_", "diffusion_model.time_embedding."),
              ("lora_unet_time_projection_", "diffusion_model.time_projection."))
WAN2GP_RENAMES = (
    Rename(r"^lora_unet_blocks_", "diffusion_model.blocks.", _PREPROCESS),
    *(Rename(f"^{old}", new, _PREPROCESS) for old, new in _KOHYA_TOP),
    *(Rename(f"_{word}_", f".{word}.", _PREPROCESS) for word in ("cross_attn", "self_attn", "ffn")),
)  # (it also respells lora_up/lora_down as lora_B/lora_A, which mmgp reads alike)
WAN2GP_RULES = (
    Rule("ignore", "preprocess_loras deletes every key ending in modulation.diff", _PREPROCESS,
         key=r"modulation\.diff$"),
    Rule("refuse", "diff_m is a 'non Lora key' to mmgp: the whole file is refused", _MMGP_LOAD, part=("diff_m",)),
    Rule("refuse", "after .lora_ mmgp takes only lora_A/lora_B/lora_down/lora_up .weight: 'contains non Lora keys', "
         "the whole file is refused", _MMGP_LOAD, suffix=(".lora_B.bias",)),
    Rule("refuse", "mmgp strips only diffusion_model. and transformer.; these names are no module of Wan2GP's "
         "WanModel: 'unexpected module keys', the whole file is refused", _MMGP_LOAD,
         prefix=("model.diffusion_model.", "transformer.", "lora_unet_")),
    Rule("refuse", "no module (or no bias) of Wan2GP's WanModel: 'unexpected module keys', the whole file is refused",
         _MMGP_LOAD, wan=False),
    Rule("refuse", "a .diff and factors of one module share mmgp's lora_B slot: the Linear forward fails at the first step",
         _MMGP("src/mmgp/offload.py", "load_loras_into_model and offload._lora_linear_forward"), part=("diff",), has=("up",)),
    Rule("refuse", "a factor without its pair: mmgp's Linear forward fails at the first step",
         _MMGP("src/mmgp/offload.py", "offload._lora_linear_forward"), part=("up",), lacks="down"),
    Rule("refuse", "a factor without its pair: mmgp's Linear forward fails at the first step",
         _MMGP("src/mmgp/offload.py", "offload._lora_linear_forward"), part=("down",), lacks="up"),
    Rule("ignore", "mmgp stores a .diff as lora_B, but the forward of non-Linear modules (norms, the Conv3d "
         "patch_embedding) adds lora_A: loaded, never applied",
         _MMGP("src/mmgp/offload.py", "load_loras_into_model and offload._lora_generic_forward"),
         part=("diff",), ndim=(1, 3, 4, 5)),
    Rule("refuse", "factors of a non-Linear module (the 5-D patch_embedding): mmgp's generic forward adds lora_A to "
         "the weight, which fails at the first step",
         _MMGP("src/mmgp/offload.py", "offload._lora_generic_forward"), part=_FACTORS, ndim=(3, 4, 5)),
)

_GENERAL = _DIFFSYNTH("diffsynth/utils/lora/general.py", "GeneralLoRALoader.get_name_dict / convert_state_dict / "
                                                         "fuse_lora_to_base_model, as BasePipeline.load_lora calls them")
DIFFSYNTH_RULES = (
    Rule("ignore", "get_name_dict maps lora_B.bias to the module its lora_B.weight (later in the file) replaces",
         _GENERAL, suffix=(".lora_B.bias",), has=("up",)),
    Rule("refuse", "convert_state_dict looks up the lora_A.bias of a lora_B.bias (KeyError)", _GENERAL,
         suffix=(".lora_B.bias",)),
    Rule("refuse", "convert_state_dict looks up the lora_down of every lora_up (KeyError)", _GENERAL,
         part=("up",), lacks="down"),
    Rule("ignore", "only lora_up/lora_B pairs are read: .diff, .diff_b and .diff_m are dropped", _GENERAL,
         part=_DIFFS),
    Rule("ignore", "only diffusion_model. is stripped; the rest names no module of DiffSynth's WanModel", _GENERAL,
         prefix=("model.diffusion_model.", "lora_unet_", "transformer.")),
    Rule("ignore", "names no module of DiffSynth's WanModel", _GENERAL, wan=False),
    Rule("ignore", "a lora_down without its lora_up is never read", _GENERAL, part=("down",), lacks="up"),
    Rule("refuse", "fuse_lora_to_base_model multiplies the factors with torch.mm, which fails on 5-D ones",
         _GENERAL, part=_FACTORS, ndim=(3, 5)),
)

_CONVERTER = _DIFFUSERS("src/diffusers/loaders/lora_conversion_utils.py", "_convert_non_diffusers_wan_lora_to_diffusers")
_MUSUBI = _DIFFUSERS("src/diffusers/loaders/lora_conversion_utils.py", "_convert_musubi_wan_lora_to_diffusers")
_WAN_MIXIN = _DIFFUSERS("src/diffusers/loaders/lora_pipeline.py", "WanLoraLoaderMixin.load_lora_weights and "
                                                                   "load_lora_adapter (keys under transformer.)")
_COMFY_FILE = (r"^diffusion_model\.",)  # any such key sends the whole file through the converter
_BLOCK_LINEAR = r"blocks\.\d+\.(?:(?:self_attn|cross_attn)\.[qkvo]|ffn\.[02])"
_CONVERTED = (_BLOCK_LINEAR + r"|time_projection\.1|head\.head|(?:text|time)_embedding\.[02]|img_emb\.proj\.[13]")
_MUSUBI_WHY = ("musubi names are converted only as lora_down/lora_up/alpha of block attention and FFN linears, every "
               "module with its alpha (KeyError or ValueError otherwise)")
_EMBEDDING_WHY = "text_embedding/time_embedding factors are read whenever the module has a key (KeyError)"
_PEFT_NOISE = ("a lora_up without its lora_down: peft keeps its random initial lora_A ('missing keys'), so the "
               "module changes by noise, not by this key")
_PEFT_NOTHING = "a lora_down without its lora_up: peft keeps its zero initial lora_B ('missing keys')"
DIFFUSERS_RULES = (
    # A file with any diffusion_model. key goes through the converter ...
    Rule("refuse", "the converter takes the block numbers from blocks.N keys (min() of none: ValueError)",
         _CONVERTER, file_has=_COMFY_FILE, file_lacks=r"^diffusion_model\.blocks\.\d+\."),
    Rule("refuse", "the converter reads lora_A/lora_B for the whole file once any key says lora_A; lora_down/lora_up "
         "keys are left over (ValueError)", _CONVERTER, file_has=(*_COMFY_FILE, r"\.lora_A\."),
         suffix=(".lora_down.weight", ".lora_up.weight")),
    Rule("refuse", "lora_B.bias is no key the converter reads: left over (ValueError: state_dict should be empty)",
         _CONVERTER, file_has=_COMFY_FILE, suffix=(".lora_B.bias",)),
    Rule("ignore", "norm .diff/.diff_b keys are removed ('norm diff key ... unsupported')", _CONVERTER,
         file_has=_COMFY_FILE, key=r"norm.*\.diff(?:_b)?$"),
    Rule("ignore", "time_projection keys are dropped when no time_projection factors exist (the AccVideo case)",
         _CONVERTER, file_has=_COMFY_FILE, file_lacks=r"^diffusion_model\.time_projection.*\.weight$",
         module=r"time_projection\.1"),
    Rule("refuse", _EMBEDDING_WHY, _CONVERTER, file_has=_COMFY_FILE, module=r"(?:text|time)_embedding\.[02]", lacks="up"),
    Rule("refuse", _EMBEDDING_WHY, _CONVERTER, file_has=_COMFY_FILE, module=r"(?:text|time)_embedding\.[02]", lacks="down"),
    Rule("refuse", "head.head.diff becomes proj_out.lora_A with an identity lora_B sized by head.head.diff_b "
         "(KeyError without it)", _CONVERTER, file_has=_COMFY_FILE, module=r"head\.head", part=("diff",), lacks="diff_b"),
    Rule("ignore", _PEFT_NOISE, _WAN_MIXIN, file_has=_COMFY_FILE, part=("up",), lacks="down"),
    Rule("ignore", _PEFT_NOTHING, _WAN_MIXIN, file_has=_COMFY_FILE, part=("down",), lacks="up"),
    Rule("apply", "converted to attn1/attn2/ffn lora_A/lora_B (alpha baked in, diff_b as lora_B.bias)", _CONVERTER,
         file_has=_COMFY_FILE, module=_BLOCK_LINEAR, part=("up", "down", "alpha", "diff_b")),
    Rule("apply", "k_img/v_img are converted to add_k_proj/add_v_proj when the file has both", _CONVERTER,
         file_has=(*_COMFY_FILE, r"k_img", r"v_img"), module=r"blocks\.\d+\.cross_attn\.[kv]_img",
         part=("up", "down", "alpha", "diff_b")),
    Rule("apply", "head.head.diff becomes proj_out.lora_A with an identity lora_B", _CONVERTER,
         file_has=_COMFY_FILE, module=r"head\.head", part=("diff",)),
    Rule("ignore", "an img_emb diff_b is read only with its lora_up; left over, ignored as a diff key", _CONVERTER,
         file_has=_COMFY_FILE, module=r"img_emb\.proj\.[13]", part=("diff_b",), lacks="up"),
    Rule("apply", "converted to condition_embedder / proj_out lora_A/lora_B (diff_b as lora_B.bias)", _CONVERTER,
         file_has=_COMFY_FILE, module=_CONVERTED, part=("up", "down", "diff_b")),
    Rule("ignore", "left over; leftover keys that all hold .diff are ignored ('diff keys which we do not handle yet')",
         _CONVERTER, file_has=_COMFY_FILE, part=_DIFFS),
    Rule("refuse", "left over after the conversion (ValueError: state_dict should be empty)", _CONVERTER,
         file_has=_COMFY_FILE),
    # else a file with lora_unet_ keys goes through the musubi converter, whose "every block holds all ten
    # modules" this table does not check ...
    Rule("refuse", _MUSUBI_WHY, _MUSUBI, prefix=("lora_unet_",), part=_DIFFS),
    Rule("refuse", _MUSUBI_WHY, _MUSUBI, prefix=("lora_unet_",), lacks="alpha"),
    Rule("apply", "converted from musubi names to attn1/attn2/ffn lora_A/lora_B", _MUSUBI, prefix=("lora_unet_",),
         module=r"blocks\.\d+\.(?:(?:self_attn|cross_attn)\.(?:[qkvo]|[kv]_img)|ffn\.[02])"),
    Rule("refuse", _MUSUBI_WHY, _MUSUBI, prefix=("lora_unet_",)),
    # ... and any other file is read as peft names under transformer.
    Rule("refuse", "every key must contain 'lora' (ValueError: Invalid LoRA checkpoint)", _WAN_MIXIN,
         key=r"^(?:(?!lora).)*$"),
    Rule("ignore", "only keys under transformer. reach the transformer ('No LoRA keys associated ... found')",
         _WAN_MIXIN, prefix=("", "model.diffusion_model.")),
    Rule("ignore", _PEFT_NOISE, _WAN_MIXIN, part=("up",), lacks="down"),
    Rule("ignore", _PEFT_NOTHING, _WAN_MIXIN, part=("down",), lacks="up"),
)

LOADERS = {loader.name: loader for loader in (
    Loader("comfyui", "ComfyUI (native LoRA loader)", COMFYUI_RULES,
           Spelling("comfyui", modulation="diff", dense_2d="diff", factor_ndims=(2, 5))),
    Loader("wanvideowrapper", "Kijai's ComfyUI-WanVideoWrapper", COMFYUI_RULES,
           Spelling("comfyui", modulation="diff", dense_2d="diff", factor_ndims=(2, 5)), WRAPPER_RENAMES),
    Loader("lightx2v", "LightX2V", LIGHTX2V_RULES,
           Spelling("comfyui", modulation="diff_m", dense_2d="diff", factor_ndims=(2,))),
    Loader("wan2gp", "Wan2GP (with mmgp)", WAN2GP_RULES,
           Spelling("comfyui", modulation=None, dense_2d="diff", factor_ndims=(2,)), WAN2GP_RENAMES),
    Loader("diffsynth", "DiffSynth-Studio", DIFFSYNTH_RULES,
           Spelling("comfyui", modulation=None, dense_2d="factors", factor_ndims=(2,))),
    Loader("diffusers", "diffusers (WanPipeline.load_lora_weights)", DIFFUSERS_RULES,
           Spelling("diffusers", modulation=None, dense_2d="factors", factor_ndims=(2,))),
)}
LOADER_NAMES = tuple(LOADERS)
