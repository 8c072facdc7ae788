"""`--backend openvino`: the bundle's standard graphs on OpenVINO's CPU plugin, same answers."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.tiny import TinyBundle

from nvlm_export.errors import InputError
from nvlm_export.runtime.backends import PREFILL
from nvlm_export.runtime.manifest import DECODER_GRAPH, VISION_GRAPH, load_manifest
from nvlm_export.runtime.pipeline import Pipeline

pytest.importorskip("openvino", reason="OpenVINO is an extra: pip install 'nvlm-export[openvino]'")


def answer(pipe: Pipeline, seed: int) -> tuple[int, ...]:
    """Greedy tokens for a fixed question about a random image."""
    image = (np.random.default_rng(seed).random((300, 400, 3)) * 255).astype(np.uint8)
    return tuple(pipe.generate("What is this?", [image], max_new_tokens=8).run().token_ids)


def test_openvino_answers_what_onnxruntime_answers_from_the_standard_graphs(
    tiny_bundle: TinyBundle,
) -> None:
    _, bundle = tiny_bundle("internvl")
    pipe = Pipeline.load(bundle, backend="openvino", inference_precision="f32")
    assert answer(pipe, seed=0) == answer(Pipeline.load(bundle), seed=0)
    # OpenVINO cannot run ONNX Runtime's contrib ops: it loads the standard file.
    standard = load_manifest(bundle).graph(VISION_GRAPH).file
    assert pipe.runners[VISION_GRAPH].spec.path.name == standard


def test_an_unknown_openvino_precision_is_one_input_error(tiny_bundle: TinyBundle) -> None:
    _, bundle = tiny_bundle("internvl")
    with pytest.raises(InputError, match="inference precision 'fp4'"):
        Pipeline.load(bundle, backend="openvino", inference_precision="fp4")


def test_vision_on_openvino_and_the_decoder_on_onnxruntime_answer_as_onnxruntime_alone(
    tiny_bundle: TinyBundle,
) -> None:
    _, bundle = tiny_bundle("internvl")
    # inference_precision is OpenVINO's knob: it reaches the vision runner only.
    pipe = Pipeline.load(bundle, backend="vision=openvino", inference_precision="f32")
    assert answer(pipe, seed=1) == answer(Pipeline.load(bundle), seed=1)
    assert {name: r.backend_name for name, r in pipe.runners.items()} == {
        VISION_GRAPH: "openvino",
        DECODER_GRAPH: "onnxruntime",
    }
    # Each graph loads the file its own backend prefers: the decoder its ONNX Runtime variant.
    graphs = load_manifest(bundle).graphs
    assert pipe.runners[VISION_GRAPH].spec.path.name == graphs[VISION_GRAPH].file
    decoder_file = graphs[DECODER_GRAPH].file_for("onnxruntime")
    assert pipe.runners[DECODER_GRAPH].spec.path.name == decoder_file
    assert str(pipe.backends) == "onnxruntime,vision=openvino"


def test_prefill_on_openvino_and_decode_steps_on_onnxruntime_answer_as_onnxruntime_alone(
    tiny_bundle: TinyBundle,
) -> None:
    """The prompt calls on one backend and the one-token steps on another share one KV cache:
    each reads the keys and values the other wrote (OpenVINO's copied into the buffers ONNX
    Runtime's steps write in place)."""
    _, bundle = tiny_bundle("internvl")
    pipe = Pipeline.load(bundle, backend="prefill=openvino", inference_precision="f32")
    assert pipe.keeps_kv_in_place
    calls = {name: runner.timings.calls for name, runner in pipe.runners.items()}
    assert answer(pipe, seed=2) == answer(Pipeline.load(bundle), seed=2)
    ran = {name: runner.timings.calls - calls[name] for name, runner in pipe.runners.items()}
    assert ran[PREFILL] >= 1 and ran[DECODER_GRAPH] == 7  # 8 new tokens: the first from prefill
    assert pipe.runners[PREFILL].backend_name == "openvino"
    assert pipe.runners[DECODER_GRAPH].backend_name == "onnxruntime"
    assert str(pipe.backends) == "onnxruntime,prefill=openvino"
    # Unnamed, prefill follows the decoder: one runner for the graph.
    following = Pipeline.load(bundle, backend="openvino,decoder=onnxruntime")
    assert sorted(following.runners) == [DECODER_GRAPH, VISION_GRAPH]
