"""NVLM-X / NVLM-H: checkpoint -> bundle -> runtime generates exactly what PyTorch generates."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from nvlm_export.export.architectures import architecture_for_layout
from nvlm_export.export.bundle import ExportSettings, export_bundle
from nvlm_export.export.cross import cross_kv_names
from nvlm_export.export.reference import TorchReference
from nvlm_export.models.checkpoint import load_checkpoint
from nvlm_export.models.tiny import make_tiny_checkpoint
from nvlm_export.runtime.manifest import CROSS_ATTENTION_MASK, CROSS_KV_GRAPH, DECODER_GRAPH
from nvlm_export.runtime.pipeline import Pipeline

LAYOUTS = ("nvlm-x", "nvlm-h")
STEPS = 24
QUESTION = "What is shown in the picture?"
# Image sizes that tile into 1, 3 and 7 tiles with the 1..6 grid (thumbnail included).
SIZES = {1: (500, 400), 3: (1920, 1080), 7: (1344, 896)}


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module", autouse=True)
def _lean() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Pipeline, object]]:
    """Per layout, exported once: the loaded bundle and the PyTorch reference."""
    cache: dict[str, tuple[Pipeline, TorchReference]] = {}

    def get(layout: str) -> tuple[Pipeline, TorchReference]:
        if layout not in cache:
            root = tmp_path_factory.mktemp(layout)
            make_tiny_checkpoint(root / "ckpt", layout, seed=0)
            export_bundle(root / "ckpt", root / "bundle", ExportSettings(), quiet=True)
            model = load_checkpoint(root / "ckpt")
            reference = TorchReference(model, architecture_for_layout(layout))
            cache[layout] = (Pipeline.load(root / "bundle"), reference)
        return cache[layout]

    return get


def reference_tokens(
    pipe: Pipeline, reference: TorchReference, question: str, images: list, steps: int = STEPS
) -> list[int]:
    """Greedy tokens from the PyTorch model: the whole sequence recomputed at every step, with
    no cache (the ViT runs once: it dominates the time and does not depend on the step)."""
    prepared = pipe.prepare(question, images)
    eos = pipe.manifest.tokenizer.eos_token_ids
    model = reference.model
    tiles = [torch.from_numpy(t.pixel_values) for t in prepared.tilings]
    with torch.no_grad():
        tokens = model.encode_images(tiles)
        ids = torch.from_numpy(prepared.prompt.input_ids)[None]
        generated: list[int] = []
        for _ in range(steps):
            token = int(model.forward_encoded(ids, tokens, prepared.prompt)[0, -1].argmax())
            generated.append(token)
            if token in eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return generated


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tiles", [0, 1, 3, 7])
def test_bundle_greedy_equals_pytorch(exported, layout: str, tiles: int) -> None:
    pipe, reference = exported(layout)
    images = [noise_image(SIZES[tiles], seed=tiles)] if tiles else []
    if tiles:
        assert pipe.prepare(QUESTION, images).tilings[0].num_tiles == tiles
    ours = list(pipe.generate(QUESTION, images, max_new_tokens=STEPS).run().token_ids)
    expected = reference_tokens(pipe, reference, QUESTION, images)
    assert ours == expected
    assert len(expected) == STEPS or expected[-1] in pipe.manifest.tokenizer.eos_token_ids


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_output_depends_on_the_image(exported, layout: str) -> None:
    """Guards the parity test against a bundle whose cross-attention does nothing."""
    pipe, _ = exported(layout)
    a = pipe.generate(QUESTION, [noise_image((1920, 1080), 1)], max_new_tokens=8).run()
    b = pipe.generate(QUESTION, [noise_image((1920, 1080), 2)], max_new_tokens=8).run()
    assert a.token_ids != b.token_ids


def test_two_images_in_one_nvlm_h_prompt(exported) -> None:
    pipe, reference = exported("nvlm-h")
    images = [noise_image((500, 400), 1), noise_image((1920, 1080), 2)]
    question = "<image> and <image>: what differs?"
    ours = list(pipe.generate(question, images, max_new_tokens=12).run().token_ids)
    assert ours == reference_tokens(pipe, reference, question, images, steps=12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_validation_reference_agrees(exported, layout: str) -> None:
    """The registry's reference (what export validation and `verify` use) gives the same tokens."""
    pipe, reference = exported(layout)
    images = [noise_image(SIZES[1], seed=5)]
    prepared = pipe.prepare(QUESTION, images)
    eos = pipe.manifest.tokenizer.eos_token_ids
    official = reference.greedy(prepared.prompt, prepared.tilings, 6, eos)
    assert official == reference_tokens(pipe, reference, QUESTION, images, steps=6)
    ours = list(pipe.generate(QUESTION, images, max_new_tokens=6).run().token_ids)
    assert ours == official


def test_manifest_declares_cross_kv_graph_and_decoder_inputs(exported) -> None:
    pipe, _ = exported("nvlm-x")
    manifest = pipe.manifest
    assert manifest.architecture == "nvlm-x"
    assert set(manifest.graphs) == {"vision", CROSS_KV_GRAPH, DECODER_GRAPH}
    assert [t.name for t in manifest.graph("vision").outputs] == ["cross_features"]
    names = cross_kv_names(2)
    assert [t.name for t in manifest.graph(CROSS_KV_GRAPH).outputs] == names
    decoder = manifest.graph(DECODER_GRAPH)
    assert all(decoder.input(name).shape == ("batch", 2, "cross", 16) for name in names)
    mask = decoder.input(CROSS_ATTENTION_MASK)
    assert (mask.dtype, mask.shape) == ("bool", ("batch", "seq", "cross"))
    assert manifest.extras == {"cross_attention": {"blocks": 2, "every": 1}}
    bundle_json = json.loads((pipe.bundle_dir / "manifest.json").read_text())
    assert bundle_json["prompt"]["image_layout"] == "cross_tile_tags"


def test_cross_kv_runs_once_and_decode_inputs_do_not_grow(exported, monkeypatch) -> None:
    """Only the self-attention cache grows per step; cross K/V are computed once per request."""
    pipe, _ = exported("nvlm-x")
    cross_runner, decoder_runner = pipe.runners[CROSS_KV_GRAPH], pipe.runners[DECODER_GRAPH]
    cross_calls: list[dict[str, tuple[int, ...]]] = []
    decoder_calls: list[dict[str, tuple[int, ...]]] = []

    def recording(runner, calls: list):
        infer = runner.infer

        def record(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            calls.append({name: tuple(value.shape) for name, value in feeds.items()})
            return infer(feeds)

        return record

    monkeypatch.setattr(cross_runner, "infer", recording(cross_runner, cross_calls))
    monkeypatch.setattr(decoder_runner, "infer", recording(decoder_runner, decoder_calls))
    images = [noise_image((1920, 1080), 3)]
    result = pipe.generate(QUESTION, images, max_new_tokens=10).run()

    k = 3 * 256  # NVLM-X: every tile of the 3-tile image, thumbnail included
    assert cross_calls == [{"cross_embeds": (1, k, 64)}]
    assert len(decoder_calls) == len(result.token_ids)  # prefill + one call per later token
    prompt_len = decoder_calls[0]["inputs_embeds"][1]
    for step, call in enumerate(decoder_calls):
        seq, past = (prompt_len, 0) if step == 0 else (1, prompt_len + step - 1)
        assert call[CROSS_ATTENTION_MASK] == (1, seq, k)
        assert all(call[name] == (1, 2, k, 16) for name in cross_kv_names(2))
        assert call["inputs_embeds"] == (1, seq, 64)
        assert call["past_key_values.0.key"] == (1, 2, past, 16)
