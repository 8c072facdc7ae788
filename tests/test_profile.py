"""`nvlm-export profile`: stage timings, memory, analytic cost and Jetson power, on tiny bundles."""

from __future__ import annotations

import csv
import json
import mmap
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from helpers.tiny import TinyBundle
from PIL import Image
from typer.testing import CliRunner

from nvlm_export.cli import _guarded
from nvlm_export.commands.profile import profile
from nvlm_export.errors import InputError
from nvlm_export.profiling import cost as cost_module
from nvlm_export.profiling.cost import decoder_cost
from nvlm_export.profiling.inputs import image_size_for_tiles, question_with_tokens
from nvlm_export.profiling.memory import (
    CallPeaks,
    current_rss_bytes,
    peak_rss_bytes,
    reset_peak_rss,
)
from nvlm_export.profiling.profiler import ProfileSettings, profile_bundle
from nvlm_export.profiling.report import CSV_FIELDS
from nvlm_export.profiling.tegrastats import TegrastatsMonitor, parse_tegrastats_line, summarize
from nvlm_export.runtime.manifest import load_manifest
from nvlm_export.runtime.pipeline import Pipeline
from nvlm_export.runtime.tiling import TilingConfig, choose_grid, tile_count

FIXTURES = Path(__file__).parent / "fixtures"
LAYOUTS = ("nvlm-d", "internvl")  # quantized and NVLM-X bundles: test_quantize.py
NEW_TOKENS = 4
PROMPT_TOKENS = 12
PREFILL_CHUNKS = (16, 0)  # 16-token chunks against the whole prompt in one call


@pytest.fixture(scope="module")
def bundles(tiny_bundle: TinyBundle) -> Callable[[str], Path]:
    return lambda layout: tiny_bundle(layout)[1]


@pytest.fixture(scope="module")
def reports(bundles):
    cache: dict[str, dict] = {}

    def get(layout: str) -> dict:
        if layout not in cache:
            settings = ProfileSettings(
                tiles=(1, 3),
                prompt_tokens=PROMPT_TOKENS,
                new_tokens=NEW_TOKENS,
                runs=2,
                warmup=1,
                prefill_chunks=PREFILL_CHUNKS,
            )
            report = profile_bundle(bundles(layout), settings, intra_op_threads=1)
            cache[layout] = report.to_dict()
        return cache[layout]

    return get


# --- the report ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_report_numbers_are_positive_and_consistent(reports, layout: str) -> None:
    report = reports(layout)
    assert report["architecture"] == layout
    assert [case["tiles"] for case in report["cases"]] == [1, 3]
    for case in report["cases"]:
        for name in ("prepare", "vision", "prefill"):
            assert case["stages_ms"][name]["median"] > 0
        for key in ("ttft_ms", "decode_ms_per_token", "e2e_ms", "vision_ms_per_tile"):
            dist = case[key]
            assert dist["p99"] >= dist["p90"] >= dist["median"] > 0
        assert case["decode_tokens_per_second"] > 0
        assert case["decode_ms_per_token"]["count"] == 2 * (NEW_TOKENS - 1)  # 1st token: prefill
        assert len(case["runs"]) == 2
        for run in case["runs"]:
            stages = run["stages_ms"]
            assert run["ttft_ms"] >= stages["vision"] + stages["prefill"]
            assert run["e2e_ms"] >= run["ttft_ms"] + sum(run["decode_ms"])
            assert len(run["decode_ms"]) == NEW_TOKENS - 1  # end-of-turn ignored: fixed length
        per_tile = case["vision_ms_per_tile"]["median"]
        assert per_tile == pytest.approx(case["stages_ms"]["vision"]["median"] / case["tiles"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_multi_tile_cases_time_vision_one_tile_per_call_and_batched(reports, layout: str) -> None:
    one, three = reports(layout)["cases"]
    assert one["vision_batching"] is None  # a single tile has nothing to batch
    batching = three["vision_batching"]
    assert batching["batch"] == 3  # the default 4, capped at the image's tiles
    single, batched = batching["ms_per_tile_one_per_call"], batching["ms_per_tile_batched"]
    assert single["count"] == batched["count"] == 2  # one per measured round
    assert single["median"] > 0 and batched["median"] > 0
    ratio = batching["batched_over_one_per_call"]
    assert ratio == pytest.approx(batched["median"] / single["median"])
    for side in ("one_per_call", "batched"):
        assert batching[f"peak_rss_rise_bytes_{side}"] >= 0  # measured (Linux resets the peak)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_long_prompts_time_each_prefill_chunk_size(reports, layout: str) -> None:
    report = reports(layout)
    assert report["settings"]["prefill_chunks"] == list(PREFILL_CHUNKS)
    for case in report["cases"]:
        assert case["prompt_tokens"] > PREFILL_CHUNKS[0]  # the tiny prompts are all longer
        rows = case["prefill_chunking"]["chunks"]
        assert [row["chunk_tokens"] for row in rows] == list(PREFILL_CHUNKS)
        for row in rows:
            assert row["prefill_ms"]["count"] == 2  # one per measured round
            assert row["prefill_ms"]["median"] > 0
            assert row["peak_rss_rise_bytes"] >= 0
    # The comparisons reset the peak resident size; the report's peak is still the whole one.
    assert report["memory"]["peak_rss_bytes"] >= report["memory"]["rss_after_load_bytes"]


def test_prefill_chunking_is_skipped_when_every_chunk_holds_the_prompt(bundles) -> None:
    settings = ProfileSettings(
        tiles=(1,), prompt_tokens=4, new_tokens=2, runs=1, warmup=0, prefill_chunks=(4096, 0)
    )
    (case,) = profile_bundle(bundles("internvl"), settings, intra_op_threads=1).to_dict()["cases"]
    assert case["prompt_tokens"] < 4096 and case["prefill_chunking"] is None


def test_a_single_prefill_chunk_size_is_refused_not_silently_untimed() -> None:
    with pytest.raises(InputError, match=r"One prefill chunk size \(512\) has nothing to time"):
        ProfileSettings(tiles=(1,), prefill_chunks=(512, 512))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prompt_holds_the_question_and_the_image_tokens(bundles, reports, layout: str) -> None:
    report = reports(layout)
    one, three = report["cases"]
    tokens_per_tile = load_manifest(bundles(layout)).prompt.tokens_per_tile
    # Two more tiles add their image tokens plus a few tile tags; the question is the same.
    assert three["prompt_tokens"] - one["prompt_tokens"] >= 2 * tokens_per_tile


@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_and_analytic_cost(bundles, reports, layout: str) -> None:
    report = reports(layout)
    memory = report["memory"]
    assert memory["peak_rss_bytes"] >= memory["rss_after_load_bytes"] > 0
    assert memory["bundle_weight_bytes"] > 0
    assert memory["gpu_peak_bytes"] is None and "no GPU" in memory["gpu_note"]
    analytic = report["analytic"]
    assert analytic["exact"] is True
    assert analytic["bytes_per_token"] > analytic["weight_bytes"] > 0
    assert analytic["flops_per_token"] > 2 * analytic["matrix_weights"] > 0
    assert analytic["bandwidth_bound_tokens_per_second"] is None  # no bandwidth given
    assert report["tegrastats"] is None  # not a Jetson


def test_matrix_weights_match_the_decoder_geometry(bundles) -> None:
    bundle = bundles("internvl")
    manifest = load_manifest(bundle)
    cost = decoder_cost(bundle, manifest)
    hidden, vocab = manifest.embedding.hidden_size, manifest.embedding.vocab_size
    kv_width = manifest.kv_cache.num_kv_heads * manifest.kv_cache.head_dim
    layers, intermediate = manifest.kv_cache.num_layers, 128  # the tiny decoder's MLP width
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * intermediate
    assert cost.matrix_weights == layers * per_layer + hidden * vocab  # + lm_head
    assert cost.weight_bytes >= 4 * cost.matrix_weights  # fp32, plus biases and norms
    assert cost.bandwidth_bound_tokens_per_second(1e9, 0) == pytest.approx(
        1e9 / (cost.weight_bytes + cost.embedding_row_bytes)
    )


def test_cost_without_onnx_falls_back_to_file_sizes(bundles, monkeypatch) -> None:
    bundle = bundles("internvl")
    manifest = load_manifest(bundle)
    monkeypatch.setattr(cost_module, "_initializer_costs", lambda path: None)
    cost = decoder_cost(bundle, manifest)
    assert cost.exact is False
    assert cost.weight_bytes == (bundle / "decoder.onnx").stat().st_size
    assert cost.matrix_weights == cost.weight_bytes // 4


def test_bandwidth_gives_a_bound(bundles) -> None:
    settings = ProfileSettings(
        tiles=(1,), prompt_tokens=4, new_tokens=3, runs=1, warmup=0, bandwidth_gbs=10.0
    )
    report = profile_bundle(bundles("internvl"), settings, intra_op_threads=1).to_dict()
    analytic = report["analytic"]
    assert analytic["bandwidth_bound_tokens_per_second"] == pytest.approx(
        10e9 / analytic["bytes_per_token"]
    )
    fraction = analytic["fraction_of_bound"]
    assert fraction == pytest.approx(
        analytic["measured_tokens_per_second"] / analytic["bandwidth_bound_tokens_per_second"]
    )


def test_given_images_are_profiled_as_they_are(bundles, tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (1800, 500), (10, 200, 30)).save(path)
    settings = ProfileSettings(images=(path,), prompt_tokens=4, new_tokens=2, runs=1, warmup=0)
    report = profile_bundle(bundles("internvl"), settings, intra_op_threads=1).to_dict()
    (case,) = report["cases"]
    config = load_manifest(bundles("internvl")).tiling
    assert case["label"] == "wide.png"
    assert case["image_size"] == [1800, 500]
    assert case["tiles"] == tile_count(choose_grid(1800, 500, config), config)


# --- the command ---------------------------------------------------------------------------------


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("profile")(_guarded(profile))
    app.command("other")(lambda: None)  # two commands: Typer keeps the subcommand name
    return app


def test_cli_writes_json_csv_and_png(bundles, tmp_path: Path) -> None:
    out = tmp_path / "prof"
    args = ["profile", str(bundles("internvl")), "--tiles", "1,3", "--runs", "1", "--warmup", "0"]
    args += ["--new-tokens", "3", "--prompt-tokens", "8", "--threads", "1", "-o", str(out)]
    result = CliRunner().invoke(cli_app(), [*args, "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert json.loads((out / "profile.json").read_text())["cases"] == printed["cases"]
    with (out / "profile.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == set(CSV_FIELDS)
    assert {row["case"] for row in rows} == {"1 tile", "3 tiles"}
    ttft = [r for r in rows if r["metric"] == "ttft"]
    assert all(float(r["median"]) > 0 for r in ttft)
    with Image.open(out / "profile.png") as chart:
        assert chart.format == "PNG" and chart.width > 400


def test_cli_table(bundles) -> None:
    args = ["profile", str(bundles("nvlm-d")), "--tiles", "1", "--runs", "1", "--warmup", "0"]
    args += ["--new-tokens", "2", "--prompt-tokens", "4", "--bandwidth-gbs", "20"]
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output
    assert "TTFT" in result.stdout and "1 tile" in result.stdout
    assert "bandwidth bound at 20.0 GB/s" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tiles", "1,x"], "not a list of whole numbers"),
        (["--tiles", "2"], "No image tiles into exactly 2 tiles"),
        (["--runs", "0"], "runs must be >= 1"),
        (["--prefill-chunks", "512,-1"], "--prefill-chunks '512,-1' has a number below 0"),
    ],
)
def test_cli_bad_options_are_one_line_errors(bundles, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli_app(), ["profile", str(bundles("internvl")), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


# --- inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tiles", [6, 12])
def test_synthetic_image_sizes_hit_every_reachable_tile_count(max_tiles: int) -> None:
    config = TilingConfig(max_tiles=max_tiles)
    reachable = {1, 3, 4, 5, 7} | ({9, 10, 11, 13} if max_tiles == 12 else set())
    for tiles in reachable:
        width, height = image_size_for_tiles(tiles, config)
        assert tile_count(choose_grid(width, height, config), config) == tiles
    with pytest.raises(InputError, match="exactly 2 tiles"):
        image_size_for_tiles(2, config)  # one tile has no thumbnail, two tiles get one


@pytest.mark.parametrize("tokens", [1, 7, 32, 100])
def test_question_has_exactly_the_requested_tokens(bundles, tokens: int) -> None:
    tokenizer = Pipeline.load(bundles("internvl")).tokenizer
    question = question_with_tokens(tokenizer, tokens)
    assert len(tokenizer.encode(question, add_special_tokens=False).ids) == tokens


# --- memory --------------------------------------------------------------------------------------


def _touched_mapping(size: int) -> mmap.mmap:
    """`size` bytes of fresh memory, every page written, so all of it is resident."""
    mapping = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        mapping[offset] = 1
    return mapping


def test_call_peaks_measure_a_call_and_keep_the_phase_peak() -> None:
    peaks = CallPeaks()
    if not peaks.resettable:
        pytest.skip("this OS cannot reset the peak resident size")
    # Anonymous mappings, not numpy arrays: pages malloc keeps after a free (a long test process
    # may hold many) would be reused by the call without raising the resident size.
    block = _touched_mapping(96 * 1024 * 1024)  # before any call
    high = peak_rss_bytes()
    block.close()
    seconds, rise = peaks.measure(lambda: _touched_mapping(48 * 1024 * 1024).close())
    assert seconds > 0
    assert rise is not None and 44 * 1024 * 1024 <= rise < 90 * 1024 * 1024
    # The reset in measure() did not lose the earlier, higher peak (the kernel's RSS counters
    # are approximate by a few pages; the call's own peak is ~48 MiB below it).
    assert peaks.phase_peak() >= high - 2 * 1024 * 1024


def test_peak_rss_sees_a_transient_allocation() -> None:
    if not reset_peak_rss():
        pytest.skip("this OS cannot reset the peak resident size")
    before = peak_rss_bytes()
    _touched_mapping(64 * 1024 * 1024).close()
    assert peak_rss_bytes() >= before + 60 * 1024 * 1024
    assert peak_rss_bytes() >= current_rss_bytes()


# --- tegrastats ----------------------------------------------------------------------------------


def fixture_lines() -> list[str]:
    text = (FIXTURES / "tegrastats.txt").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_tegrastats_orin_line() -> None:
    sample = parse_tegrastats_line(fixture_lines()[0])
    assert sample.timestamp == "11-03-2025 14:02:17"
    assert (sample.ram_used_mb, sample.ram_total_mb, sample.swap_used_mb) == (9311, 62841, 0)
    assert len(sample.cpu_percent) == 12 and sample.cpu_percent[-4:] == (None,) * 4
    assert sample.cpu_mean_percent == pytest.approx((38 + 41 + 12 + 9 + 55 + 3 + 0 + 1) / 8)
    assert (sample.gpu_percent, sample.gpu_mhz, sample.emc_percent) == (97.0, 1300, 23.0)
    assert sample.temperatures_c["GPU"] == pytest.approx(58.218)
    assert "CV0" not in sample.temperatures_c  # -256 C: sensor off
    assert sample.rails_mw["VDD_GPU_SOC"] == 21455
    assert sample.rails_average_mw["VDD_GPU_SOC"] == 19840
    assert "NC" not in sample.rails_mw and "RAM" not in sample.rails_mw
    assert sample.gpu_power_mw == 21455
    assert sample.total_power_mw == 21455 + 3602 + 7021 + 1204  # no input rail: sum of rails


def test_tegrastats_orin_nano_line_uses_the_input_rail() -> None:
    sample = parse_tegrastats_line(fixture_lines()[1])
    assert sample.timestamp is None
    assert sample.total_power_mw == 8123
    assert sample.gpu_power_mw is None  # GPU shares VDD_CPU_GPU_CV on this module
    assert (sample.gpu_percent, sample.gpu_mhz) == (64.0, 624)
    assert len(sample.cpu_percent) == 6


def test_tegrastats_thor_lines() -> None:
    busy, idle = (parse_tegrastats_line(line) for line in fixture_lines()[2:4])
    assert busy.ram_total_mb == 125772 and len(busy.cpu_percent) == 14
    assert busy.gpu_percent is None and busy.gpu_mhz == 1575  # Thor prints no GR3D load
    assert busy.gpu_power_mw == 38512 and busy.total_power_mw == 61233  # VIN is the input
    assert busy.temperatures_c["gpu"] == pytest.approx(49.125)
    assert idle.gpu_mhz is None and idle.swap_used_mb is None
    assert idle.temperatures_c["gpu"] == pytest.approx(48.843)  # the /limit suffix is dropped
    assert idle.total_power_mw == 1204 + 5511 + 4980
    summary = summarize([busy, idle])
    assert summary["samples"] == 2
    assert summary["gpu_power_mw"] == {"mean": (38512 + 1204) / 2, "peak": 38512}
    assert summary["gpu_percent"] is None


def test_tegrastats_monitor_samples_in_the_background(tmp_path: Path, monkeypatch) -> None:
    """A stand-in `tegrastats` on PATH prints the recorded lines; the monitor parses them."""
    fake = tmp_path / "tegrastats"
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(fixture_lines()[:2]) + "\n")
    script = f"import time\nprint(open({str(lines)!r}).read(), flush=True)\ntime.sleep(30)\n"
    fake.write_text(f"#!{sys.executable}\n{script}")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert TegrastatsMonitor.available()
    with TegrastatsMonitor(interval_ms=50) as monitor:
        for _ in range(100):
            if len(monitor.samples) >= 2:
                break
            time.sleep(0.05)
    assert [s.ram_used_mb for s in monitor.samples] == [9311, 3120]
    assert monitor._process is None  # stopped on exit
