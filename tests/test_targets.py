"""Targets: presets as data, precision checked before any work, local GPU detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvlm_export.errors import InputError
from nvlm_export.export.targets import (
    TARGETS,
    building_here,
    check_precision,
    check_workspace,
    resolve_target,
    target_for_gpu,
)
from nvlm_export.runtime.backends.tensorrt import (
    LocalGpu,
    gpu_from_device_tree,
    parse_nvidia_smi,
)


def test_every_preset_resolves_by_name() -> None:
    for name in ("orin", "orin-nano", "thor", "a100", "h100", "h200", "l4", "l40s", "rtx-ada"):
        assert resolve_target(name.upper()).name == name
    with pytest.raises(InputError, match="Choose one of: auto, orin"):
        resolve_target("xavier")


def test_fp8_on_orin_fails_suggesting_int8() -> None:
    with pytest.raises(InputError) as caught:
        check_precision(resolve_target("orin"), "fp8")
    message = str(caught.value)
    assert "compute capability 8.9+" in message and "8.7" in message
    assert "Use --precision int8 (" in message


@pytest.mark.parametrize(("name", "tensorrt"), [("orin", "10.3"), ("thor", "10.13")])
def test_int4_is_refused_where_the_jetpack_tensorrt_cannot_read_its_opset(
    name: str, tensorrt: str
) -> None:
    """INT4's blocked DequantizeLinear is opset 21; JetPack 6 and 7's TensorRT read up to 20, so
    an INT4 bundle would fail on the device, after the trip there."""
    target = resolve_target(name)
    assert "int4" not in target.precisions and "int8" in target.precisions
    with pytest.raises(InputError) as caught:
        check_precision(target, "int4")
    message = str(caught.value)
    assert f"has TensorRT {tensorrt}" in message and "opset 21" in message
    assert "from 10.15 on" in message and "--precision int8" in message


@pytest.mark.parametrize("name", ["a100", "h100", "l4"])
def test_int4_stays_on_gpus_where_the_user_picks_tensorrt(name: str) -> None:
    check_precision(resolve_target(name), "int4")


@pytest.mark.parametrize("name", ["thor", "h100", "h200", "l4", "l40s", "rtx-ada"])
def test_fp8_is_fine_from_ada_on(name: str) -> None:
    check_precision(resolve_target(name), "fp8")


def test_a100_has_no_fp8_but_int8_and_int4() -> None:
    a100 = resolve_target("a100")
    assert a100.precisions == ("fp32", "fp16", "int8", "int4")
    with pytest.raises(InputError, match="A100"):
        check_precision(a100, "fp8")


def test_unknown_precision_is_rejected() -> None:
    with pytest.raises(InputError, match="Unknown precision 'fp4'"):
        check_precision(resolve_target("thor"), "fp4")


def test_jetson_workspace_defaults_leave_the_shared_memory_to_the_weights() -> None:
    for name in ("orin", "orin-nano", "thor"):
        target = TARGETS[name]
        assert target.unified_memory
        assert target.default_workspace_gib <= target.memory_gib / 8
        check_workspace(target, target.default_workspace_bytes)
    with pytest.raises(InputError, match="half of the shared memory"):
        check_workspace(TARGETS["orin-nano"], 5 * 2**30)
    check_workspace(TARGETS["h100"], 60 * 2**30)  # a dGPU may use most of its memory


def test_nvidia_smi_output_maps_to_the_matching_preset() -> None:
    gpu = parse_nvidia_smi("NVIDIA H100 80GB HBM3, 9.0, 81559\n")
    assert gpu == LocalGpu("NVIDIA H100 80GB HBM3", (9, 0), pytest.approx(79.6, abs=0.1))
    assert target_for_gpu(gpu).name == "h100"
    l4 = target_for_gpu(parse_nvidia_smi("NVIDIA L4, 8.9, 23034"))
    assert l4.name == "l4" and "fp8" in l4.precisions


def test_jetson_without_memory_column_is_detected_as_orin() -> None:
    gpu = parse_nvidia_smi("Orin (nvgpu), 8.7, [N/A]")
    assert gpu is not None and gpu.memory_gib == 0.0
    target = target_for_gpu(LocalGpu("Orin", (8, 7), 64.0))
    assert target.name == "orin" and target.unified_memory
    assert target_for_gpu(LocalGpu("Orin", (8, 7), 7.4)).name == "orin-nano"


def test_unknown_gpu_becomes_a_generic_target_without_fp8() -> None:
    target = target_for_gpu(LocalGpu("Tesla T4", (7, 5), 15.0))
    assert target.name == "auto" and target.precisions == ("fp32", "fp16", "int8")
    assert not target.supports_bf16


def test_jetson_device_tree_names_the_module(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson AGX Thor Developer Kit\x00")
    gpu = gpu_from_device_tree(model)
    assert gpu is not None and gpu.compute_capability == (11, 0)
    model.write_bytes(b"Raspberry Pi 5\x00")
    assert gpu_from_device_tree(model) is None


def test_every_precision_has_a_weight_size_for_the_profiler_and_the_memory_plan() -> None:
    from nvlm_export.export.memory_plan import WEIGHT_BYTES
    from nvlm_export.profiling.cost import BYTES_PER_WEIGHT
    from nvlm_export.runtime.manifest import PRECISIONS

    assert set(PRECISIONS) <= set(BYTES_PER_WEIGHT)
    assert set(PRECISIONS) <= set(WEIGHT_BYTES)


def test_engines_built_here_are_judged_by_the_installed_tensorrt_except_for_a_named_jetson() -> (
    None
):
    """A plan for an Orin made on a workstation with TensorRT 10.15 must still refuse INT4 (the
    Orin parses with JetPack's 10.3); the local GPU and data-center GPUs build with what is here."""
    assert building_here(resolve_target("orin"), "orin", "10.15.1").tensorrt == "10.3"
    assert "int4" not in building_here(resolve_target("orin"), "orin", "10.15.1").precisions
    assert building_here(resolve_target("h100"), "h100", "10.3.0").tensorrt == "10.3.0"
    assert "int4" not in building_here(resolve_target("h100"), "h100", "10.3.0").precisions
    assert "int4" in building_here(resolve_target("h100"), "h100", "11.4.0").precisions
    assert building_here(resolve_target("h100"), "h100", None).tensorrt is None
