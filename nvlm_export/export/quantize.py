"""`quantize_bundle`: a bundle and its calibration set in, a quantized bundle out.

    bundle + calib ──Q/DQ per graph (export/qdq.py)──▶ staging/{vision,decoder,...}.onnx
                   └──copy──▶ embedding table, tokenizer; manifest with per-graph quantization
    staging vs bundle on held-out requests ──▶ accuracy.json (export/accuracy.py)

The output is written into a locked staging directory (nvlm_export/output.py); its manifest is
written and it is moved into place only when the accuracy report is within its thresholds (or
--force), so a failed or interrupted run leaves nothing that looks like a bundle. Which precision
a component may take is declared in `COMPONENT_PRECISIONS`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nvlm_export.calibration.collect import held_out_requests
from nvlm_export.calibration.dataset import CalibrationSet
from nvlm_export.errors import ExportError, InputError, ValidationError
from nvlm_export.export.accuracy import (
    DEFAULT_THRESHOLDS,
    AccuracyReport,
    Thresholds,
    graphs_to_load,
    measure_accuracy,
)
from nvlm_export.export.defaults import ACCURACY_REQUESTS, ACCURACY_STEPS
from nvlm_export.export.fused_attention import add_onnxruntime_variants
from nvlm_export.output import BUNDLE, publish_bundle, staged_output
from nvlm_export.progress import Stages
from nvlm_export.runtime.manifest import (
    CROSS_KV_GRAPH,
    DECODER_GRAPH,
    LOGITS,
    QUANTIZED_PRECISIONS,
    VISION_GRAPH,
    GraphSpec,
    Manifest,
    load_manifest,
)

PRECISIONS = QUANTIZED_PRECISIONS
ACCURACY_FILE = "accuracy.json"

# Which precisions each component may take. INT4 is weight-only, which pays off where GEMMs are
# memory-bound (the decoder's one-token steps, the cross key/value projections); the ViT runs
# 256+ tokens per tile through compute-bound GEMMs, where INT4 weights buy nothing on TensorRT.
COMPONENT_PRECISIONS: dict[str, tuple[str, ...]] = {
    VISION_GRAPH: ("int8", "fp8"),
    DECODER_GRAPH: ("int8", "fp8", "int4"),
    CROSS_KV_GRAPH: ("int8", "fp8", "int4"),
}
# The graph output each graph's LM head computes. The head is found from the graph's structure
# (`qdq.output_projection`: the GEMM that writes `logits`), not from a module or file name.
LM_HEAD_OUTPUTS: dict[str, str] = {DECODER_GRAPH: LOGITS}
# Whether the LM head is quantized when neither --quantize-lm-head nor --keep-lm-head is given.
# INT8/FP8 keep it in float, like ModelOpt and TensorRT-LLM: it decides every token and its
# logits feed sampling directly. INT4 quantizes it, like ONNX Runtime GenAI: an INT4 bundle is
# chosen for memory bandwidth, and in one-token decode steps the head is the largest single
# weight read (vocab x hidden). docs/quantization.md has the measurements.
QUANTIZE_LM_HEAD_BY_DEFAULT: dict[str, bool] = {"int8": False, "fp8": False, "int4": True}
METHODS = {
    "int8": "static Q/DQ: int8 symmetric, per-channel weights, per-tensor activations (MinMax)",
    "fp8": "static Q/DQ: fp8 e4m3fn, amax scales, per-channel weights, per-tensor activations",
    "int4": "weight-only Q/DQ: int4 symmetric, block-wise along input channels",
}


@dataclass(frozen=True)
class QuantizeSettings:
    precision: str
    components: tuple[str, ...] | None = None  # None: every graph that supports the precision
    exclude: tuple[str, ...] = ()
    thresholds: Thresholds | None = None  # None: DEFAULT_THRESHOLDS[precision]
    accuracy_requests: int = ACCURACY_REQUESTS
    accuracy_steps: int = ACCURACY_STEPS
    force: bool = False
    overwrite: bool = False
    quantize_lm_head: bool | None = None  # None: QUANTIZE_LM_HEAD_BY_DEFAULT[precision]
    # False: no accuracy check (no second model in memory, no accuracy.json), with a warning.
    check_accuracy: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(
                f"Unknown quantization precision '{self.precision}'",
                fix=f"Choose one of: {', '.join(PRECISIONS)}",
            )

    @property
    def budget(self) -> Thresholds:
        return self.thresholds or DEFAULT_THRESHOLDS[self.precision]

    @property
    def lm_head_quantized(self) -> bool:
        if self.quantize_lm_head is None:
            return QUANTIZE_LM_HEAD_BY_DEFAULT[self.precision]
        return self.quantize_lm_head


@dataclass
class QuantizeReport:
    bundle: Path
    manifest: Manifest
    accuracy: AccuracyReport | None  # None: the check was skipped
    quantized: list[str]
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def bundle_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.bundle.rglob("*") if p.is_file())


def plan_components(manifest: Manifest, settings: QuantizeSettings) -> list[str]:
    """The graphs to quantize; refuses a component that cannot take the precision."""
    if settings.components is None:
        return [g for g in manifest.graphs if settings.precision in COMPONENT_PRECISIONS.get(g, ())]
    for name in settings.components:
        manifest.graph(name)  # BundleError for a graph the bundle does not have
        supported = COMPONENT_PRECISIONS.get(name, ())
        if settings.precision not in supported:
            raise InputError(
                f"Unsupported precision for a component: {name} cannot be quantized to "
                f"{settings.precision}",
                why=f"{name} supports {', '.join(supported) or 'no quantization'}",
                fix=f"Drop {name} from --components or choose "
                + " or ".join(f"--precision {p}" for p in supported),
            )
    return list(dict.fromkeys(settings.components))


def quantize_bundle(
    bundle: Path,
    out: Path,
    settings: QuantizeSettings,
    calibration: Path | None,
    *,
    quiet: bool = False,
    warn: Callable[[str], None] = print,
) -> QuantizeReport:
    """Quantize `bundle` into `out`; raise (leaving nothing at `out`) on failure."""
    sources = [bundle] if calibration is None else [bundle, calibration]
    with staged_output(out, BUNDLE, overwrite=settings.overwrite, sources=sources) as staged:
        manifest = load_manifest(bundle)
        _check_source(manifest, bundle)
        components = plan_components(manifest, settings)
        calib = _open_calibration(calibration, manifest, bundle, settings.precision, components)
        title = f"Quantizing {bundle} → {out} ({settings.precision})"
        staging = staged.path
        with Stages(title, quiet=quiet) as stages:
            _copy_side_files(bundle, staging, manifest)
            graphs = dict(manifest.graphs)
            for name in components:
                with stages.stage(f"{name} graph"):
                    graphs[name] = _quantize_graph(bundle, staging, name, manifest, settings, calib)
                stages.note(f"{name}: {_summary(graphs[name])}")
            for name in set(manifest.graphs) - set(components):
                _copy_graph(bundle, staging, manifest.graphs[name].file)
            quantized = replace(manifest, graphs=graphs, precision=settings.precision, engines={})
            with stages.stage("ONNX Runtime variants (fused attention)"):
                quantized = add_onnxruntime_variants(staging, quantized)
            accuracy = None
            if settings.check_accuracy:
                with stages.stage("accuracy on held-out requests"):
                    unchanged = set(manifest.graphs) - set(components)
                    accuracy = _accuracy(
                        bundle, staging, quantized, calib, settings, unchanged, warn
                    )
                (staging / ACCURACY_FILE).write_text(
                    json.dumps(accuracy.to_dict(), indent=2) + "\n"
                )
                _enforce_budget(accuracy, settings, warn)
            else:
                warn(
                    f"accuracy not checked (--no-accuracy-check): the {settings.precision} bundle "
                    "was not compared with its source; check it on the target with nvlm-export "
                    "quantize or a task evaluation before deploying it"
                )
            quantized = publish_bundle(staged, quantized)  # records accuracy.json too
    return QuantizeReport(out, quantized, accuracy, components, dict(stages.seconds))


# --- steps ------------------------------------------------------------------------------------


def _check_source(manifest: Manifest, bundle: Path) -> None:
    if manifest.precision in PRECISIONS:
        raise InputError(
            f"Bundle '{bundle}' is already quantized ({manifest.precision})",
            fix="Quantize the unquantized bundle it came from",
        )


def _open_calibration(
    path: Path | None, manifest: Manifest, bundle: Path, precision: str, components: Sequence[str]
) -> CalibrationSet | None:
    if path is None:
        if precision == "int4":
            return None  # weight-only: no activation ranges needed
        raise InputError(
            f"--precision {precision} needs a calibration set (activation ranges)",
            fix=f"Run nvlm-export calibrate {bundle} -o CALIB, then pass --calib CALIB",
        )
    calib = CalibrationSet.open(path)
    calib.check_matches(manifest, bundle)
    if precision != "int4":
        for name in components:
            if calib.count(name) == 0:
                raise InputError(
                    f"Calibration set '{path}' has no samples for the {name} graph",
                    fix="Record it again with nvlm-export calibrate",
                )
    return calib


def _lm_head(model: Any, graph: str) -> Any:
    """The graph's LM head node (a `qdq.QuantizableNode`), or None for graphs without one."""
    from nvlm_export.export import qdq

    output = LM_HEAD_OUTPUTS.get(graph)
    if output is None:
        return None
    head = qdq.output_projection(model, output)
    if head is None:
        raise ExportError(
            f"Cannot find the LM head in the {graph} graph",
            why=f"no MatMul/Gemm computes its '{output}' output",
            fix="Re-export the bundle with this version of nvlm-export",
        )
    return head


def _quantize_graph(
    bundle: Path,
    staging: Path,
    name: str,
    manifest: Manifest,
    settings: QuantizeSettings,
    calib: CalibrationSet | None,
) -> GraphSpec:
    import onnx

    from nvlm_export.export import qdq

    graph = manifest.graphs[name]
    source = bundle / graph.file
    model = onnx.load(str(source), load_external_data=False)
    nodes = qdq.quantizable_nodes(model)
    excluded = qdq.select_excluded(nodes, settings.exclude)
    head = _lm_head(model, name)
    if head is not None and not settings.lm_head_quantized and head not in excluded:
        excluded.insert(0, head)
    names = [n.name for n in excluded]
    record: dict[str, Any] = {
        "method": METHODS[settings.precision],
        "library": _library(),
        "quantized_ops": list(qdq.QUANTIZABLE_OPS),
        "quantized_nodes": len(nodes) - len(excluded),
        "exclude_patterns": list(settings.exclude),
        "excluded_nodes": [n.to_dict() for n in excluded],
    }
    if head is not None:
        record["lm_head"] = head.to_dict() | {"quantized": head not in excluded}
    if settings.precision == "int4":
        count, block = qdq.plan_int4(source, exclude=names)
        external = qdq.graph_bytes(source) > qdq.EXTERNAL_DATA_BYTES
        qdq.quantize_int4_graph(
            source, staging / graph.file, exclude=names, block_size=block, external=external
        )
        record["block_size"] = block
        record["quantized_nodes"] = count
    else:
        assert calib is not None
        qdq.quantize_static_graph(
            source,
            staging / graph.file,
            calib.samples(name),
            precision=settings.precision,
            exclude=names,
        )
    if calib is not None:
        record["calibration"] = {
            "path": str(calib.directory.resolve()),
            "bundle_fingerprint": calib.info.bundle_fingerprint,
            "seed": calib.info.seed,
            "requests": calib.info.requests,
            "samples": calib.count(name),
            "source": calib.info.source,
        }
    return replace(graph, precision=settings.precision, quantization=record)


def _accuracy(
    bundle: Path,
    staging: Path,
    quantized: Manifest,
    calib: CalibrationSet | None,
    settings: QuantizeSettings,
    unchanged: set[str],
    warn: Callable[[str], None],
) -> AccuracyReport:
    """The accuracy report of `staging` against `bundle`, one bundle loaded at a time (the
    source first). `unchanged` graphs were copied as they are, so they compute exactly what the
    reference does: an unchanged vision graph is not loaded or run a second time. `quantized`
    is the staged bundle's manifest, written only once the accuracy is known."""
    from nvlm_export.calibration.dataset import CalibrationInfo
    from nvlm_export.runtime.pipeline import Pipeline

    info = calib.info if calib else CalibrationInfo("", "", 0, 0, 0, "builtin")
    requests = held_out_requests(info, settings.accuracy_requests, warn)
    needed = graphs_to_load(quantized.graphs, unchanged)
    return measure_accuracy(
        lambda: Pipeline.load(bundle),
        lambda: Pipeline.load(staging, manifest=quantized, graphs=needed),
        requests,
        precision=settings.precision,
        thresholds=settings.budget,
        steps=settings.accuracy_steps,
        unchanged=unchanged,
        warn=warn,  # one line when held-out images had to be capped to fit the context
    )


def _enforce_budget(
    report: AccuracyReport, settings: QuantizeSettings, warn: Callable[[str], None]
) -> None:
    if report.passed:
        return
    if settings.force:
        warn(f"accuracy outside the budget, kept because of --force: {'; '.join(report.failures)}")
        return
    raise ValidationError(
        f"The {settings.precision} bundle is less accurate than allowed",
        why="; ".join(report.failures),
        fix="Exclude sensitive layers (--exclude), calibrate on domain images, relax the "
        "thresholds, or pass --force to keep it",
    )


def _copy_side_files(bundle: Path, staging: Path, manifest: Manifest) -> None:
    """The embedding table and tokenizer files, unchanged."""
    names = [manifest.embedding.file, manifest.tokenizer.file, *manifest.tokenizer.config_files]
    for name in names:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle / name, staging / name)


def _copy_graph(bundle: Path, staging: Path, file: str) -> None:
    """A graph kept at source precision, with its external data files."""
    import onnx

    model = onnx.load(str(bundle / file), load_external_data=False)
    data = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    for name in (file, *data):
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle / name, staging / name)


def _library() -> str:
    import onnxruntime

    # Scales and INT4 packing follow onnxruntime.quantization; nvlm-export places the Q/DQ.
    return f"onnxruntime.quantization {onnxruntime.__version__} arithmetic, streamed Q/DQ"


def _summary(graph: GraphSpec) -> str:
    q = graph.quantization or {}
    block = f", block {q['block_size']}" if "block_size" in q else ""
    return (
        f"{q.get('quantized_nodes', 0)} nodes {graph.precision}{block}, "
        f"{len(q.get('excluded_nodes', []))} kept in float"
    )
