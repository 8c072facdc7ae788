"""config.json of any registered layout <-> `ModelConfig`: parse, read, convert and render.

Torch-free. The layout is recognised from `model_type` (`registry.detect_layout`); the layout's
own `parse` / `render` functions (declared in its family module) do the rest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvlm_export.errors import CheckpointError, InputError
from nvlm_export.models.config import (
    CONFIG_FILE,
    ModelConfig,
    check_dimensions,
    projector_hidden_width,
)
from nvlm_export.models.registry import architecture_of, detect_layout, layout_spec

if TYPE_CHECKING:
    from nvlm_export.runtime.manifest import Manifest


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


def read_config(directory: Path) -> ModelConfig:
    """Parse `directory/config.json`, naming the file in every error."""
    if not Path(directory).is_dir():
        state = "is not a directory" if Path(directory).exists() else "does not exist"
        raise CheckpointError(
            f"Checkpoint '{directory}' {state}",
            fix="Pass the checkpoint directory (the one holding config.json and the weights)",
        )
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
    spec, own = layout_spec(layout), layout_spec(config.layout)
    if (spec.family, spec.decoder_projector) != (own.family, own.decoder_projector):
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
    spec = layout_spec(target.layout)
    return spec.render(target, spec)


def check_checkpoint_of(manifest: Manifest, checkpoint: Path) -> ModelConfig:
    """The config of `checkpoint`, refused unless it is of the kind `manifest`'s bundle was
    exported from (its architecture family, in either of its layouts, and decoder width):
    comparing a bundle with, or handing off, another model's checkpoint fails later with errors
    that do not say so."""
    config = read_config(checkpoint)
    family = architecture_of(config.layout).name
    if family != manifest.architecture or config.llm_hidden_size != manifest.embedding.hidden_size:
        raise InputError(
            f"Checkpoint '{checkpoint}' does not belong to this bundle",
            why=f"the bundle was exported from a {manifest.architecture} checkpoint with hidden "
            f"size {manifest.embedding.hidden_size} ({manifest.source.checkpoint}); this one is "
            f"a {family} checkpoint with hidden size {config.llm_hidden_size}",
            fix="Pass the checkpoint the bundle was exported from",
        )
    return config
