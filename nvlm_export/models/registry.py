"""The architecture registry: every supported family and checkpoint layout, found by name.

Torch-free. Generic code asks a spec (`layout_spec(config.layout).key_rules`,
`architecture_of(layout).prompt_format`, ...) and never compares a layout or family name.
Adding a family is one module in `models/families/` and one entry in `ARCHITECTURES` below
(docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nvlm_export.errors import CheckpointError
from nvlm_export.models.families import internvl, nvlm_d, nvlm_h, nvlm_x
from nvlm_export.models.families.spec import ArchitectureSpec, LayoutSpec

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    family.name: family
    for family in (
        nvlm_d.ARCHITECTURE,
        internvl.ARCHITECTURE,
        nvlm_x.ARCHITECTURE,
        nvlm_h.ARCHITECTURE,
    )
}

LAYOUTS: dict[str, LayoutSpec] = {
    layout.name: layout for family in ARCHITECTURES.values() for layout in family.layouts
}
_FAMILY_OF_LAYOUT = {
    layout.name: family for family in ARCHITECTURES.values() for layout in family.layouts
}
SIZES = tuple(dict.fromkeys(size for layout in LAYOUTS.values() for size in layout.shapes))


def layout_spec(name: str) -> LayoutSpec:
    if name not in LAYOUTS:
        raise CheckpointError(
            f"Unknown checkpoint layout {name!r}", fix=f"Use one of: {', '.join(LAYOUTS)}"
        )
    return LAYOUTS[name]


def architecture_of(layout: str) -> ArchitectureSpec:
    """The family a checkpoint layout belongs to (both InternVL layouts: "internvl")."""
    layout_spec(layout)
    return _FAMILY_OF_LAYOUT[layout]


def architecture_spec(name: str) -> ArchitectureSpec:
    """The family a bundle manifest's `architecture` names."""
    if name not in ARCHITECTURES:
        raise CheckpointError(
            f"Unknown architecture {name!r}", fix=f"Use one of: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name]


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
