"""Checkpoint configuration: what a `config.json` says, in one typed shape for every layout.

Torch-free on purpose: the CLI and the exporter read configs without building a model. Each
supported on-disk layout is one `LayoutSpec` in `LAYOUTS`, declaring its `model_type`, its image
placeholder token, which model family it builds, how its projectors are shaped and how to read and
write its `config.json`. Generic code asks the spec; it never branches on the layout name.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nvlm_export.errors import CheckpointError

CONFIG_FILE = "config.json"

# The NVLM-D reference code pads InternViT-6B's 25 heads with exactly 7 zero-initialised heads
# (tensor-parallel 8 needs a multiple of 8); a checkpoint's true count is read from its tensors.
NVLM_D_DUMMY_HEADS = 7

# Decoder classes we can build, keyed by the `architectures` entry that selects them. A config
# without `architectures` falls back to its `model_type`.
DECODER_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
DECODER_BY_MODEL_TYPE = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass(frozen=True)
class VisionConfig:
    """InternViT geometry. One definition covers the 6B style (NVLM-D) and the 300M style."""

    hidden_size: int
    num_layers: int
    num_heads: int  # real heads, as the config states them
    intermediate_size: int
    norm_type: str  # "rms_norm" (6B style) or "layer_norm" (300M style)
    qk_normalization: bool
    qkv_bias: bool
    num_dummy_heads: int = 0  # extra padded heads stored in the checkpoint (6B style: 7)
    layer_scale: bool = True
    patch_size: int = 14
    image_size: int = 448
    num_channels: int = 3
    eps: float = 1e-6
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_heads(self) -> int:
        return self.num_heads + self.num_dummy_heads

    @property
    def attention_dim(self) -> int:
        """Width of q, k, v and the attention output: all stored heads, dummies included."""
        return self.padded_heads * self.head_dim

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + 1  # patches + CLS


@dataclass(frozen=True)
class ProjectorConfig:
    """The 2-layer MLP from pixel-shuffled vision features to the LLM's embedding width."""

    in_features: int  # 4 * Dv after pixel shuffle 0.5
    hidden_features: int  # NVLM-D: the LLM's intermediate size; InternVL: the LLM's hidden size
    out_features: int  # D_llm
    bias: bool
    norm_eps: float = 1e-5  # nn.LayerNorm's default, as in the reference code


@dataclass(frozen=True)
class LinearProjectorConfig:
    """NVLM-X / NVLM-H tile projector: the paper's 1-layer MLP, 4*Dv -> D_llm."""

    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class CrossAttentionConfig:
    """NVLM-X / NVLM-H gated cross-attention: one block after every `every`-th decoder layer.

    72B: 80 layers, every 8 -> 10 blocks (after layers 8, 16, ..., 80); 34B: every 6. The blocks
    have the decoder's width, heads, KV heads and MLP width (read from `llm_config`).
    """

    every: int
    num_decoder_layers: int

    @property
    def num_blocks(self) -> int:
        return self.num_decoder_layers // self.every

    def block_after(self, layer: int) -> int | None:
        """The index of the block that follows decoder layer `layer` (0-based), if any."""
        block, remainder = divmod(layer + 1, self.every)
        return block - 1 if remainder == 0 else None


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a vision-language model from one checkpoint directory."""

    layout: str
    vision: VisionConfig
    projector: ProjectorConfig | None  # the 2-layer MLP into the decoder sequence (not NVLM-X)
    llm_config: dict[str, Any]
    downsample_ratio: float = 0.5
    select_layer: int = -1
    ps_version: str = "v2"
    template: str | None = None
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    use_thumbnail: bool = True
    image_token_id: int | None = None  # resolved from the tokenizer at load time when absent
    cross_projector: LinearProjectorConfig | None = None  # NVLM-X/H: tiles -> cross sequence
    cross_attention: CrossAttentionConfig | None = None  # NVLM-X/H
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def decoder_architecture(self) -> str:
        return decoder_architecture(self.llm_config)

    @property
    def llm_hidden_size(self) -> int:
        return int(self.llm_config["hidden_size"])

    @property
    def tokens_per_tile(self) -> int:
        return int(self.vision.grid_size**2 * self.downsample_ratio**2)

    @property
    def spec(self) -> LayoutSpec:
        return layout_spec(self.layout)

    def with_dummy_heads(self, num_dummy_heads: int) -> ModelConfig:
        return replace(self, vision=replace(self.vision, num_dummy_heads=num_dummy_heads))


@dataclass(frozen=True)
class LayoutSpec:
    """One on-disk checkpoint layout: how to recognise, read and write it."""

    name: str
    model_type: str
    description: str
    image_token: str  # the placeholder whose embeddings image features overwrite
    stores_dummy_heads: bool  # padded attention heads allowed; their count is read from tensors
    default_dummy_heads: int  # used when no stored tensors are available to count them
    projector_bias: bool
    projector_hidden: str  # which LLM width the projector's middle layer has
    parse: Callable[[Mapping[str, Any], LayoutSpec], ModelConfig]
    render: Callable[[ModelConfig], dict[str, Any]]
    # Which model family `build_model` makes: "decoder-only" (image tokens in the decoder
    # sequence) or "cross-attention" (NVLM-X/H: gated cross-attention blocks in the decoder).
    family: str = "decoder-only"
    decoder_projector: bool = True  # has the 2-layer MLP (NVLM-X has none)
    cross_projector_bias: bool = False  # the 1-layer tile projector of cross-attention models


def decoder_architecture(llm_config: Mapping[str, Any]) -> str:
    """The decoder class name, from `architectures` first (as the NVLM-D remote code does).

    NVLM-D-72B's llm_config says model_type "llama" but architectures ["Qwen2ForCausalLM"] and
    carries Qwen2's q/k/v biases, so `architectures` must win over `model_type`.
    """
    architectures = llm_config.get("architectures") or []
    name = architectures[0] if architectures else None
    if name is None:
        name = DECODER_BY_MODEL_TYPE.get(str(llm_config.get("model_type")))
    if name not in DECODER_ARCHITECTURES:
        raise CheckpointError(
            f"Unsupported language model architecture {name or llm_config.get('model_type')!r}",
            why=f"supported decoders are {', '.join(DECODER_ARCHITECTURES)}",
            fix="Use a checkpoint whose llm_config/text_config names one of them",
        )
    return name


def projector_hidden_width(llm_config: Mapping[str, Any], which: str) -> int:
    return int(llm_config["intermediate_size" if which == "intermediate" else "hidden_size"])


def _require(config: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in config:
        raise CheckpointError(
            f"{where} has no {key!r}",
            why="the layout needs it to build the model",
            fix="Check that the checkpoint's config.json is complete",
        )
    return config[key]


def decoder_projector_config(
    spec: LayoutSpec, vision: VisionConfig, llm: Mapping[str, Any], ratio: float
) -> ProjectorConfig | None:
    """The 2-layer MLP's shape, or None for a layout without one (NVLM-X)."""
    if not spec.decoder_projector:
        return None
    return ProjectorConfig(
        in_features=vision.hidden_size * round(1 / ratio) ** 2,
        hidden_features=projector_hidden_width(llm, spec.projector_hidden),
        out_features=int(llm["hidden_size"]),
        bias=spec.projector_bias,
    )


def cross_projector_config(
    spec: LayoutSpec, vision: VisionConfig, llm: Mapping[str, Any], ratio: float
) -> LinearProjectorConfig:
    return LinearProjectorConfig(
        in_features=vision.hidden_size * round(1 / ratio) ** 2,
        out_features=int(llm["hidden_size"]),
        bias=spec.cross_projector_bias,
    )


def cross_attention_config(every: Any, llm: Mapping[str, Any], where: str) -> CrossAttentionConfig:
    """Validated cross-attention placement: at least one block, at most one per decoder layer."""
    layers = int(llm["num_hidden_layers"])
    if isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= layers:
        raise CheckpointError(
            f"{where} has cross_attention_every={every!r}",
            why=f"it must be an integer from 1 to the decoder's {layers} layers",
            fix="Check that config.json belongs to an NVLM-X/H checkpoint",
        )
    return CrossAttentionConfig(every=every, num_decoder_layers=layers)


# --- remote-code layouts (NVLM_D, internvl_chat): vision_config + llm_config -------------------


def _remote_vision(vc: Mapping[str, Any], image_size: int, dummy_heads: int) -> VisionConfig:
    where = "config.json vision_config"
    return VisionConfig(
        hidden_size=int(_require(vc, "hidden_size", where)),
        num_layers=int(_require(vc, "num_hidden_layers", where)),
        num_heads=int(_require(vc, "num_attention_heads", where)),
        intermediate_size=int(_require(vc, "intermediate_size", where)),
        norm_type=str(vc.get("norm_type", "rms_norm")),
        qk_normalization=bool(vc.get("qk_normalization", False)),
        qkv_bias=bool(vc.get("qkv_bias", True)),
        num_dummy_heads=dummy_heads,
        patch_size=int(vc.get("patch_size", 14)),
        image_size=int(image_size or vc.get("image_size", 448)),
        num_channels=int(vc.get("num_channels", 3)),
        eps=float(vc.get("layer_norm_eps", 1e-6)),
        hidden_act=str(vc.get("hidden_act", "gelu")),
    )


def _parse_remote(config: Mapping[str, Any], spec: LayoutSpec) -> ModelConfig:
    vc = _require(config, "vision_config", "config.json")
    llm = dict(_require(config, "llm_config", "config.json"))
    decoder_architecture(llm)
    ratio = float(config.get("downsample_ratio", 0.5))
    vision = _remote_vision(vc, config.get("force_image_size") or 0, spec.default_dummy_heads)
    return ModelConfig(
        layout=spec.name,
        vision=vision,
        projector=decoder_projector_config(spec, vision, llm, ratio),
        llm_config=llm,
        downsample_ratio=ratio,
        select_layer=int(config.get("select_layer", -1)),
        ps_version=str(config.get("ps_version", "v2")),
        template=config.get("template"),
        min_dynamic_patch=int(config.get("min_dynamic_patch", 1)),
        max_dynamic_patch=int(config.get("max_dynamic_patch", 6)),
        use_thumbnail=bool(config.get("use_thumbnail", True)),
        image_token_id=config.get("image_token_id"),
        raw=copy.deepcopy(dict(config)),
    )


def _render_remote(config: ModelConfig) -> dict[str, Any]:
    v = config.vision
    same_layout = config.raw.get("model_type") == config.spec.model_type
    out = copy.deepcopy(config.raw) if same_layout else {}
    vision_config = dict(out.get("vision_config", {}))
    vision_config.update(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size,
        norm_type=v.norm_type,
        qk_normalization=v.qk_normalization,
        qkv_bias=v.qkv_bias,
        patch_size=v.patch_size,
        image_size=v.image_size,
        num_channels=v.num_channels,
        layer_norm_eps=v.eps,
        hidden_act=v.hidden_act,
    )
    out.update(
        architectures=out.get("architectures", [_REMOTE_ARCHITECTURE[config.layout]]),
        model_type=config.spec.model_type,
        vision_config=vision_config,
        llm_config=copy.deepcopy(config.llm_config),
        downsample_ratio=config.downsample_ratio,
        force_image_size=v.image_size,
        select_layer=config.select_layer,
        ps_version=config.ps_version,
        template=config.template,
        min_dynamic_patch=config.min_dynamic_patch,
        max_dynamic_patch=config.max_dynamic_patch,
        use_thumbnail=config.use_thumbnail,
        dynamic_image_size=True,
    )
    # No image_token_id: the remote-code layouts take it from the tokenizer.
    return out


_REMOTE_ARCHITECTURE = {
    "nvlm-d": "NVLM_D",
    "internvl": "InternVLChatModel",
    "nvlm-x": "NVLM_X",
    "nvlm-h": "NVLM_H",
}


# --- NVLM-X / NVLM-H (the project's own format): NVLM-D's config + `cross_attention_every` -------

CROSS_ATTENTION_EVERY = "cross_attention_every"


def _parse_cross(config: Mapping[str, Any], spec: LayoutSpec) -> ModelConfig:
    parsed = _parse_remote(config, spec)
    every = _require(config, CROSS_ATTENTION_EVERY, "config.json")
    return replace(
        parsed,
        cross_projector=cross_projector_config(
            spec, parsed.vision, parsed.llm_config, parsed.downsample_ratio
        ),
        cross_attention=cross_attention_config(every, parsed.llm_config, "config.json"),
    )


def _render_cross(config: ModelConfig) -> dict[str, Any]:
    if config.cross_attention is None:
        raise CheckpointError(
            f"A {config.layout} config needs its cross-attention settings",
            fix="Build the config with cross_attention set",
        )
    return _render_remote(config) | {CROSS_ATTENTION_EVERY: config.cross_attention.every}


# --- transformers-native InternVL (model_type "internvl"): vision_config + text_config ---------


def _single(value: Any) -> int:
    """transformers stores image/patch sizes as [h, w]; InternVL tiles are square."""
    return int(value[0] if isinstance(value, list | tuple) else value)


def _parse_hf(config: Mapping[str, Any], spec: LayoutSpec) -> ModelConfig:
    vc = _require(config, "vision_config", "config.json")
    text = dict(_require(config, "text_config", "config.json"))
    decoder_architecture(text)
    where = "config.json vision_config"
    if not vc.get("use_mean_pooling", True) or not vc.get("use_absolute_position_embeddings", True):
        raise CheckpointError(
            "Unsupported InternVL vision tower variant",
            why="only use_mean_pooling=true with absolute position embeddings matches InternViT",
            fix="Convert the checkpoint with transformers' defaults for InternVL",
        )
    vision = VisionConfig(
        hidden_size=int(_require(vc, "hidden_size", where)),
        num_layers=int(_require(vc, "num_hidden_layers", where)),
        num_heads=int(_require(vc, "num_attention_heads", where)),
        intermediate_size=int(_require(vc, "intermediate_size", where)),
        norm_type=str(vc.get("norm_type", "layer_norm")),
        qk_normalization=bool(vc.get("use_qk_norm", False)),
        qkv_bias=bool(vc.get("attention_bias", False)),
        patch_size=_single(vc.get("patch_size", 14)),
        image_size=_single(vc.get("image_size", 448)),
        num_channels=int(vc.get("num_channels", 3)),
        eps=float(vc.get("layer_norm_eps", 1e-6)),
        hidden_act=str(vc.get("hidden_act", "gelu")),
    )
    ratio = float(config.get("downsample_ratio", 0.5))
    return ModelConfig(
        layout=spec.name,
        vision=vision,
        projector=decoder_projector_config(spec, vision, text, ratio),
        llm_config=text,
        downsample_ratio=ratio,
        select_layer=int(config.get("vision_feature_layer", -1)),
        template="internvl2_5",
        max_dynamic_patch=12,
        image_token_id=config.get("image_token_id", 151667),
        raw=copy.deepcopy(dict(config)),
    )


def _render_hf(config: ModelConfig) -> dict[str, Any]:
    v = config.vision
    tied = bool(config.llm_config.get("tie_word_embeddings", False))
    out = copy.deepcopy(config.raw) if config.raw.get("model_type") == "internvl" else {}
    vision_config = dict(out.get("vision_config", {}))
    vision_config.update(
        model_type="internvl_vision",
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size,
        norm_type=v.norm_type,
        use_qk_norm=v.qk_normalization,
        attention_bias=v.qkv_bias,
        patch_size=[v.patch_size, v.patch_size],
        image_size=[v.image_size, v.image_size],
        num_channels=v.num_channels,
        layer_norm_eps=v.eps,
        hidden_act=v.hidden_act,
        use_mean_pooling=True,
        use_absolute_position_embeddings=True,
    )
    out.update(
        architectures=["InternVLForConditionalGeneration"],
        model_type="internvl",
        vision_config=vision_config,
        text_config=copy.deepcopy(config.llm_config),
        image_token_id=config.image_token_id,
        image_seq_length=config.tokens_per_tile,
        downsample_ratio=config.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=config.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tied,
    )
    return out


LAYOUTS: dict[str, LayoutSpec] = {
    spec.name: spec
    for spec in (
        LayoutSpec(
            name="nvlm-d",
            model_type="NVLM_D",
            description="NVIDIA NVLM-D remote-code checkpoint (InternViT-6B style, Qwen2 decoder)",
            image_token="<|vision_pad|>",
            stores_dummy_heads=True,
            default_dummy_heads=NVLM_D_DUMMY_HEADS,
            projector_bias=False,
            projector_hidden="intermediate",
            parse=_parse_remote,
            render=_render_remote,
        ),
        LayoutSpec(
            name="internvl",
            model_type="internvl_chat",
            description="OpenGVLab InternVL2/2.5/3 remote-code checkpoint",
            image_token="<IMG_CONTEXT>",
            stores_dummy_heads=False,
            default_dummy_heads=0,
            projector_bias=True,
            projector_hidden="hidden",
            parse=_parse_remote,
            render=_render_remote,
        ),
        LayoutSpec(
            name="internvl-hf",
            model_type="internvl",
            description="transformers-native InternVLForConditionalGeneration checkpoint",
            image_token="<IMG_CONTEXT>",
            stores_dummy_heads=False,
            default_dummy_heads=0,
            projector_bias=True,
            projector_hidden="hidden",
            parse=_parse_hf,
            render=_render_hf,
        ),
        LayoutSpec(
            name="nvlm-x",
            model_type="NVLM_X",
            description="NVLM-X (project format): InternViT-6B style, 1-layer tile projector, "
            "Qwen2 decoder with gated cross-attention blocks",
            image_token="<|vision_pad|>",
            stores_dummy_heads=True,
            default_dummy_heads=NVLM_D_DUMMY_HEADS,
            projector_bias=False,
            projector_hidden="intermediate",
            parse=_parse_cross,
            render=_render_cross,
            family="cross-attention",
            decoder_projector=False,
        ),
        LayoutSpec(
            name="nvlm-h",
            model_type="NVLM_H",
            description="NVLM-H (project format): NVLM-D's thumbnail path plus NVLM-X's gated "
            "cross-attention over the regular tiles",
            image_token="<|vision_pad|>",
            stores_dummy_heads=True,
            default_dummy_heads=NVLM_D_DUMMY_HEADS,
            projector_bias=False,
            projector_hidden="intermediate",
            parse=_parse_cross,
            render=_render_cross,
            family="cross-attention",
        ),
    )
}


def layout_spec(name: str) -> LayoutSpec:
    if name not in LAYOUTS:
        raise CheckpointError(
            f"Unknown checkpoint layout {name!r}", fix=f"Use one of: {', '.join(LAYOUTS)}"
        )
    return LAYOUTS[name]


def detect_layout(config: Mapping[str, Any], source: str = "config.json") -> LayoutSpec:
    """The layout whose `model_type` the config declares."""
    model_type = config.get("model_type")
    for spec in LAYOUTS.values():
        if spec.model_type == model_type:
            return spec
    supported = ", ".join(f"{s.model_type} ({s.name})" for s in LAYOUTS.values())
    raise CheckpointError(
        f"{source} has unsupported model_type {model_type!r}",
        why=f"supported model types are {supported}",
        fix="Point at an NVLM-D, NVLM-X, NVLM-H or InternVL checkpoint directory",
    )


def parse_config(config: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from a config.json dictionary of any supported layout, with every
    dimension checked against `DIMENSION_LIMITS` before anything is built from it."""
    spec = detect_layout(config, source)
    try:
        parsed = spec.parse(config, spec)
    except (TypeError, ValueError, AttributeError, ArithmeticError) as error:
        raise CheckpointError(
            f"{source} is malformed", why=str(error), fix="Check the checkpoint's config.json"
        ) from error
    check_dimensions(parsed, source)
    if parsed.ps_version != "v2":
        raise CheckpointError(
            f"{source} asks for pixel shuffle {parsed.ps_version!r}",
            why="only ps_version 'v2' (used by NVLM-D and all InternVL2+ releases) is supported",
        )
    return parsed


# --- dimension bounds --------------------------------------------------------------------------

# Upper bounds for the sizes a config.json declares, about 8x the largest released model of each
# kind (NVLM-D-72B: LLM hidden 8192, 80 layers, 64 heads, MLP 29568, vocab 152064, 32k positions;
# InternViT-6B: hidden 3200, 45 layers, 25 heads, MLP 12800). A typo or a hostile config fails
# here with one line instead of asking torch for terabytes. docs/security.md lists them.
DIMENSION_LIMITS: dict[str, int] = {
    "hidden_size": 65_536,
    "num_hidden_layers": 1_024,
    "num_attention_heads": 1_024,
    "num_key_value_heads": 1_024,
    "head_dim": 1_024,
    "intermediate_size": 262_144,
    "vocab_size": 1_048_576,
    "max_position_embeddings": 16_777_216,
    "image_size": 4_096,
    "patch_size": 448,
    "num_channels": 4,
    "min_dynamic_patch": 64,
    "max_dynamic_patch": 64,
}
# The LLM keys every decoder needs; the others are checked when present.
REQUIRED_LLM_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


def check_dimensions(config: ModelConfig, source: str = "config.json") -> None:
    """Every dimension a positive integer within `DIMENSION_LIMITS`, and the shapes consistent
    (heads divide widths, patches divide the tile). Raises one CheckpointError naming the key."""
    v, llm = config.vision, config.llm_config
    for key in REQUIRED_LLM_KEYS:
        _require(llm, key, f"{source} llm_config")
    sizes = {f"llm_config.{k}": llm[k] for k in DIMENSION_LIMITS if llm.get(k) is not None}
    sizes |= {
        "vision_config.hidden_size": v.hidden_size,
        "vision_config.num_hidden_layers": v.num_layers,
        "vision_config.num_attention_heads": v.num_heads,
        "vision_config.intermediate_size": v.intermediate_size,
        "vision_config.image_size": v.image_size,
        "vision_config.patch_size": v.patch_size,
        "vision_config.num_channels": v.num_channels,
        "min_dynamic_patch": config.min_dynamic_patch,
        "max_dynamic_patch": config.max_dynamic_patch,
    }
    for key, value in sizes.items():
        _check_size(key, value, DIMENSION_LIMITS[key.rsplit(".", 1)[-1]], source)
    heads = llm["num_attention_heads"]
    kv_heads = llm.get("num_key_value_heads") or heads
    divides = [
        ("llm_config.num_key_value_heads", kv_heads, "llm_config.num_attention_heads", heads),
        (
            "vision_config.num_attention_heads",
            v.num_heads,
            "vision_config.hidden_size",
            v.hidden_size,
        ),
        ("vision_config.patch_size", v.patch_size, "vision_config.image_size", v.image_size),
    ]
    if llm.get("head_dim") is None:  # otherwise the head width is given, not derived
        divides.append(
            ("llm_config.num_attention_heads", heads, "llm_config.hidden_size", llm["hidden_size"])
        )
    for part_key, part, whole_key, whole in divides:
        _check_divides(part_key, part, whole_key, whole, source)
    shuffled = v.grid_size * config.downsample_ratio
    if not 0 < config.downsample_ratio <= 1 or shuffled != int(shuffled):
        raise CheckpointError(
            f"{source} has downsample_ratio {config.downsample_ratio}",
            why=f"it must shrink the {v.grid_size}x{v.grid_size} patch grid to a whole grid",
            fix="Use the checkpoint's original config.json (NVLM-D and InternVL use 0.5)",
        )
    if config.min_dynamic_patch > config.max_dynamic_patch:
        raise CheckpointError(
            f"{source} has min_dynamic_patch {config.min_dynamic_patch} > max_dynamic_patch "
            f"{config.max_dynamic_patch}",
            fix="Use the checkpoint's original config.json",
        )


def _check_size(key: str, value: Any, limit: int, source: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise CheckpointError(
            f"{source} has {key} = {value!r}",
            why=f"it must be an integer from 1 to {limit:,}",
            fix="Check that config.json is the checkpoint's own, unedited",
        )


def _check_divides(part_key: str, part: int, whole_key: str, whole: int, source: str) -> None:
    if whole % part:
        raise CheckpointError(
            f"{source} has {whole_key} = {whole}, not a multiple of {part_key} = {part}",
            why="the model's tensors are split evenly over them",
            fix="Check that config.json is the checkpoint's own, unedited",
        )


def read_config(directory: Path) -> ModelConfig:
    """Parse `directory/config.json`, naming the file in every error."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint config not found: {path}",
            why="a checkpoint directory must contain config.json",
            fix="Pass the directory that holds config.json and the safetensors files",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"Cannot read {path}", why=str(error)) from error
    return parse_config(data, str(path))


def convert_layout(config: ModelConfig, layout: str) -> ModelConfig:
    """`config` relabelled for another layout, if that layout can express the same model."""
    spec = layout_spec(layout)
    if (spec.family, spec.decoder_projector) != (config.spec.family, config.spec.decoder_projector):
        raise CheckpointError(
            f"Cannot write a {config.layout} model in the {layout} layout",
            why="the two layouts describe different architectures",
            fix=f"Save it as {config.layout}",
        )
    problems = []
    if config.projector is not None:
        projector_hidden = projector_hidden_width(config.llm_config, spec.projector_hidden)
        if config.projector.bias != spec.projector_bias:
            problems.append("its projector biases differ")
        if config.projector.hidden_features != projector_hidden:
            problems.append("its projector's middle width differs")
    if config.vision.num_dummy_heads and not spec.stores_dummy_heads:
        problems.append("it cannot store padded (dummy) attention heads")
    if problems:
        raise CheckpointError(
            f"Cannot write a {config.layout} model in the {layout} layout",
            why="; ".join(problems),
            fix=f"Save it as {config.layout}",
        )
    return replace(config, layout=layout)


def render_config(config: ModelConfig, layout: str | None = None) -> dict[str, Any]:
    """The config.json dictionary for `config` written in `layout` (default: its own)."""
    target = convert_layout(config, layout) if layout else config
    return target.spec.render(target)
