"""The architecture registry: every family is complete, and a family declared only as data is
found by all generic code (config.json, checkpoints, tokenizer, make-tiny)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nvlm_export.export.architectures import ExportHooks, architecture_for_layout
from nvlm_export.models import registry
from nvlm_export.models.checkpoint import load_checkpoint, save_checkpoint
from nvlm_export.models.families import internvl
from nvlm_export.models.families.spec import resolve
from nvlm_export.models.model import VisionLanguageBase
from nvlm_export.models.tiny import make_tiny_checkpoint


@pytest.mark.parametrize("name", registry.ARCHITECTURES)
def test_every_family_names_a_model_class_and_export_hooks_that_exist(name: str) -> None:
    family = registry.ARCHITECTURES[name]
    assert issubclass(resolve(family.model), VisionLanguageBase)
    assert isinstance(resolve(family.export), ExportHooks)
    assert family.prompt_format.name == family.name  # the manifest's architecture and format
    for layout in family.layouts:
        assert registry.architecture_of(layout.name) is family


def test_layouts_are_recognised_by_distinct_model_types() -> None:
    model_types = [layout.model_type for layout in registry.LAYOUTS.values()]
    assert len(set(model_types)) == len(model_types)


def test_a_family_declared_only_as_data_is_generated_loaded_saved_and_exported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adding a family is one spec: nothing generic compares family or layout names."""
    layout = replace(
        internvl.REMOTE_LAYOUT, name="mini", model_type="mini_chat", config_architecture="Mini"
    )
    family = replace(
        internvl.ARCHITECTURE,
        name="mini",
        prompt_format=replace(internvl.PROMPT_FORMAT, name="mini"),
        layouts=(layout,),
    )
    monkeypatch.setitem(registry.ARCHITECTURES, family.name, family)
    monkeypatch.setitem(registry.LAYOUTS, layout.name, layout)
    monkeypatch.setitem(registry._FAMILY_OF_LAYOUT, layout.name, family)

    made = make_tiny_checkpoint(tmp_path / "ckpt", "mini", seed=1)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("mini_chat", ["Mini"])
    model = load_checkpoint(tmp_path / "ckpt")
    assert model.config.layout == "mini"
    assert model.image_token_id == made.config.image_token_id

    save_checkpoint(model, tmp_path / "copy", tokenizer_from=tmp_path / "ckpt")
    again = load_checkpoint(tmp_path / "copy")
    for key, value in model.state_dict().items():
        assert torch.equal(value.to(torch.bfloat16), again.state_dict()[key].to(torch.bfloat16))
    assert architecture_for_layout("mini").prompt_format.name == "mini"
