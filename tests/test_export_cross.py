"""NVLM-X / NVLM-H: checkpoint -> bundle -> runtime generates exactly what PyTorch generates."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from nvlm_export.export.architectures import architecture_for_layout
from nvlm_export.export.cross import cross_kv_names
from nvlm_export.export.reference import TorchReference
from nvlm_export.models.checkpoint import load_checkpoint
from nvlm_export.runtime.manifest import (
    CROSS_ATTENTION_MASK,
    CROSS_KV_GRAPH,
    DECODER_GRAPH,
    POSITION_IDS,
)
from nvlm_export.runtime.pipeline import Pipeline

LAYOUTS = ("nvlm-x", "nvlm-h")
# Each layout costs an export and a PyTorch reference: the whole suite only, not the fast lane.
pytestmark = pytest.mark.slow
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
def exported(tiny_bundle) -> Callable[[str], tuple[Pipeline, TorchReference]]:
    """Per layout: the loaded bundle and the PyTorch reference."""
    cache: dict[str, tuple[Pipeline, TorchReference]] = {}

    def get(layout: str) -> tuple[Pipeline, TorchReference]:
        if layout not in cache:
            checkpoint, bundle = tiny_bundle(layout)
            model = load_checkpoint(checkpoint)
            reference = TorchReference(model, architecture_for_layout(layout))
            cache[layout] = (Pipeline.load(bundle), reference)
        return cache[layout]

    return get


def reference_tokens(
    pipe: Pipeline, reference: TorchReference, question: str, images: list, steps: int = STEPS
) -> list[int]:
    """Greedy tokens from the PyTorch model, the whole sequence recomputed at every step."""
    prepared = pipe.prepare(question, images)
    eos = pipe.manifest.tokenizer.eos_token_ids
    return reference.greedy(prepared.prompt, prepared.tilings, steps, eos)


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
def test_verify_command_passes(tiny_bundle, layout: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    checkpoint, bundle = tiny_bundle(layout)
    exe = Path(sys.executable).with_name("nvlm-export")
    args = [str(exe), "verify", str(checkpoint), str(bundle), "--steps", "8", "--json"]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["tokens"]["identical"]


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
    bundle_json = json.loads((pipe.bundle_dir / "manifest.json").read_text())
    assert bundle_json["prompt"]["image_layout"] == "cross_tile_tags"


def test_cross_kv_runs_once_and_decode_inputs_do_not_grow(exported, monkeypatch) -> None:
    """Only the self-attention cache grows per step; cross K/V are computed once per request."""
    pipe, _ = exported("nvlm-x")
    pipe.clear_caches()  # a cold request: earlier tests asked about the same image
    cross_runner, decoder_runner = pipe.runners[CROSS_KV_GRAPH], pipe.runners[DECODER_GRAPH]
    cross_calls: list[dict[str, tuple[int, ...]]] = []
    decoder_calls: list[dict[str, tuple[int, ...]]] = []

    def recording(runner, calls: list):
        infer = runner.infer

        def record(feeds: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
            calls.append({name: tuple(value.shape) for name, value in feeds.items()})
            if POSITION_IDS in feeds:
                calls[-1]["first_position"] = int(feeds[POSITION_IDS][0, 0])
            return infer(feeds, **options)

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
        assert call["first_position"] == past
        # The cache in place is a buffer of the whole context; otherwise it grows by the step.
        length = pipe.manifest.kv_cache.max_context if pipe.keeps_kv_in_place else past
        assert call["past_key_values.0.key"] == (1, 2, length, 16)
