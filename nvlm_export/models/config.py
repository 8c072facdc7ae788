"""Checkpoint configuration: what a `config.json` says, in one typed shape for every layout.

Torch-free on purpose: the CLI and the exporter read configs without building a model. Reading
and writing config.json is per layout (each family module in `models/families/` declares its own
`parse` / `render`; `config_io.py` dispatches); this module holds the shapes they produce and the
bounds every parsed config is checked against.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from nvlm_export.errors import CheckpointError
from nvlm_export.runtime.tiling import (
    DOWNSAMPLE_RATIO,
    PATCH_SIZE,
    TilingConfig,
    tokens_per_tile,
)

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
    patch_size: int = PATCH_SIZE
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
    downsample_ratio: float = DOWNSAMPLE_RATIO
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
        v = self.vision
        return tokens_per_tile(v.image_size, v.patch_size, self.downsample_ratio)

    def tiling(self, max_tiles: int | None = None) -> TilingConfig:
        """The runtime's tiling for this model; `max_tiles` overrides the checkpoint's budget."""
        return TilingConfig(
            tile_size=self.vision.image_size,
            min_tiles=self.min_dynamic_patch,
            max_tiles=max_tiles or self.max_dynamic_patch,
            use_thumbnail=self.use_thumbnail,
        )

    def with_dummy_heads(self, num_dummy_heads: int) -> ModelConfig:
        return replace(self, vision=replace(self.vision, num_dummy_heads=num_dummy_heads))


@dataclass(frozen=True)
class AttentionHeads:
    """A decoder config's attention geometry, as Hugging Face reads it: KV heads default to the
    query heads (key absent or null), the head width to hidden_size / heads unless given."""

    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, llm_config: Mapping[str, Any]) -> AttentionHeads:
        heads = int(llm_config["num_attention_heads"])
        return cls(
            heads=heads,
            kv_heads=int(llm_config.get("num_key_value_heads") or heads),
            head_dim=int(llm_config.get("head_dim") or int(llm_config["hidden_size"]) // heads),
        )


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


def require_key(config: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in config:
        raise CheckpointError(
            f"{where} has no {key!r}",
            why="the layout needs it to build the model",
            fix="Check that the checkpoint's config.json is complete",
        )
    return config[key]


def shared_vision_fields(vc: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The `VisionConfig` fields every layout's vision_config names alike (sizes required)."""
    return {
        "hidden_size": int(require_key(vc, "hidden_size", where)),
        "num_layers": int(require_key(vc, "num_hidden_layers", where)),
        "num_heads": int(require_key(vc, "num_attention_heads", where)),
        "intermediate_size": int(require_key(vc, "intermediate_size", where)),
        "num_channels": int(vc.get("num_channels", 3)),
        "eps": float(vc.get("layer_norm_eps", 1e-6)),
        "hidden_act": str(vc.get("hidden_act", "gelu")),
    }


def shared_vision_entries(v: VisionConfig) -> dict[str, Any]:
    """The vision_config entries every layout writes alike (`shared_vision_fields`' inverse)."""
    return {
        "hidden_size": v.hidden_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "norm_type": v.norm_type,
        "num_channels": v.num_channels,
        "layer_norm_eps": v.eps,
        "hidden_act": v.hidden_act,
    }


def render_base(
    config: ModelConfig, model_type: str, architecture: str, /, **vision: Any
) -> dict[str, Any]:
    """The start of a rendered config.json: the parsed file's own entries when it had this
    model type (keys this project does not read survive a round trip; so do its
    `architectures`, else `architecture`), the model type, and a vision_config with the
    entries every layout writes alike and then the layout's own `vision` ones."""
    out = copy.deepcopy(config.raw) if config.raw.get("model_type") == model_type else {}
    out.setdefault("architectures", [architecture])
    out["model_type"] = model_type
    vision_config = dict(out.get("vision_config", {}))
    vision_config.update(shared_vision_entries(config.vision), **vision)
    out["vision_config"] = vision_config
    return out


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
        require_key(llm, key, f"{source} llm_config")
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
