"""Speed-related session settings of the ONNX Runtime runner (measured in docs/performance.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.tiny import TinyBundle

from nvlm_export.errors import InputError
from nvlm_export.runtime.backends.base import GraphSpec
from nvlm_export.runtime.backends.onnxruntime import OnnxRuntimeRunner
from nvlm_export.runtime.generation import KVCache, prefill
from nvlm_export.runtime.manifest import TensorSpec
from nvlm_export.runtime.pipeline import Pipeline

SPIN = "session.intra_op.allow_spinning"


def runner(**options: object) -> OnnxRuntimeRunner:
    spec = GraphSpec("g", Path("unused.onnx"), (TensorSpec("x", "float32", (1,)),), ())
    return OnnxRuntimeRunner(spec, **options)  # type: ignore[arg-type]


def test_worker_threads_spin_and_there_is_no_arena_by_default() -> None:
    options = runner()._session_options()
    assert options.get_session_config_entry(SPIN) == "1"
    assert options.enable_cpu_mem_arena is False
    assert runner(memory_arena=True)._session_options().enable_cpu_mem_arena is True


@pytest.mark.parametrize(("allow", "value"), [(True, "1"), (False, "0")])
def test_spinning_can_be_chosen(allow: bool, value: str) -> None:
    options = runner(allow_spinning=allow, intra_op_threads=2)._session_options()
    assert options.get_session_config_entry(SPIN) == value
    assert options.intra_op_num_threads == 2


def kv_runner() -> OnnxRuntimeRunner:
    """A decoder-like interface: one fixed axis on the embeddings, two on the cache."""
    inputs = (
        TensorSpec("inputs_embeds", "float32", ("batch", "seq", 8)),
        TensorSpec("past.key", "float32", ("batch", 2, "past", 4)),
    )
    spec = GraphSpec("decoder", Path("unused.onnx"), inputs, ())
    return OnnxRuntimeRunner(spec)


def kv_feeds(**shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    sizes = {"inputs_embeds": (1, 1, 8), "past.key": (1, 2, 5, 4), **shapes}
    return {name: np.zeros(shape, np.float32) for name, shape in sizes.items()}


def test_the_per_step_feed_check_accepts_good_feeds_and_any_array_subclass(tmp_path: Path) -> None:
    runner = kv_runner()
    runner.check_feeds(kv_feeds())
    table = np.lib.format.open_memmap(tmp_path / "t.npy", "w+", np.float32, (1, 1, 8))
    runner.check_feeds({**kv_feeds(), "inputs_embeds": table})  # memory-mapped embeddings


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("past.key", (1, 3, 5, 4), "'past.key' .* has size 3 on axis 1"),
        ("past.key", (1, 2, 5, 6), "'past.key' .* has size 6 on axis 3"),
        ("inputs_embeds", (1, 1, 9), "'inputs_embeds' .* has size 9 on axis 2"),
        ("past.key", (1, 2, 4), "'past.key' .* has rank 3"),
    ],
)
def test_the_per_step_feed_check_still_names_a_wrong_fixed_size(
    name: str, shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        kv_runner().check_feeds(kv_feeds(**{name: shape}))


def test_wrong_dtypes_and_names_are_still_caught_by_the_per_step_check() -> None:
    feeds = kv_feeds()
    with pytest.raises(InputError, match="has dtype float64"):
        kv_runner().check_feeds({**feeds, "past.key": feeds["past.key"].astype(np.float64)})
    with pytest.raises(InputError, match="unexpected \\['extra'\\]"):
        kv_runner().check_feeds({**feeds, "extra": feeds["past.key"]})


# --- memory bounds that must not change results ---------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tiny_bundle: TinyBundle) -> Path:
    return tiny_bundle("internvl")[1]


def wide_image() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, size=(896, 1344, 3), dtype=np.uint8)  # 3x2 grid + thumbnail


def test_vision_in_one_tile_calls_equals_one_call(bundle: Path) -> None:
    whole = Pipeline.load(bundle, vision_tiles_per_call=None, intra_op_threads=1)
    split = Pipeline.load(bundle, vision_tiles_per_call=2, intra_op_threads=1)
    tiling = whole.prepare("What is it?", [wide_image()]).tilings
    assert tiling[0].num_tiles == 7  # 2-tile calls: 2 + 2 + 2 + 1
    (a,), (b,) = whole.encode_images(tiling), split.encode_images(tiling)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5)


def test_chunked_prefill_gives_the_same_cache_logits_and_answer(bundle: Path) -> None:
    whole = Pipeline.load(bundle, prefill_chunk_tokens=None, intra_op_threads=1)
    chunked = Pipeline.load(bundle, prefill_chunk_tokens=100, intra_op_threads=1)
    prepared = whole.prepare("What is it?", [wide_image()])
    embeds = whole.decoder_inputs(prepared.prompt, whole.encode_images(prepared.tilings))
    assert embeds.inputs_embeds.shape[1] > 300  # several chunks
    caches = [KVCache.from_spec(whole.manifest.kv_cache) for _ in range(2)]
    decoder = whole.runners["decoder"].infer
    one = prefill(decoder, embeds.inputs_embeds, caches[0])
    many = prefill(decoder, embeds.inputs_embeds, caches[1], chunk_tokens=100)
    np.testing.assert_allclose(one, many, rtol=1e-4, atol=1e-4)
    assert caches[0].length == caches[1].length == embeds.inputs_embeds.shape[1]
    np.testing.assert_allclose(caches[0].keys[-1], caches[1].keys[-1], rtol=1e-4, atol=1e-4)
    answers = [
        pipe.generate("What is it?", [wide_image()], max_new_tokens=8).run().token_ids
        for pipe in (whole, chunked)
    ]
    assert answers[0] == answers[1]
