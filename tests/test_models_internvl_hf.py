"""Acceptance: our definitions and transformers' InternVLForConditionalGeneration agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from nvlm_export.models.checkpoint import load_checkpoint
from nvlm_export.models.model import VisionLanguageModel
from nvlm_export.models.tiny import make_tiny_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-internvl-hf")
    make_tiny_checkpoint(directory, "internvl-hf", seed=7)
    return directory


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> InternVLForConditionalGeneration:
    model, info = InternVLForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing/unexpected/mismatched keys
    return model.eval()


@pytest.fixture(scope="module")
def ours(checkpoint: Path) -> VisionLanguageModel:
    return load_checkpoint(checkpoint)


def _image_prompt(image_token_id: int, num_tiles: int) -> torch.Tensor:
    text = [5, 17, 230, 41]
    return torch.tensor([text + [image_token_id] * (256 * num_tiles) + [88, 9, 402]])


def test_logits_match_transformers_for_an_image_prompt(
    reference: InternVLForConditionalGeneration, ours: VisionLanguageModel
) -> None:
    assert ours.image_token_id == reference.config.image_token_id
    input_ids = _image_prompt(ours.image_token_id, num_tiles=2)
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixels).logits
        actual = ours(input_ids, pixels)
    assert actual.shape == expected.shape == (1, input_ids.shape[1], 1024)
    assert (actual - expected).abs().max().item() <= 1e-4
    # The image matters: other pixels give other logits after the image.
    with torch.no_grad():
        other = ours(input_ids, torch.randn(2, 3, 448, 448))
    assert (other[0, -1] - actual[0, -1]).abs().max() > 1e-2


def test_text_only_logits_match(
    reference: InternVLForConditionalGeneration, ours: VisionLanguageModel
) -> None:
    input_ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids), reference(input_ids=input_ids).logits)


def test_select_layer_indexes_hidden_states_like_transformers(
    reference: InternVLForConditionalGeneration, checkpoint: Path
) -> None:
    """vision_feature_layer / select_layer -2 = the output of the second-to-last block."""
    import json

    config = json.loads((checkpoint / "config.json").read_text())
    config["vision_feature_layer"] = -2
    (checkpoint / "config.json").write_text(json.dumps(config))
    try:
        ours = load_checkpoint(checkpoint)
    finally:
        config["vision_feature_layer"] = -1
        (checkpoint / "config.json").write_text(json.dumps(config))
    pixels = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        expected = reference.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-2
        ).pooler_output
        last = reference.model.get_image_features(pixel_values=pixels).pooler_output
        actual = ours.image_features(pixels)
    assert actual.shape == (1, 256, 64)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(actual, last, atol=1e-3)
