"""The memory plan: each stage's peak RSS, disk and output size, predicted from config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nvlm_export.cli import app
from nvlm_export.errors import InputError
from nvlm_export.export import memory_plan
from nvlm_export.export.build import BuildSettings, build
from nvlm_export.export.memory_plan import GiB, plan
from nvlm_export.models.config_io import render_config
from nvlm_export.models.tiny import make_tiny_checkpoint, tiny_config

NVLM_D_72B = Path(__file__).parent / "fixtures" / "nvlm-d-72b"
runner = CliRunner()


def _config_only(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _deeper(source: Path, target: Path, factor: int) -> Path:
    config = json.loads((source / "config.json").read_text())
    config["llm_config"]["num_hidden_layers"] *= factor
    return _config_only(target, config)


def test_nvlm_d_72b_int4_weight_only_build_fits_in_32_gib() -> None:
    memory = plan(NVLM_D_72B)
    inv = memory.inventory
    assert 79.0e9 < inv.run_parameters() < 79.8e9  # NVLM-D-72B: 79.4B parameters
    weight_only = [memory.stages["export fp32"], memory.stages["quantize int4"]]
    assert max(s.peak_bytes for s in weight_only) < 32 * GiB
    assert not any(s.runs_model for s in weight_only)
    # Disk: the fp32 bundle is 4 bytes per weight; INT4 keeps the ViT and embedding in fp32.
    assert memory.stages["export fp32"].output_bytes == pytest.approx(4 * 79.4e9, rel=0.01)
    int4 = memory.stages["quantize int4"].output_bytes
    assert 4 * (6.7e9 + 1.25e9) < int4 < memory.stages["export fp16"].output_bytes


def test_accuracy_check_that_does_not_fit_says_where_it_can_run() -> None:
    memory = plan(NVLM_D_72B, available_bytes=24 * GiB)
    assert memory.stages["quantize int4 + accuracy check"].peak_bytes > 128 * GiB
    assert memory.accuracy_check.startswith("not here")
    assert "skip" in memory.accuracy_check and "layer by layer" in memory.accuracy_check
    small = plan(NVLM_D_72B, available_bytes=1024 * GiB)
    assert small.accuracy_check.startswith("here")


def test_streaming_stages_are_flat_in_depth_and_running_stages_grow(tmp_path: Path) -> None:
    base, deep = plan(NVLM_D_72B), plan(_deeper(NVLM_D_72B, tmp_path / "deep", 2))
    assert deep.inventory.run_parameters() > 1.8 * base.inventory.run_parameters()
    for stage in ("export fp32", "export fp16", "quantize int4", "dry-run"):
        assert deep.stages[stage].peak_bytes == base.stages[stage].peak_bytes
    for stage in ("calibrate", "quantize int8", "export fp32 + validation"):
        assert deep.stages[stage].peak_bytes > 1.5 * base.stages[stage].peak_bytes


def test_a_tied_lm_head_is_counted_in_the_decoder_and_the_embedding_table(tmp_path: Path) -> None:
    config = tiny_config("3b", "internvl", vocab_size=1000, image_token_id=999, eos_id=995)
    memory = plan(_config_only(tmp_path / "3b", render_config(config)))
    embedding = 151936 * 2048
    assert memory.inventory.graph_parameters["embedding"] == embedding
    assert memory.inventory.largest_tensor == embedding
    # 3.40B parameters, the tied head written twice: once in decoder.onnx, once as the table
    expected = 4 * (3_402_546_176 + embedding)
    assert memory.stages["export fp32"].output_bytes == expected


def test_cross_attention_models_get_a_cross_kv_graph(tmp_path: Path) -> None:
    made = make_tiny_checkpoint(tmp_path / "x", "nvlm-x", seed=0)
    graphs = plan(tmp_path / "x").inventory.graph_parameters
    assert set(graphs) == {"vision", "decoder", "cross_kv", "embedding"}
    assert sum(graphs.values()) == made.parameters


def test_build_refuses_a_plan_larger_than_available_memory_unless_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tiny_checkpoint(tmp_path / "ckpt", "nvlm-d", seed=0)
    monkeypatch.setattr(memory_plan, "available_memory", lambda: 1024**2)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="--force") as refused:
        build(tmp_path / "ckpt", out, BuildSettings.of("int4"), quiet=True)
    assert "1.0 MiB" not in str(refused.value) and "0.0 GiB is available" in str(refused.value)
    assert not out.exists()

    result = runner.invoke(app, ["build", str(tmp_path / "ckpt"), "-p", "int4", "-o", str(out)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "--force" in result.output


def test_dry_run_prints_every_stage_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    result = runner.invoke(
        app, ["build", str(NVLM_D_72B), "-p", "int4", "-o", str(out), "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert set(shown["stages"]) == set(memory_plan.STAGES)
    assert shown["runs"] == [
        "export fp32 + validation",
        "calibrate vision",
        "quantize int4 + accuracy check",
    ]
    assert shown["serves"] == "int4" and shown["serving"]["int4"]["peak_bytes"] > 32 * GiB
    assert not out.exists()

    weight_only = ["--no-validate", "--no-accuracy-check"]
    result = runner.invoke(
        app, ["build", str(NVLM_D_72B), "-p", "int4", "-o", str(out), "--dry-run", *weight_only]
    )
    assert result.exit_code == 0, result.output
    marked = [line[2:34].strip() for line in result.output.splitlines() if line.startswith("▶")]
    assert marked == ["export fp32", "quantize int4"]
    assert "Serving the int4 weight-only bundle" in result.output  # its ViT stayed in fp32

    result = runner.invoke(app, ["export", str(NVLM_D_72B), "-o", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "quantize int8 + accuracy check" in result.output and "Accuracy check" in result.output
    assert not out.exists()


def test_fp8_accuracy_check_runs_dequantized_weights_and_int8_the_fp32_reference() -> None:
    stages = plan(NVLM_D_72B).stages
    reference = stages["calibrate"].peak_bytes  # the fp32 bundle running, every graph at once
    assert stages["quantize int8 + accuracy check"].peak_bytes == reference
    # ONNX Runtime's CPU kernels dequantize FP8 weights to fp32 beside the FP8 bytes
    assert stages["quantize fp8 + accuracy check"].peak_bytes > 1.2 * reference


def test_serving_a_bundle_holds_its_weights_as_the_cpu_kernels_do_and_a_full_kv_cache() -> None:
    """What `run` will need is known before the build: per precision, with the ViT in fp32 after
    a weight-only INT4 build, and with a longer context costing exactly its KV cache."""
    memory = plan(NVLM_D_72B)
    inv, serving = memory.inventory, memory.serving
    assert serving["int4"] < serving["int8"] < serving["fp32"] < serving["fp8"]
    # the 72B decoder in INT4 blocks (0.53 bytes a weight on disk, pre-packed by ONNX Runtime)
    # and the 6B ViT in INT8: far below the fp32 bundle's 296 GiB, above its 46 GiB on disk
    assert 46 * GiB < serving["int4"] < 128 * GiB < serving["fp32"]
    vision_gemms = inv.gemm_parameters["vision"]
    fp32_vision = serving["int4 weight-only"] - serving["int4"]
    run_bytes = memory_plan.CPU_RUN_BYTES
    assert fp32_vision == pytest.approx(
        (run_bytes["fp32"] - run_bytes["int8"]) * vision_gemms, abs=2
    )
    longer = plan(NVLM_D_72B, max_context=2 * inv.max_context).serving
    kv_cache = inv.kv_values_per_token * inv.max_context * 4
    assert longer["int4"] - serving["int4"] == pytest.approx(kv_cache, abs=2)
    # a prompt on OpenVINO holds the decoder again, several times its stored bytes
    assert memory.openvino_prompt["int4"] > 2 * 36 * GiB
