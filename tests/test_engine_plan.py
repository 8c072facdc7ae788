"""Build plans: one engine per graph, profiles covering the bundle's limits, typing by precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from helpers.manifests import (
    HEAD_DIM,
    HIDDEN,
    KV_HEADS,
    MAX_CONTEXT,
    MAX_TILES,
    make_manifest,
    write_bundle,
)
from typer.testing import CliRunner

from nvlm_export.commands.engine import engine as engine_command
from nvlm_export.errors import InputError, MissingExtraError
from nvlm_export.export.engine_plan import PLAN_NAME, PlanOptions, plan_build
from nvlm_export.export.targets import resolve_target
from nvlm_export.runtime.manifest import GraphSpec, Manifest, TensorSpec

ARCHITECTURES = ("nvlm-d", "nvlm-x", "nvlm-h")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_one_engine_per_graph_with_cross_kv_for_x_and_h(architecture: str) -> None:
    plan = plan_build(make_manifest(architecture), resolve_target("orin"))
    expected = {"vision", "decoder"} | ({"cross_kv"} if architecture != "nvlm-d" else set())
    assert {e.graph for e in plan.engines} == expected
    assert all(e.engine == f"engines/{e.graph}.engine" for e in plan.engines)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_vision_profile_covers_every_tile_count_including_thumbnail(architecture: str) -> None:
    (profile,) = (
        plan_build(make_manifest(architecture), resolve_target("orin")).engine("vision").profiles
    )
    low, opt, high = profile.shapes["pixel_values"]
    assert low == (1, 3, 448, 448)
    assert high == (MAX_TILES + 1, 3, 448, 448)
    assert opt == (3, 3, 448, 448)  # a 1920x1080 photo: 2x1 grid + thumbnail


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_decoder_has_decode_then_prefill_profiles_within_max_context(architecture: str) -> None:
    decode, prefill = (
        plan_build(make_manifest(architecture), resolve_target("orin")).engine("decoder").profiles
    )
    assert (decode.name, prefill.name) == ("decode", "prefill")
    embeds_low, _, embeds_high = decode.shapes["inputs_embeds"]
    assert embeds_low == embeds_high == (1, 1, HIDDEN)  # decode: seq = 1
    _, _, past_high = decode.shapes["past_key_values.0.key"]
    assert past_high == (1, KV_HEADS, MAX_CONTEXT - 1, HEAD_DIM)
    assert prefill.shapes["inputs_embeds"][0] == (1, 1, HIDDEN)
    assert prefill.shapes["inputs_embeds"][2] == (1, MAX_CONTEXT, HIDDEN)
    assert prefill.shapes["past_key_values.1.value"][2] == (1, KV_HEADS, 0, HEAD_DIM)
    for profile in (decode, prefill):  # seq + past never exceeds the context
        assert profile.axes["seq"].max + profile.axes["past"].max <= MAX_CONTEXT
        assert profile.covers({"inputs_embeds": (1, 1, HIDDEN)})


def test_cross_attention_inputs_share_the_cross_axis_in_every_profile() -> None:
    plan = plan_build(make_manifest("nvlm-x"), resolve_target("thor"))
    (cross,) = plan.engine("cross_kv").profiles
    for profile in plan.engine("decoder").profiles:
        assert profile.axes["cross"] == cross.axes["cross"]
        mask_low, _, mask_high = profile.shapes["cross_attention_mask"]
        assert mask_low[2] == 1 and mask_high[2] == cross.axes["cross"].max
    # NVLM-X puts all 7 tiles (256 tokens each) into the cross sequence.
    assert cross.axes["cross"].max == (MAX_TILES + 1) * 256


def test_chunked_prefill_lets_past_grow_and_keeps_the_sum_bounded() -> None:
    plan = plan_build(make_manifest(), resolve_target("orin"), PlanOptions(prefill_chunk=1024))
    _, prefill = plan.engine("decoder").profiles
    assert prefill.axes["seq"].max == 1024
    assert prefill.axes["past"].max == MAX_CONTEXT - 1024


@pytest.mark.parametrize("precision", ["int8", "fp8", "int4"])
def test_quantized_graphs_build_strongly_typed(precision: str) -> None:
    target = resolve_target("h100")
    plan = plan_build(make_manifest("nvlm-h", precision), target, PlanOptions(precision=precision))
    decoder = plan.engine("decoder")
    assert decoder.precision == precision
    assert decoder.strongly_typed and not decoder.fp16_flag
    assert plan.engine("vision").precision == "fp16"  # left in float by the quantizer


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_float_graphs_keep_their_onnx_types(precision: str) -> None:
    plan = plan_build(make_manifest("nvlm-d", precision), resolve_target("a100"))
    assert all(e.precision == precision and e.strongly_typed for e in plan.engines)


def test_fp16_from_fp32_onnx_uses_the_fp16_flag_on_tensorrt_10_only() -> None:
    manifest = make_manifest("nvlm-d", "fp32")
    plan = plan_build(manifest, resolve_target("orin"), PlanOptions(precision="fp16"))
    assert all(e.fp16_flag and not e.strongly_typed for e in plan.engines)
    with pytest.raises(InputError, match="TensorRT 11 removed the FP16 builder flag"):
        plan_build(
            manifest,
            resolve_target("h100"),
            PlanOptions(precision="fp16", tensorrt_version="11.0"),
        )


def test_quantized_precision_needs_a_quantized_bundle() -> None:
    with pytest.raises(InputError, match="nvlm-export quantize --precision int8"):
        plan_build(make_manifest("nvlm-d", "fp16"), resolve_target("orin"), PlanOptions("int8"))


def test_fp8_bundle_on_orin_is_refused_before_planning() -> None:
    with pytest.raises(InputError, match="Use --precision int8"):
        plan_build(make_manifest("nvlm-d", "fp8"), resolve_target("orin"))


def test_builder_limits_are_checked() -> None:
    manifest, orin = make_manifest(), resolve_target("orin")
    with pytest.raises(InputError, match=r"0 \(fastest build\) to 5"):
        plan_build(manifest, orin, PlanOptions(optimization_level=6))
    with pytest.raises(InputError, match="half of the shared memory"):
        plan_build(manifest, orin, PlanOptions(workspace_gib=40))
    plan = plan_build(manifest, orin, PlanOptions(workspace_gib=2, optimization_level=5))
    assert plan.workspace_bytes == 2 * 2**30 and plan.optimization_level == 5


def test_unknown_dynamic_axis_is_a_clear_bundle_error() -> None:
    manifest = make_manifest()
    vision = manifest.graphs["vision"]
    odd = GraphSpec(
        vision.file, (TensorSpec("pixel_values", "float32", ("frames", 3, 448, 448)),), ()
    )
    with pytest.raises(Exception, match="dynamic axis 'frames'"):
        plan_build(
            Manifest(**{**manifest.__dict__, "graphs": {**manifest.graphs, "vision": odd}}),
            resolve_target("orin"),
        )


def test_plan_json_round_trips_the_profiles() -> None:
    plan = plan_build(make_manifest("nvlm-x"), resolve_target("thor"))
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["target"]["compute_capability"] == "11.0"
    assert data["tensorrt_version"] == "10.13"
    decoder = next(e for e in data["engines"] if e["graph"] == "decoder")
    assert [p["name"] for p in decoder["profiles"]] == ["decode", "prefill"]
    assert decoder["profiles"][0]["shapes"]["inputs_embeds"]["max"] == [1, 1, HIDDEN]


# --- the command (registered by the lead; a local Typer app until then) ----------------------

app = typer.Typer()
app.command()(engine_command)
runner = CliRunner()


def test_dry_run_writes_engine_plan_json_and_prints_the_table(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path, make_manifest("nvlm-h", "int8"))
    result = runner.invoke(
        app, [str(bundle), "--target", "orin", "--precision", "int8", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((bundle / PLAN_NAME).read_text())
    assert {e["graph"] for e in saved["engines"]} == {"vision", "decoder", "cross_kv"}
    assert "TensorRT build plan: orin" in result.stdout
    assert "decode" in result.stdout and "prefill" in result.stdout


def test_fp8_on_orin_fails_with_one_line_suggesting_int8(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path, make_manifest("nvlm-d", "fp8"))
    result = runner.invoke(app, [str(bundle), "-t", "orin", "-p", "fp8", "--dry-run"])
    assert isinstance(result.exception, InputError)
    assert "--precision int8" in str(result.exception)
    assert not (bundle / PLAN_NAME).exists()


def test_building_without_tensorrt_names_the_extra_and_the_target(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed")
    bundle = write_bundle(tmp_path, make_manifest())
    result = runner.invoke(app, [str(bundle), "--target", "orin"])
    assert isinstance(result.exception, MissingExtraError)
    message = str(result.exception)
    assert "nvlm-export[tensorrt]" in message and "target" in message
    assert "\n" not in message
