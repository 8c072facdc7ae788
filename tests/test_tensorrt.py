"""TensorRT runner and engine build.

GPU-free parts (profile selection, version/GPU refusal, missing-extra errors) run everywhere. The
device tests need TensorRT and a CUDA GPU (a Jetson, see docs/jetson.md) and an fp16 bundle named
by NVLM_TRT_BUNDLE; they build engines into a copy of it and check that the TensorRT bundle's
greedy tokens equal the ONNX Runtime bundle's.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from nvlm_export.errors import BundleError, InputError, MissingExtraError
from nvlm_export.runtime.backends import GraphSpec, TensorSpec, get_backend
from nvlm_export.runtime.backends.tensorrt import (
    check_engine_compatible,
    detect_local_gpu,
    select_profile,
)
from nvlm_export.runtime.manifest import EngineRecord

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
DECODE = {"inputs_embeds": ((1, 1, 8), (1, 1, 8)), "past": ((1, 2, 0, 4), (1, 2, 99, 4))}
PREFILL = {"inputs_embeds": ((1, 1, 8), (1, 100, 8)), "past": ((1, 2, 0, 4), (1, 2, 0, 4))}


def test_one_token_steps_use_the_decode_profile_and_prompts_the_prefill_one() -> None:
    profiles = [DECODE, PREFILL]
    assert select_profile(profiles, {"inputs_embeds": (1, 1, 8), "past": (1, 2, 57, 4)}, "d") == 0
    assert select_profile(profiles, {"inputs_embeds": (1, 40, 8), "past": (1, 2, 0, 4)}, "d") == 1
    with pytest.raises(InputError, match="outside every profile"):
        select_profile(profiles, {"inputs_embeds": (1, 101, 8), "past": (1, 2, 0, 4)}, "d")


def test_engines_for_another_gpu_or_tensorrt_version_are_refused() -> None:
    record = EngineRecord("engines/decoder.engine", "10.3.0", "8.7", device="Orin")
    check_engine_compatible(record, "decoder", "10.3.0", "8.7")
    with pytest.raises(BundleError, match=r"compute capability 8.7 \(Orin\).*this GPU is 9.0"):
        check_engine_compatible(record, "decoder", "10.3.0", "9.0")
    with pytest.raises(BundleError, match=r"TensorRT 10.3.0.*this machine has TensorRT 10.13"):
        check_engine_compatible(record, "decoder", "10.13.0", "8.7")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed")
def test_tensorrt_backend_without_tensorrt_is_a_missing_extra_error(tmp_path: Path) -> None:
    runner_class = get_backend("tensorrt")
    spec = GraphSpec("vision", tmp_path / "vision.onnx", (TensorSpec("x", "float32", (1,)),), ())
    with pytest.raises(MissingExtraError, match=r"nvlm-export\[tensorrt\]"):
        runner_class(spec)


# --- on a device ------------------------------------------------------------------------------


def _device_skip_reason() -> str | None:
    if not HAS_TENSORRT:
        return "tensorrt not installed"
    if detect_local_gpu() is None:
        return "no CUDA GPU"
    if not os.environ.get("NVLM_TRT_BUNDLE"):
        return "NVLM_TRT_BUNDLE (an fp16 bundle) is not set"
    return None


device = pytest.mark.skipif(_device_skip_reason() is not None, reason=str(_device_skip_reason()))


@pytest.fixture(scope="module")
def engine_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nvlm_export.export.engine_build import build_engines, installed_tensorrt_version
    from nvlm_export.export.engine_plan import PlanOptions, plan_build
    from nvlm_export.export.targets import resolve_target
    from nvlm_export.runtime.manifest import load_manifest

    bundle = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(os.environ["NVLM_TRT_BUNDLE"], bundle)
    manifest = load_manifest(bundle)
    options = PlanOptions(optimization_level=1, tensorrt_version=installed_tensorrt_version())
    plan = plan_build(manifest, resolve_target("auto"), options)
    build_engines(bundle, manifest, plan, overwrite=True, progress=lambda _: None)
    return bundle


@device
@pytest.mark.tensorrt
def test_built_engines_are_recorded_in_the_manifest(engine_bundle: Path) -> None:
    from nvlm_export.runtime.manifest import load_manifest

    manifest = load_manifest(engine_bundle)
    assert set(manifest.engines) == set(manifest.graphs)
    for record in manifest.engines.values():
        assert (engine_bundle / record.file).stat().st_size == record.size_bytes
        assert record.compute_capability == detect_local_gpu().sm  # type: ignore[union-attr]


@device
@pytest.mark.tensorrt
def test_greedy_tokens_of_tensorrt_equal_onnx_runtime(engine_bundle: Path) -> None:
    from nvlm_export.assets import example_image_path
    from nvlm_export.runtime.pipeline import Pipeline

    question = "Describe the image."
    answers = {}
    for backend in ("onnxruntime", "tensorrt"):
        pipeline = Pipeline.load(engine_bundle, backend=backend)
        stream = pipeline.generate(question, [example_image_path()], max_new_tokens=32)
        answers[backend] = stream.run().token_ids
    assert answers["tensorrt"] == answers["onnxruntime"]


@device
@pytest.mark.tensorrt
def test_decoder_runner_switches_profiles_without_reallocating(engine_bundle: Path) -> None:
    from nvlm_export.runtime.manifest import load_manifest

    manifest = load_manifest(engine_bundle)
    graph = manifest.graph("decoder")
    engine = manifest.engines["decoder"]
    spec = GraphSpec.from_manifest("decoder", graph, engine_bundle, engine=engine)
    runner = get_backend("tensorrt")(spec)
    kv = manifest.kv_cache
    dtype = np.dtype(kv.dtype)
    hidden = manifest.embedding.hidden_size

    def feeds(seq: int, past: int) -> dict[str, np.ndarray]:
        out = {
            "inputs_embeds": np.zeros((1, seq, hidden), dtype),
            "position_ids": np.arange(past, past + seq, dtype=np.int64)[None],
        }
        for i in range(kv.num_layers):
            for name in (kv.past_key, kv.past_value):
                shape = (1, kv.num_kv_heads, past, kv.head_dim)
                out[name.format(layer=i)] = np.zeros(shape, dtype)
        return out

    with runner:
        pointers = {name: buf.ptr for name, buf in runner._buffers.items()}
        prefill = runner.infer(feeds(5, 0))
        step = runner.infer(feeds(1, 5))
        assert {name: buf.ptr for name, buf in runner._buffers.items()} == pointers
    assert prefill["present.0.key"].shape[2] == 5 and step["present.0.key"].shape[2] == 6
