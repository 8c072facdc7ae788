"""`--backend openvino`: the bundle's standard graphs on OpenVINO's CPU plugin, same answers."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.tiny import TinyBundle

from nvlm_export.errors import InputError
from nvlm_export.runtime.manifest import VISION_GRAPH, load_manifest
from nvlm_export.runtime.pipeline import Pipeline

pytest.importorskip("openvino", reason="OpenVINO is an extra: pip install 'nvlm-export[openvino]'")


def test_openvino_answers_what_onnxruntime_answers_from_the_standard_graphs(
    tiny_bundle: TinyBundle,
) -> None:
    _, bundle = tiny_bundle("internvl")
    image = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
    expected = Pipeline.load(bundle).generate("What is this?", [image], max_new_tokens=8).run()
    pipe = Pipeline.load(bundle, backend="openvino", inference_precision="f32")
    got = pipe.generate("What is this?", [image], max_new_tokens=8).run()
    assert got.token_ids == expected.token_ids
    # OpenVINO cannot run ONNX Runtime's contrib ops: it loads the standard file.
    standard = load_manifest(bundle).graph(VISION_GRAPH).file
    assert pipe.runners[VISION_GRAPH].spec.path.name == standard


def test_an_unknown_openvino_precision_is_one_input_error(tiny_bundle: TinyBundle) -> None:
    _, bundle = tiny_bundle("internvl")
    with pytest.raises(InputError, match="inference precision 'fp4'"):
        Pipeline.load(bundle, backend="openvino", inference_precision="fp4")
