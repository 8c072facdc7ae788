"""Requests that fit the bundle's context, NVLM-H quantization, and the error cases of issue #6.

A bundle exported with a small max_context cannot hold a multi-tile image at the bundle's full
tile budget; calibration and the accuracy report then use, per request, the largest tile budget
whose prompt and decode steps fit, and say so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import quiet
from helpers.quantized import Graph, check_profile, check_qdq, fast
from helpers.tiny import TinyBundle
from typer.testing import CliRunner, Result

from nvlm_export.calibration import CalibrationOptions, CalibrationSet, collect_calibration
from nvlm_export.calibration.builtin import builtin_image
from nvlm_export.calibration.collect import HELD_OUT_SEED_OFFSET, Request, builtin_requests
from nvlm_export.commands.quantize import print_accuracy
from nvlm_export.errors import PromptError
from nvlm_export.export.accuracy import DEFAULT_THRESHOLDS, measure_accuracy
from nvlm_export.export.quantize import (
    ACCURACY_FILE,
    PRECISION_PLAN,
    QuantizeSettings,
    quantize_bundle,
)
from nvlm_export.runtime.manifest import CROSS_KV_GRAPH, DECODER_GRAPH, VISION_GRAPH, load_manifest
from nvlm_export.runtime.pipeline import Pipeline

# A small-context export, an NVLM-H export and its quantizations: the whole suite only.
pytestmark = pytest.mark.slow

SMALL_CONTEXT = 768  # one tile (256 image tokens) fits; a 1920x1080 photo's 3 tiles do not
BUNDLE_TILES = 6
DECODE_STEPS = 2
SMALL = CalibrationOptions(max_samples=3, seed=0, decode_steps=DECODE_STEPS)
NVLM_H_PRECISIONS = ("int8", "fp8", "int4")


@pytest.fixture(scope="module")
def small_bundle(tiny_bundle: TinyBundle) -> Path:
    torch.set_num_threads(1)
    return tiny_bundle("nvlm-d", max_tiles=BUNDLE_TILES, max_context=SMALL_CONTEXT, validate=False)[
        1
    ]


@pytest.fixture(scope="module")
def small_calib(
    small_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[CalibrationSet, list[str]]:
    warnings: list[str] = []
    out = tmp_path_factory.mktemp("calib-small") / "calib"
    calib = collect_calibration(small_bundle, out, SMALL, warn=warnings.append, progress=False)
    return calib, warnings


def largest_fitting_budget(pipe: Pipeline, request: Request, new_tokens: int) -> int | None:
    """Brute force over real tilings and prompts: the largest max_tiles that fits, or None."""
    for budget in range(pipe.tiling.max_tiles, pipe.tiling.min_tiles - 1, -1):
        try:
            prepared = pipe.prepare(request.prompt, [request.image], max_tiles=budget)
        except PromptError:  # longer than the whole context
            continue
        if prepared.prompt.num_tokens + new_tokens <= pipe.manifest.kv_cache.max_context:
            return budget
    return None


def cli(*args: str) -> Result:
    from nvlm_export.cli import app

    return CliRunner().invoke(app, list(args))


# --- the runtime helper -------------------------------------------------------------------------


def test_max_tiles_fitting_is_the_largest_budget_the_real_prompt_allows(
    small_bundle: Path,
) -> None:
    pipe = Pipeline.load(small_bundle)
    requests = list(builtin_requests(6, seed=0))
    for request in requests:
        for new_tokens in (1, 64):
            expected = largest_fitting_budget(pipe, request, new_tokens)
            assert expected is not None
            assert (
                pipe.max_tiles_fitting(request.prompt, [request.image], new_tokens=new_tokens)
                == expected
            ), request.image.size
    # The small context really caps: several built-in images overflow at the bundle's budget.
    capped = [r for r in requests if pipe.max_tiles_fitting(r.prompt, [r.image]) < BUNDLE_TILES]
    assert len(capped) >= 3
    # A bundle with room for everything keeps its own budget.
    one_tile = builtin_image(0, seed=0)  # 500x400: a single tile
    assert pipe.max_tiles_fitting("Describe it.", [one_tile]) == BUNDLE_TILES


def test_run_keeps_refusing_an_overflow_but_names_the_budget_that_fits(small_bundle: Path) -> None:
    pipe = Pipeline.load(small_bundle)
    photo = builtin_image(1, seed=0)  # 1920x1080: 3 tiles at the bundle's budget
    fitting = pipe.max_tiles_fitting("What is this?", [photo])
    assert fitting < BUNDLE_TILES
    with pytest.raises(PromptError, match=f"context holds.*--max-tiles {fitting}"):
        pipe.generate("What is this?", [photo])
    result = pipe.generate("What is this?", [photo], max_tiles=fitting, max_new_tokens=2).run()
    assert 1 <= len(result.token_ids) <= 2


def test_a_prompt_that_fits_no_tile_is_a_clear_error(small_bundle: Path, tmp_path: Path) -> None:
    pipe = Pipeline.load(small_bundle)
    long_prompt = "Describe every detail of the picture. " * 80
    with pytest.raises(PromptError, match=r"even with 1 tile.*context holds 768 tokens"):
        pipe.max_tiles_fitting(long_prompt, [builtin_image(0, seed=0)])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": long_prompt}) + "\n")
    out = tmp_path / "calib"
    result = cli("calibrate", str(small_bundle), "--prompts", str(prompts), "-o", str(out))
    assert result.exit_code == PromptError.exit_code
    assert "even with 1 tile" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


# --- calibration and quantization on a small context ----------------------------------------------


def test_calibration_uses_the_largest_tile_budget_that_fits(
    small_bundle: Path, small_calib: tuple[CalibrationSet, list[str]]
) -> None:
    calib, warnings = small_calib
    info = calib.info
    new_tokens = DECODE_STEPS + 1
    assert info.requests == 3 and len(info.tiling) == 3
    assert (info.max_context, info.bundle_max_tiles) == (SMALL_CONTEXT, BUNDLE_TILES)
    pipe = Pipeline.load(small_bundle)
    requests = list(builtin_requests(3, SMALL.seed))
    for request, tiling in zip(requests, info.tiling, strict=True):
        assert tiling.request == request.name
        assert tiling.max_tiles == largest_fitting_budget(pipe, request, new_tokens)
        assert tiling.prompt_tokens + new_tokens <= SMALL_CONTEXT
    # With the bundle's default tiling the 1920x1080 and 1000x1000 requests overflow.
    for request in requests[1:]:
        with pytest.raises(PromptError, match="context holds"):
            pipe.prepare(request.prompt, [request.image])
    capped = [t for t in info.tiling if t.max_tiles < BUNDLE_TILES]
    assert len(capped) == 2
    # The vision graph saw exactly the capped tiles, and the record is on disk.
    recorded = sum(s["pixel_values"].shape[0] for s in calib.samples(VISION_GRAPH))
    assert recorded == sum(t.tiles for t in info.tiling)
    on_disk = json.loads((calib.directory / "calibration.json").read_text())
    assert [t["max_tiles"] for t in on_disk["tiling"]] == [t.max_tiles for t in info.tiling]
    assert CalibrationSet.open(calib.directory).info.tiling == info.tiling
    lines = [w for w in warnings if w.startswith(f"bundle context {SMALL_CONTEXT} tokens")]
    assert len(lines) == 1 and "capped" in lines[0] and "2 of 3 requests" in lines[0]


def test_quantize_on_a_small_context_records_the_capped_budgets(
    small_bundle: Path,
    small_calib: tuple[CalibrationSet, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calib, _ = small_calib
    out = tmp_path / "int8"
    settings = QuantizeSettings("int8", accuracy_requests=3, accuracy_steps=4)
    told: list[str] = []
    quantize_bundle(small_bundle, out, settings, calib.directory, quiet=True, warn=told.append)
    # quantize says, in one line, that its held-out images were capped.
    assert [w for w in told if w.startswith(f"bundle context {SMALL_CONTEXT} tokens")], told
    report = json.loads((out / ACCURACY_FILE).read_text())
    assert report["passed"], report["failures"]
    assert (report["max_context"], report["bundle_max_tiles"]) == (SMALL_CONTEXT, BUNDLE_TILES)
    assert [t["request"] for t in report["tiling"]] == report["requests"]
    assert any(t["max_tiles"] < BUNDLE_TILES for t in report["tiling"])
    for tiling in report["tiling"]:
        assert tiling["prompt_tokens"] + 4 <= SMALL_CONTEXT
    # The accuracy measurement itself reports the cap in one line when asked to.
    held_out = list(builtin_requests(3, SMALL.seed + HELD_OUT_SEED_OFFSET))
    warnings: list[str] = []
    again = measure_accuracy(
        Pipeline.load(small_bundle),
        Pipeline.load(out),
        held_out,
        precision="int8",
        thresholds=DEFAULT_THRESHOLDS["int8"],
        steps=4,
        warn=warnings.append,
    )
    assert [t.max_tiles for t in again.tiling] == [t["max_tiles"] for t in report["tiling"]]
    assert len(warnings) == 1 and warnings[0].startswith(f"bundle context {SMALL_CONTEXT}")
    # The printed table names the cap too.
    monkeypatch.setenv("COLUMNS", "160")  # one row per line
    print_accuracy(again)
    table = capsys.readouterr().err
    budgets = sorted(t.max_tiles for t in again.tiling if t.max_tiles < BUNDLE_TILES)
    row = next(line for line in table.splitlines() if f"capped to fit {SMALL_CONTEXT}" in line)
    cap = str(budgets[0]) if len(set(budgets)) == 1 else f"{budgets[0]}-{budgets[-1]}"
    assert f"{cap} in {len(budgets)} of 3 requests" in row and f"bundle: {BUNDLE_TILES}" in row


# --- NVLM-H ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nvlm_h(tiny_bundle: TinyBundle, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    _, bundle = tiny_bundle("nvlm-h", max_tiles=BUNDLE_TILES)
    calib = tmp_path_factory.mktemp("calib-nvlm-h") / "calib"
    options = CalibrationOptions(max_samples=2, decode_steps=2)
    collect_calibration(bundle, calib, options, warn=quiet, progress=False)
    return bundle, calib


@pytest.fixture(scope="module")
def nvlm_h_quantized(
    nvlm_h: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(precision: str) -> Path:
        if precision not in cache:
            bundle, calib = nvlm_h
            out = tmp_path_factory.mktemp(f"nvlm-h-{precision}") / "bundle"
            quantize_bundle(bundle, out, fast(precision), calib, quiet=True)
            cache[precision] = out
        return cache[precision]

    return get


@pytest.mark.parametrize("precision", NVLM_H_PRECISIONS)
def test_nvlm_h_quantized_bundle_runs_within_its_accuracy_budget(
    nvlm_h_quantized: Callable[[str], Path], precision: str
) -> None:
    out = nvlm_h_quantized(precision)
    manifest = load_manifest(out)
    assert manifest.architecture == "nvlm-h" and manifest.precision == precision
    expected = {n for n in manifest.graphs if n in PRECISION_PLAN[precision]}
    assert expected == {DECODER_GRAPH, CROSS_KV_GRAPH, VISION_GRAPH}
    assert {n for n, g in manifest.graphs.items() if g.quantization} == expected
    # NVLM-H puts the thumbnail in the decoder sequence and the tiles in cross-attention: a
    # multi-tile image exercises both paths of the quantized bundle.
    image = np.asarray(builtin_image(1, seed=3))  # 1920x1080: 2 tiles + thumbnail
    stream = Pipeline.load(out).generate("What is this?", [image], max_new_tokens=3)
    result = stream.run()
    assert stream.prepared.tilings[0].num_tiles == 3 and 1 <= len(result.token_ids) <= 3
    accuracy = json.loads((out / ACCURACY_FILE).read_text())
    assert accuracy["passed"], accuracy["failures"]
    # Every quantized side graph is compared (int4's INT8 vision too); none is left unchanged.
    compared = {o["graph"] for o in accuracy["outputs"]}
    assert compared == expected - {DECODER_GRAPH}
    assert set(accuracy["unchanged_graphs"]) == set(manifest.graphs) - expected


# NVLM-H's vision graph feeds the pixel-shuffled features to two projectors: the thumbnail's
# (LayerNorm first) and the tiles' (a MatMul first). Only the MatMul may read them through Q/DQ.
@pytest.mark.parametrize("precision", NVLM_H_PRECISIONS)
def test_nvlm_h_quantized_graphs_have_the_tensorrt_qdq_pattern(
    nvlm_h_quantized: Callable[[str], Path], precision: str
) -> None:
    out = nvlm_h_quantized(precision)
    for name, spec in load_manifest(out).graphs.items():
        graph = Graph(out / spec.file)
        if spec.quantization is None:
            assert not graph.qdq(), f"{name} is not quantized but has Q/DQ"
            continue
        check_qdq(graph, spec.precision, spec.quantization)


# --- the error cases of issue #6 through the real CLI ---------------------------------------------


def test_cli_empty_image_folder_fails_and_writes_nothing(
    small_bundle: Path, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "calib"
    result = cli(
        "calibrate", str(small_bundle), "--images", str(tmp_path / "empty"), "-o", str(out)
    )
    assert result.exit_code == 2
    assert "matches no image files" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_cli_calibration_of_another_bundle_fails_and_writes_nothing(
    small_bundle: Path, nvlm_h: tuple[Path, Path], tmp_path: Path
) -> None:
    _, other_calib = nvlm_h
    out = tmp_path / "q"
    result = cli(
        "quantize", str(small_bundle), "-p", "int8", "--calib", str(other_calib), "-o", str(out)
    )
    assert result.exit_code == 2
    assert "recorded on another bundle" in result.stderr
    assert not list(tmp_path.iterdir())


def test_cli_int4_vision_without_calibration_fails_and_writes_nothing(
    small_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "q"
    args = ["quantize", str(small_bundle), "-p", "int4", "--components", "vision", "-o", str(out)]
    result = cli(*args)
    assert result.exit_code == 2
    assert "Quantizing vision (int8) needs a calibration set" in result.stderr
    assert "nvlm-export calibrate" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("precision", NVLM_H_PRECISIONS)
def test_profile_breaks_down_a_quantized_nvlm_h_bundle(
    nvlm_h_quantized: Callable[[str], Path], precision: str
) -> None:
    """The hybrid architecture (thumbnail in the decoder, tiles in cross-attention) profiles like
    the others: every stage timed, totals consistent with their parts."""
    check_profile(nvlm_h_quantized(precision))
