"""OpenVINO runner: a bundle's standard ONNX graphs on OpenVINO's CPU plugin (`--backend openvino`).

Why a second CPU backend: on CPUs with AVX-512 BF16 (and AMX) OpenVINO runs what is not quantized
in bfloat16 and the Q/DQ GEMMs as int8 kernels, while ONNX Runtime's CPU provider runs attention
and every other float op in float32. On the bench INT8 vision graph OpenVINO took 0.665x ONNX
Runtime's time per tile (docs/performance.md), so `--backend auto` (the CLI's default) runs INT8
vision graphs here on CPUs with AMX or AVX-512 BF16 where this extra is installed.

It reads the standard graph (`file`; the ONNX Runtime variants hold `com.microsoft` ops OpenVINO
does not know) with its external data, compiles it once for the CPU with the latency hint, and
runs one infer request per call. Outputs are copied out of the request's buffers, which the next
call reuses. `openvino` is imported on activation only (the `openvino` extra).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import numpy as np

from nvlm_export.errors import BundleError, InputError, MissingExtraError, check_choice
from nvlm_export.runtime.backends.base import GraphRunner, GraphSpec

# `inference_precision` values: the plugin's default (bf16 where the CPU has it), or forced.
PRECISIONS = {"auto": None, "bf16": "bf16", "f32": "f32"}


class OpenVinoRunner(GraphRunner):
    """Runs one ONNX graph of a bundle on OpenVINO's CPU plugin."""

    backend_name = "openvino"

    def __init__(
        self,
        spec: GraphSpec,
        *,
        intra_op_threads: int | None = None,
        inference_precision: str = "auto",
        validate_inputs: bool = True,
    ) -> None:
        require_openvino()
        super().__init__(spec, validate_inputs=validate_inputs)
        check_choice(inference_precision, PRECISIONS, "OpenVINO inference precision")
        self.intra_op_threads = intra_op_threads
        self.inference_precision = PRECISIONS[inference_precision]
        self._request: Any = None
        self._outputs: dict[str, Any] = {}

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if self.intra_op_threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.intra_op_threads
        if self.inference_precision is not None:
            config["INFERENCE_PRECISION_HINT"] = self.inference_precision
        return config

    def _activate_impl(self) -> None:
        import openvino

        path = self.spec.existing_path()
        core = openvino.Core()
        try:
            compiled = core.compile_model(core.read_model(str(path)), "CPU", self._config())
        except RuntimeError as error:
            raise BundleError(
                f"OpenVINO cannot compile the {self.spec.name} graph {path}",
                why=str(error).strip().splitlines()[0] if str(error).strip() else "",
                fix="Run it with --backend onnxruntime, or re-export the bundle",
            ) from None
        self._check_interface(compiled)
        self._outputs = {name: compiled.output(name) for name in self.spec.output_names}
        self._request = compiled.create_infer_request()

    def _check_interface(self, compiled: Any) -> None:
        names = {name for port in compiled.inputs for name in port.get_names()}
        outputs = {name for port in compiled.outputs for name in port.get_names()}
        missing = [n for n in self.spec.input_names if n not in names]
        missing += [n for n in self.spec.output_names if n not in outputs]
        if missing or len(compiled.inputs) != len(self.spec.inputs):
            raise BundleError(
                f"The {self.spec.name} graph {self.spec.path} does not have the manifest's "
                "inputs and outputs",
                why=f"missing {missing}" if missing else "it has other inputs",
                fix="The manifest and the graph disagree; re-export the bundle",
            )

    def _infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self._request.infer(dict(feeds))
        except RuntimeError as error:
            raise InputError(
                f"OpenVINO failed to run the {self.spec.name} graph",
                why=str(error).strip().splitlines()[0] if str(error).strip() else "",
            ) from None
        return {name: np.array(results[port]) for name, port in self._outputs.items()}

    def _deactivate_impl(self) -> None:
        self._request = None
        self._outputs = {}


def require_openvino() -> None:
    if importlib.util.find_spec("openvino") is None:
        raise MissingExtraError(
            "The 'openvino' backend needs OpenVINO",
            why="the openvino package is not installed",
            fix="Install it with: pip install 'nvlm-export[openvino]'",
        )
