"""`quantize_bundle`: a bundle and its calibration set in, a quantized bundle out.

    bundle + calib ──Q/DQ per graph (export/qdq.py)──▶ staging/{vision,decoder,...}.onnx
                   └──copy──▶ embedding table, tokenizer; manifest with per-graph quantization
    staging vs bundle on held-out requests ──▶ accuracy.json (export/accuracy.py)

The output is written into a locked staging directory (nvlm_export/output.py); its manifest is
written and it is moved into place only when the accuracy report is within its thresholds (or
--force), so a failed or interrupted run leaves nothing that looks like a bundle. The precision
each graph takes in a bundle of each precision is declared in `PRECISION_PLAN`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nvlm_export.calibration.collect import Request, held_out_requests
from nvlm_export.calibration.dataset import CalibrationInfo, CalibrationSet
from nvlm_export.defaults import ACCURACY_REQUESTS, ACCURACY_STEPS
from nvlm_export.errors import ExportError, InputError, ValidationError, check_choice
from nvlm_export.export.accuracy import (
    DEFAULT_THRESHOLDS,
    AccuracyReport,
    ReferenceRun,
    Thresholds,
    graphs_to_load,
    measure_accuracy,
    run_reference,
)
from nvlm_export.export.fused_attention import (
    add_onnxruntime_variants,
    variant_file,
    with_onnxruntime_variant,
)
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
from nvlm_export.runtime.pipeline import Pipeline

ACCURACY_FILE = "accuracy.json"

# The precision each graph takes in a bundle of each precision (a graph not listed stays in
# float). INT4 is weight-only, which pays off where GEMMs are memory-bound (the decoder's
# one-token steps, the cross key/value projections). The ViT runs 1025 tokens per tile through
# compute-bound GEMMs, where INT4 weights buy nothing and INT8 W8A8 runs on the int8 matrix units
# (VNNI, tensor cores): an INT4 bundle's vision graph is INT8, from the calibration set.
PRECISION_PLAN: dict[str, dict[str, str]] = {
    "int8": {VISION_GRAPH: "int8", DECODER_GRAPH: "int8", CROSS_KV_GRAPH: "int8"},
    "fp8": {VISION_GRAPH: "fp8", DECODER_GRAPH: "fp8", CROSS_KV_GRAPH: "fp8"},
    "int4": {VISION_GRAPH: "int8", DECODER_GRAPH: "int4", CROSS_KV_GRAPH: "int4"},
}
# Precisions with activation scales, fitted on a calibration set (INT4 is weight-only).
CALIBRATED_PRECISIONS = ("int8", "fp8")
# The graph output each graph's LM head computes. The head is found from the graph's structure
# (`qdq.output_projection`: the GEMM that writes `logits`), not from a module or file name.
LM_HEAD_OUTPUTS: dict[str, str] = {DECODER_GRAPH: LOGITS}
# --lm-head: "auto" quantizes the head and keeps it only if the accuracy check stays within the
# budget (otherwise the decoder is quantized again with the head in float and checked again);
# "quantized" and "float" force the choice. In one-token decode steps the head is the largest
# single weight read (vocab x hidden), so a quantized head is most of an INT8 bundle's decode
# speed-up over fp32 (docs/quantization.md, "The LM head").
LM_HEAD_CHOICES = ("auto", "quantized", "float")
# What "auto" does when nothing is measured (--no-accuracy-check): INT8/FP8 keep the head in
# float, like ModelOpt and TensorRT-LLM; INT4 quantizes it, like ONNX Runtime GenAI.
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
    lm_head: str = "auto"  # one of LM_HEAD_CHOICES
    # False: no accuracy check (no second model in memory, no accuracy.json), with a warning.
    check_accuracy: bool = True

    def __post_init__(self) -> None:
        check_choice(self.precision, QUANTIZED_PRECISIONS, "quantization precision")
        check_choice(self.lm_head, LM_HEAD_CHOICES, "--lm-head")

    @property
    def budget(self) -> Thresholds:
        return self.thresholds or DEFAULT_THRESHOLDS[self.precision]

    @property
    def auto_lm_head(self) -> bool:
        """Whether the head is chosen by measurement (needs the accuracy check)."""
        return self.lm_head == "auto" and self.check_accuracy

    @property
    def lm_head_quantized(self) -> bool:
        """Whether the head is quantized first (auto: tried first, kept if within budget)."""
        if self.lm_head == "auto":
            return self.check_accuracy or QUANTIZE_LM_HEAD_BY_DEFAULT[self.precision]
        return self.lm_head == "quantized"


@dataclass
class LmHeadChoice:
    """How the LM head was chosen, with the accuracy figures of each candidate measured."""

    setting: str  # --lm-head
    quantized: bool
    reason: str
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)  # candidate -> figures

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QuantizeReport:
    bundle: Path
    manifest: Manifest
    accuracy: AccuracyReport | None  # None: the check was skipped
    quantized: list[str]
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def bundle_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.bundle.rglob("*") if p.is_file())


def calibrated_graphs(precision: str) -> tuple[str, ...] | None:
    """The graphs a calibration set must hold samples of for a `precision` bundle: None for all
    (every graph has activation scales), or just those that do (INT4: the vision graph)."""
    plan = PRECISION_PLAN[precision]
    graphs = tuple(g for g, p in plan.items() if p in CALIBRATED_PRECISIONS)
    return None if len(graphs) == len(plan) else graphs


def plan_components(
    manifest: Manifest,
    settings: QuantizeSettings,
    calibrated: bool,
    warn: Callable[[str], None] = print,
) -> dict[str, str]:
    """Each graph to quantize -> its precision (`PRECISION_PLAN`). Without a calibration set an
    INT4 bundle keeps its vision graph in float, with one warning line; a graph named in
    --components that cannot take the precision is refused."""
    plan = PRECISION_PLAN[settings.precision]
    if settings.components is None:
        chosen = {g: plan[g] for g in manifest.graphs if g in plan}
        if calibrated or settings.precision in CALIBRATED_PRECISIONS:
            return chosen  # int8/fp8 without a set fail in _open_calibration, naming the fix
        for name in [g for g, p in chosen.items() if p in CALIBRATED_PRECISIONS]:
            del chosen[name]
            warn(
                f"{name} kept in {manifest.graphs[name].precision}: an {settings.precision} bundle "
                f"quantizes it to {plan[name]} with activation ranges from a calibration set, and "
                "none was given; for a faster encoder record one with nvlm-export calibrate "
                f"BUNDLE --graphs {name} -o CALIB and pass --calib CALIB"
            )
        return chosen
    for name in settings.components:
        if name not in manifest.graphs:  # a typo, not a bundle to re-export
            raise InputError(
                f"--components names {name!r:.40}, which this bundle does not have",
                why=f"its graphs are {', '.join(manifest.graphs)}",
                fix=f"Use --components with some of {', '.join(g for g in manifest.graphs)}",
            )
        if name not in plan:
            raise InputError(
                f"Unsupported precision for a component: {name} cannot be quantized to "
                f"{settings.precision}",
                why=f"a {settings.precision} bundle quantizes {', '.join(plan)}",
                fix=f"Drop {name} from --components",
            )
    return {name: plan[name] for name in dict.fromkeys(settings.components)}


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
        components = plan_components(manifest, settings, calibration is not None, warn)
        calib = _open_calibration(calibration, manifest, bundle, components)
        title = f"Quantizing {bundle} → {out} ({settings.precision})"
        staging = staged.path
        with Stages(title, quiet=quiet) as stages:
            _copy_side_files(bundle, staging, manifest)
            graphs = dict(manifest.graphs)
            quantize_graph = _GraphQuantizer(bundle, staging, manifest, settings, calib)
            for name, precision in components.items():
                with stages.stage(f"{name} graph ({precision})"):
                    graphs[name] = quantize_graph(
                        name, precision, quantize_head=settings.lm_head_quantized
                    )
                stages.note(f"{name}: {_summary(graphs[name])}")
            for name in set(manifest.graphs) - set(components):
                _copy_graph(bundle, staging, manifest.graphs[name].file)
            quantized = replace(manifest, graphs=graphs, precision=settings.precision, engines={})
            with stages.stage("ONNX Runtime variants (fused attention)"):
                quantized = add_onnxruntime_variants(staging, quantized)
            accuracy = None
            if settings.check_accuracy:
                accuracy, quantized = _check_accuracy(
                    stages, quantize_graph, quantized, components, warn
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
    return QuantizeReport(out, quantized, accuracy, list(components), dict(stages.seconds))


# --- steps ------------------------------------------------------------------------------------


def _check_source(manifest: Manifest, bundle: Path) -> None:
    if manifest.precision in QUANTIZED_PRECISIONS:
        raise InputError(
            f"Bundle '{bundle}' is already quantized ({manifest.precision})",
            fix="Quantize the unquantized bundle it came from",
        )


def _open_calibration(
    path: Path | None, manifest: Manifest, bundle: Path, components: Mapping[str, str]
) -> CalibrationSet | None:
    """The calibration set, checked against the bundle; None when no component needs ranges."""
    needs = [name for name, p in components.items() if p in CALIBRATED_PRECISIONS]
    if path is None:
        if not needs:
            return None  # weight-only: no activation ranges needed
        graphs = " and ".join(f"{name} ({components[name]})" for name in needs)
        raise InputError(
            f"Quantizing {graphs} needs a calibration set (activation ranges)",
            fix=f"Run nvlm-export calibrate {bundle} -o CALIB, then pass --calib CALIB",
        )
    calib = CalibrationSet.open(path)
    calib.check_matches(manifest, bundle)
    for name in needs:
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


@dataclass
class _GraphQuantizer:
    """Quantizes one graph of `bundle` at a time into `staging`."""

    bundle: Path
    staging: Path
    manifest: Manifest
    settings: QuantizeSettings
    calib: CalibrationSet | None
    # Activation amax per graph: quantizing a graph again (the LM head's auto choice) does not
    # run the calibration set a second time.
    ranges: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __call__(self, name: str, precision: str, *, quantize_head: bool) -> GraphSpec:
        import onnx

        from nvlm_export.export import qdq

        graph = self.manifest.graphs[name]
        source, target = self.bundle / graph.file, self.staging / graph.file
        # An earlier attempt's files may still be mapped by a session: unlink, never truncate.
        variant = self.staging / variant_file(graph.file)
        for path in (target, target.with_name(target.name + ".data"), variant):
            path.unlink(missing_ok=True)
        model = onnx.load(str(source), load_external_data=False)
        nodes = qdq.quantizable_nodes(model)
        excluded = qdq.select_excluded(nodes, self.settings.exclude)
        head = _lm_head(model, name)
        if head is not None and not quantize_head and head not in excluded:
            excluded.insert(0, head)
        names = [n.name for n in excluded]
        record: dict[str, Any] = {
            "method": METHODS[precision],
            "library": _library(),
            "quantized_ops": list(qdq.QUANTIZABLE_OPS),
            "quantized_nodes": len(nodes) - len(excluded),
            "exclude_patterns": list(self.settings.exclude),
            "excluded_nodes": [n.to_dict() for n in excluded],
        }
        if head is not None:
            record["lm_head"] = head.to_dict() | {
                "quantized": head not in excluded,
                "setting": self.settings.lm_head,
            }
        if precision == "int4":
            count, block = qdq.plan_int4(source, exclude=names)
            external = qdq.graph_bytes(source) > qdq.EXTERNAL_DATA_BYTES
            qdq.quantize_int4_graph(
                source, target, exclude=names, block_size=block, external=external
            )
            record["block_size"] = block
            record["quantized_nodes"] = count
        else:
            assert self.calib is not None
            self.ranges[name] = qdq.quantize_static_graph(
                source,
                target,
                self.calib.samples(name),
                precision=precision,
                exclude=names,
                amax=self.ranges.get(name),
            )
            record["calibration"] = self._calibration_record(name)
        return replace(graph, precision=precision, quantization=record)

    def _calibration_record(self, name: str) -> dict[str, Any]:
        assert self.calib is not None
        return {
            "path": str(self.calib.directory.resolve()),
            "bundle_fingerprint": self.calib.info.bundle_fingerprint,
            "seed": self.calib.info.seed,
            "requests": self.calib.info.requests,
            "samples": self.calib.count(name),
            "source": self.calib.info.source,
        }


def _check_accuracy(
    stages: Stages,
    quantize_graph: _GraphQuantizer,
    quantized: Manifest,
    components: Mapping[str, str],
    warn: Callable[[str], None],
) -> tuple[AccuracyReport, Manifest]:
    """The accuracy report, with the LM head's choice in it, and the manifest it describes.
    `--lm-head auto`: a quantized head outside the budget is replaced by a float one (the
    decoder is quantized again, reusing its activation ranges) and the bundle checked again."""
    q = quantize_graph
    unchanged = set(q.manifest.graphs) - set(components)

    with stages.stage("accuracy on held-out requests"):
        requests = _held_out_requests(q.calib, q.settings, warn)
        reference = run_reference(
            lambda: Pipeline.load(q.bundle), requests, q.settings.accuracy_steps
        )

        def measure(manifest: Manifest) -> AccuracyReport:
            return _accuracy(q.staging, manifest, reference, requests, q.settings, unchanged, warn)

        accuracy = measure(quantized)
    head = _lm_head_choice(q.settings, components, accuracy)
    if head is not None and q.settings.auto_lm_head and not accuracy.passed:
        with stages.stage("decoder graph again, LM head in float (auto)"):
            decoder = q(DECODER_GRAPH, components[DECODER_GRAPH], quantize_head=False)
            quantized = replace(quantized, graphs={**quantized.graphs, DECODER_GRAPH: decoder})
            decoder = with_onnxruntime_variant(q.staging, quantized, DECODER_GRAPH)
        quantized = replace(quantized, graphs={**quantized.graphs, DECODER_GRAPH: decoder})
        with stages.stage("accuracy, LM head in float"):
            accuracy = measure(quantized)
        head = _head_kept_in_float(head, accuracy)
    if head is not None:
        accuracy.lm_head = head.to_dict()
        stages.note(f"LM head: {head.reason}")
    return accuracy, quantized


def _held_out_requests(
    calib: CalibrationSet | None, settings: QuantizeSettings, warn: Callable[[str], None]
) -> list[Request]:
    info = calib.info if calib else CalibrationInfo("", "", 0, 0, 0, "builtin")
    return held_out_requests(info, settings.accuracy_requests, warn)


def _accuracy(
    staging: Path,
    quantized: Manifest,
    reference: ReferenceRun,
    requests: list[Request],
    settings: QuantizeSettings,
    unchanged: set[str],
    warn: Callable[[str], None],
) -> AccuracyReport:
    """The accuracy report of `staging` against the source bundle's answers in `reference`.
    `unchanged` graphs were copied as they are, so they compute exactly what the reference
    does: an unchanged vision graph is not loaded or run a second time. `quantized` is the
    staged bundle's manifest, written only once the accuracy is known."""
    needed = graphs_to_load(quantized.graphs, unchanged)
    return measure_accuracy(
        reference,
        lambda: Pipeline.load(staging, manifest=quantized, graphs=needed),
        requests,
        precision=settings.precision,
        thresholds=settings.budget,
        unchanged=unchanged,
        warn=warn,  # one line when held-out images had to be capped to fit the context
    )


def _figures(report: AccuracyReport) -> dict[str, Any]:
    d = report.decoder
    return {
        "top1_agreement": d.top1_agreement,
        "mean_kl": d.mean_kl,
        "passed": report.passed,
        "failures": list(report.failures),
    }


def _lm_head_choice(
    settings: QuantizeSettings, components: Mapping[str, str], report: AccuracyReport
) -> LmHeadChoice | None:
    """The head's choice after the first accuracy check (None when no graph with a head was
    quantized). Auto keeps a quantized head that is within the budget."""
    if not set(components) & set(LM_HEAD_OUTPUTS):
        return None
    quantized = settings.lm_head_quantized
    label = "quantized" if quantized else "float"
    figures = _figures(report)
    summary = f"top-1 {figures['top1_agreement']:.3f}, mean KL {figures['mean_kl']:.4f}"
    if settings.lm_head != "auto":
        reason = f"{label} (--lm-head {settings.lm_head}; {summary})"
    elif report.passed:
        reason = f"quantized (auto: within the budget with it, {summary})"
    else:
        reason = f"quantized head outside the budget ({summary})"  # replaced by the float run
    return LmHeadChoice(settings.lm_head, quantized, reason, {label: figures})


def _head_kept_in_float(choice: LmHeadChoice, report: AccuracyReport) -> LmHeadChoice:
    """Auto's second run: the head in float, after the quantized head missed the budget."""
    figures = _figures(report)
    tried = choice.measured["quantized"]
    return LmHeadChoice(
        choice.setting,
        False,
        f"float (auto: with the quantized head the bundle was outside the budget, top-1 "
        f"{tried['top1_agreement']:.3f}, mean KL {tried['mean_kl']:.4f}; in float: top-1 "
        f"{figures['top1_agreement']:.3f}, mean KL {figures['mean_kl']:.4f})",
        {**choice.measured, "float": figures},
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
