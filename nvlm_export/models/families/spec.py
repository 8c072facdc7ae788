"""What one architecture family declares: its checkpoint layouts and everything generic code asks.

An `ArchitectureSpec` is one family (NVLM-D, InternVL, NVLM-X, NVLM-H): the prompt format its
bundles carry, what its vision graph outputs, which graph holds each parameter, and — named by
import path, so this module and the registry stay torch-free — its PyTorch model class and its
export hooks. A family stores checkpoints in one or more `LayoutSpec`s (InternVL: remote code and
transformers-native), each saying how its config.json reads and writes, how its tensors are named,
what its tokenizer carries and which tiny/bench checkpoints `make-tiny` writes for it.

Generic code asks these fields; it never compares a layout or family name.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from nvlm_export.models.config import (
    LinearProjectorConfig,
    ModelConfig,
    ProjectorConfig,
    VisionConfig,
    projector_hidden_width,
)
from nvlm_export.runtime.manifest import CROSS_KV_GRAPH, DECODER_GRAPH, VISION_GRAPH
from nvlm_export.runtime.prompt import PromptFormat


@dataclass(frozen=True)
class KeyRule:
    """Canonical name pattern -> stored name template(s); several are concatenated on dim 0."""

    ours: str
    theirs: tuple[str, ...]

    def stored_names(self, key: str) -> list[str] | None:
        match = re.fullmatch(self.ours, key)
        return [match.expand(t) for t in self.theirs] if match else None


def key_rule(ours: str, *theirs: str) -> KeyRule:
    return KeyRule(ours, theirs)


@dataclass(frozen=True)
class TokenizerSpec:
    """What a layout's tokenizer files carry beyond the shared special tokens."""

    image_text: str = "<image>\n"  # what its chat template renders an image entry of a message as
    extra_specials: tuple[str, ...] = ()  # appended after the shared special tokens
    # tokenizer_config.json keys naming special tokens (transformers' processors look them up)
    named_tokens: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class TinyShape:
    """Geometry of one generated (random) checkpoint."""

    vision: VisionConfig
    llm: Mapping[str, Any]  # decoder dimensions; vocab_size is set from the tokenizer when None
    dtype: str  # on disk: "float32", "float16" or "bfloat16"
    max_shard_bytes: int
    template: str
    max_dynamic_patch: int
    llm_model_type: str = "qwen2"  # NVLM-D-72B's llm_config says "llama" for its Qwen2 decoder
    cross_attention_every: int = 1  # NVLM-X/H: a gated cross-attention block after every layer
    init: str = "tiny"  # which weight initialisation rules fill it (models/tiny.py)


@dataclass(frozen=True)
class LayoutSpec:
    """One on-disk checkpoint layout: how to recognise, read and write it."""

    name: str
    model_type: str  # config.json's model_type, which identifies the layout
    description: str
    stores_dummy_heads: bool  # padded attention heads allowed; their count is read from tensors
    default_dummy_heads: int  # used when no stored tensors are available to count them
    projector_bias: bool
    projector_hidden: Literal["intermediate", "hidden"]  # the LLM width of the MLP's middle layer
    parse: Callable[[Mapping[str, Any], LayoutSpec], ModelConfig]
    render: Callable[[ModelConfig, LayoutSpec], dict[str, Any]]
    key_rules: tuple[KeyRule, ...]  # canonical parameter name -> stored name(s), first match wins
    tokenizer: TokenizerSpec = TokenizerSpec()
    shapes: Mapping[str, TinyShape] = field(default_factory=lambda: MappingProxyType({}))
    # The model it builds: "decoder-only" (image tokens in the decoder sequence) or
    # "cross-attention" (NVLM-X/H: gated cross-attention blocks in the decoder).
    family: Literal["decoder-only", "cross-attention"] = "decoder-only"
    decoder_projector: bool = True  # has the 2-layer MLP (NVLM-X has none)
    cross_projector_bias: bool = False  # the 1-layer tile projector of cross-attention models
    config_architecture: str = ""  # the class config.json names in `architectures`

    def model_config(
        self, vision: VisionConfig, llm: dict[str, Any], ratio: float, **settings: Any
    ) -> ModelConfig:
        """A config of this layout: its projectors' shapes follow from the vision tower, the
        decoder's config and the pixel-shuffle ratio; `settings` are ModelConfig's other fields."""
        return ModelConfig(
            layout=self.name,
            vision=vision,
            projector=self.projector_config(vision, llm, ratio),
            cross_projector=self.cross_projector_config(vision, llm, ratio),
            llm_config=llm,
            downsample_ratio=ratio,
            **settings,
        )

    def projector_config(
        self, vision: VisionConfig, llm: Mapping[str, Any], ratio: float
    ) -> ProjectorConfig | None:
        """The 2-layer MLP's shape, or None for a layout without one (NVLM-X)."""
        if not self.decoder_projector:
            return None
        return ProjectorConfig(
            in_features=vision.hidden_size * round(1 / ratio) ** 2,
            hidden_features=projector_hidden_width(llm, self.projector_hidden),
            out_features=int(llm["hidden_size"]),
            bias=self.projector_bias,
        )

    def cross_projector_config(
        self, vision: VisionConfig, llm: Mapping[str, Any], ratio: float
    ) -> LinearProjectorConfig | None:
        """The 1-layer tile projector's shape, or None for a model without cross-attention."""
        if self.family != "cross-attention":
            return None
        return LinearProjectorConfig(
            in_features=vision.hidden_size * round(1 / ratio) ** 2,
            out_features=int(llm["hidden_size"]),
            bias=self.cross_projector_bias,
        )


EMBEDDING_TABLE = "embedding"  # the token-embedding table, kept outside the decoder graph

# Which bundle graph (or the embedding table) holds each parameter: (name pattern, graph), first
# match wins. The memory plan (export/memory_plan.py) sizes graphs from it.
DECODER_ONLY_GRAPHS: tuple[tuple[str, str], ...] = (
    (r"vision\..*", VISION_GRAPH),
    (r"language_model\.model\.embed_tokens\..*", EMBEDDING_TABLE),
    (r".*", DECODER_GRAPH),
)
# The cross-attention blocks' key/value projections run once per image, in the cross_kv graph.
CROSS_ATTENTION_GRAPHS: tuple[tuple[str, str], ...] = (
    (r"vision\..*", VISION_GRAPH),
    (r"cross_layers\.\d+\.cross_attn\.[kv]_proj\..*", CROSS_KV_GRAPH),
    (r"language_model\.model\.embed_tokens\..*", EMBEDDING_TABLE),
    (r".*", DECODER_GRAPH),
)


@dataclass(frozen=True)
class ArchitectureSpec:
    """One architecture family: the manifest's `architecture` and everything that follows from it.

    `model` and `export` are "module:attribute" paths, resolved only by the PyTorch side
    (`build_model`, export/architectures.py): the registry itself never imports torch.
    """

    name: str  # the manifest's `architecture`
    prompt_format: PromptFormat
    layouts: tuple[LayoutSpec, ...]
    model: str  # the nn.Module class built for it
    export: str  # its export/architectures.ExportHooks
    # vision graph output name -> the VisionTower attribute (projector) that computes it
    vision_outputs: tuple[tuple[str, str], ...]
    graph_parameters: tuple[tuple[str, str], ...] = DECODER_ONLY_GRAPHS
    handoff: bool = False  # the decoder alone can be served by vLLM / TensorRT-LLM

    def graph_of(self, parameter: str) -> str:
        return next(g for pattern, g in self.graph_parameters if re.fullmatch(pattern, parameter))


def resolve(path: str) -> Any:
    """The object a "module:attribute" path names (imported on first use)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)
