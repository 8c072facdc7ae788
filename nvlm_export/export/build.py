"""`build`: one command from a checkpoint to a deployable bundle, resumable stage by stage.

    MODEL_DIR ──export──▶ work/export ──calibrate──▶ work/calib ──quantize──▶ OUT ──engines──▶ OUT
    (fp16: export writes OUT directly; engines only with --backend tensorrt and TensorRT present)

The work directory sits beside OUT (`.OUT.build/`) with `state.json`, which records every finished
stage with a fingerprint of its inputs (the checkpoint's files, the images, the settings, the
previous stage's fingerprint). A rerun skips a stage whose fingerprint and output are unchanged,
so an interrupted build resumes where it stopped; changing an input redoes that stage and every
stage after it. Target and precision are checked before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvlm_export.calibration.collect import CalibrationOptions
from nvlm_export.errors import InputError, MissingExtraError, check_choice
from nvlm_export.output import BUNDLE, check_output, output_lock, refuse_unsafe_location
from nvlm_export.runtime.manifest import QUANTIZED_PRECISIONS, Precision

STATE_FILE = "state.json"
BUILD_PRECISIONS = (Precision.FP16, *QUANTIZED_PRECISIONS)
BACKENDS = ("onnxruntime", "tensorrt")

# BuildSettings fields that are not named settings: the stages themselves, and the graphs to
# calibrate, which follow from the precision.
_NOT_SETTINGS = {"quantize", "calibration", "graphs"}

if TYPE_CHECKING:
    from nvlm_export.export.quantize import QuantizeSettings


@dataclass(frozen=True)
class BuildSettings:
    """What `build` makes. The quantize and calibrate stages take their own settings whole:
    `quantize` None builds an fp16 bundle (no calibrate or quantize stage), otherwise its
    precision is the bundle's; the graphs `calibration` records follow from that precision."""

    quantize: QuantizeSettings | None
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    target: str | None = None
    backend: str = "onnxruntime"
    max_tiles: int | None = None
    max_context: int | None = None
    force: bool = False  # start even when the memory plan predicts more than is available
    overwrite: bool = False
    # False: export validation against PyTorch is skipped, with a warning. With the quantized
    # bundle's accuracy check also off, what is left only moves weights, which is how a model too
    # large to run here is built (docs/memory.md).
    validate: bool = True

    def __post_init__(self) -> None:
        check_choice(self.backend, BACKENDS, "backend")

    @classmethod
    def of(cls, precision: str, **values: Any) -> BuildSettings:
        """A `precision` bundle's settings from one flat set of named values, as the CLI has
        them: each goes to the field of that name of the build, its quantize stage or its
        calibration (`force` and `overwrite` to both the build and quantize). An fp16 bundle has
        no quantize stage, so quantize's values go unused."""
        from nvlm_export.export.quantize import QuantizeSettings

        check_choice(precision, BUILD_PRECISIONS, "precision")
        unknown = set(values) - cls.names()
        if unknown:
            raise TypeError(f"BuildSettings has no settings {sorted(unknown)}")
        quantize = None
        if precision != Precision.FP16:
            quantize = QuantizeSettings(precision, **_named(QuantizeSettings, values))
        calibration = CalibrationOptions(**_named(CalibrationOptions, values))
        return cls(quantize, calibration, **_named(cls, values))

    @classmethod
    def names(cls) -> set[str]:
        """The names `of` takes: the build's, quantize's and calibration's own settings."""
        from nvlm_export.export.quantize import QuantizeSettings

        stages = (cls, QuantizeSettings, CalibrationOptions)
        return {f.name for stage in stages for f in fields(stage)} - _NOT_SETTINGS

    @property
    def precision(self) -> str:
        return self.quantize.precision if self.quantize else Precision.FP16

    @property
    def check_accuracy(self) -> bool:
        return self.quantize is not None and self.quantize.check_accuracy


@dataclass
class BuildReport:
    bundle: Path
    work_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    accuracy: dict[str, Any] | None = None
    checkpoint_bytes: int = 0
    bundle_bytes: int = 0
    work_bytes: int = 0  # the intermediate bundles and calibration set kept for resuming

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bundle"], data["work_dir"] = str(self.bundle), str(self.work_dir)
        return data


def _named(cls: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    own = {f.name for f in fields(cls)} - _NOT_SETTINGS - {"precision"}
    return {name: value for name, value in values.items() if name in own}


def work_directory(out: Path) -> Path:
    return out.parent / f".{out.name}.build"


class BuildState:
    """`state.json`: stage name -> {fingerprint, output}; saved after every finished stage."""

    def __init__(self, work: Path) -> None:
        self.path = work / STATE_FILE
        self.stages: dict[str, dict[str, str]] = {}
        if self.path.is_file():
            self.stages = json.loads(self.path.read_text()).get("stages", {})

    def is_done(self, stage: str, fingerprint: str, output: Path) -> bool:
        entry = self.stages.get(stage)
        return bool(entry and entry["fingerprint"] == fingerprint and _is_complete(output))

    def mark_done(self, stage: str, fingerprint: str, output: Path) -> None:
        self.stages[stage] = {"fingerprint": fingerprint, "output": str(output)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stages": self.stages}, indent=2) + "\n")
        os.replace(tmp, self.path)


def build(
    model_dir: Path,
    out: Path,
    settings: BuildSettings,
    *,
    quiet: bool = False,
    warn: Callable[[str], None] = print,
) -> BuildReport:
    """Export, calibrate, quantize and (with TensorRT) build engines; see the module docstring.

    One build per output at a time: the work directory's lock (nvlm_export/output.py) is held
    throughout, so a second build of the same output fails at once."""
    with output_lock(work_directory(out)):
        target = _check_before_work(model_dir, out, settings)
        work = work_directory(out)
        work.mkdir(parents=True, exist_ok=True)
        state = BuildState(work)
        report = BuildReport(out, work, checkpoint_bytes=_tree_bytes(model_dir))
        quantized = settings.precision != "fp16"
        exported = work / "export" if quantized else out
        runner = _StageRunner(state, report, quiet)

        if not settings.validate:
            warn(
                "export not validated (--no-validate): the bundle was not compared with the "
                "PyTorch model; run nvlm-export verify where the model fits before deploying it"
            )
        key = runner.run(
            "export",
            _fingerprint("export", _files_fingerprint(model_dir), _export_options(settings)),
            exported,
            lambda: _export(model_dir, exported, settings, quiet),
        )
        if quantized:
            key = _calibrate_and_quantize(runner, key, exported, work, out, settings, quiet, warn)
            report.accuracy = _read_accuracy(out)
        _engines(runner, key, out, settings, target, report)
        report.bundle_bytes = _tree_bytes(out)
        report.work_bytes = _tree_bytes(work)
        return report


class _StageRunner:
    def __init__(self, state: BuildState, report: BuildReport, quiet: bool) -> None:
        self.state, self.report, self.quiet = state, report, quiet

    def run(self, stage: str, fingerprint: str, output: Path, work: Callable[[], object]) -> str:
        if self.state.is_done(stage, fingerprint, output):
            self.report.skipped.append(stage)
        else:
            work()
            self.state.mark_done(stage, fingerprint, output)
            self.report.ran.append(stage)
        return fingerprint


def _calibrate_and_quantize(
    runner: _StageRunner,
    key: str,
    exported: Path,
    work: Path,
    out: Path,
    settings: BuildSettings,
    quiet: bool,
    warn: Callable[[str], None],
) -> str:
    from nvlm_export.calibration.collect import collect_calibration
    from nvlm_export.export.quantize import calibrated_graphs, quantize_bundle

    assert settings.quantize is not None
    calib = work / "calib"
    graphs = calibrated_graphs(settings.precision)
    options = replace(settings.calibration, graphs=graphs)
    images = _images_fingerprint(options.images) if options.images else "builtin"
    prompts = _file_hash(options.prompts) if options.prompts else "builtin"
    # INT8/FP8 need every graph's ranges. INT4 needs the vision graph's for its INT8 vision, except
    # on the weight-only path, which never runs the model: there the vision graph stays in float,
    # and quantize says so.
    from nvlm_export.export.memory_plan import weight_only

    skip = weight_only(settings.validate, settings.check_accuracy)
    needs_calibration = graphs is None or (bool(graphs) and not skip)
    if needs_calibration:
        key = runner.run(
            "calibrate",
            _fingerprint("calibrate", key, images, prompts, asdict(options) | {"prompts": None}),
            calib,
            lambda: collect_calibration(
                exported, calib, options, overwrite=True, warn=warn, progress=not quiet
            ),
        )
    quantize = replace(settings.quantize, overwrite=True)  # `out` is the build's own output
    return runner.run(
        "quantize",
        _fingerprint("quantize", key, asdict(quantize)),
        out,
        lambda: quantize_bundle(
            exported, out, quantize, calib if needs_calibration else None, quiet=quiet, warn=warn
        ),
    )


def _engines(
    runner: _StageRunner,
    key: str,
    out: Path,
    settings: BuildSettings,
    target: Any,
    report: BuildReport,
) -> None:
    if settings.backend != "tensorrt":
        report.notes.append(
            "stopped after the ONNX bundle (--backend onnxruntime); build engines on the target "
            f"with: nvlm-export engine {out} --target {settings.target or 'TARGET'}"
        )
        return
    from nvlm_export.export.engine_build import installed_tensorrt_version

    version = installed_tensorrt_version()  # present: _check_before_work refused a build without

    def build_engines_now() -> None:
        from nvlm_export.export.engine_build import build_engines
        from nvlm_export.export.engine_plan import PlanOptions, plan_build
        from nvlm_export.runtime.manifest import load_manifest

        manifest = load_manifest(out)
        plan = plan_build(manifest, target, PlanOptions(tensorrt_version=version))
        build_engines(out, manifest, plan, overwrite=True)

    runner.run("engines", _fingerprint("engines", key, version, target.sm), out, build_engines_now)


def _check_before_work(model_dir: Path, out: Path, settings: BuildSettings) -> Any:
    """Target, precision and paths, before any stage runs. Returns the resolved target (or None)."""
    if not Path(model_dir).is_dir():
        raise InputError(f"Checkpoint '{model_dir}' is not a directory", fix="Pass MODEL_DIR")
    refuse_unsafe_location(out, [model_dir])
    target = check_target(out, settings)
    state = BuildState(work_directory(out))
    if not any(Path(e["output"]) == out for e in state.stages.values()):
        check_output(out, BUNDLE, settings.overwrite)
    if not settings.force:
        _check_memory(model_dir, settings)
    return target


def check_target(out: Path, settings: BuildSettings) -> Any:
    """The target the engines are for (None: no engines asked for), refusing a precision it
    cannot run and engines asked for where no TensorRT is installed (also for --dry-run)."""
    from nvlm_export.export.engine_build import installed_tensorrt_version
    from nvlm_export.export.targets import building_here, check_precision, resolve_target

    tensorrt = installed_tensorrt_version()
    if settings.backend == "tensorrt" and tensorrt is None:
        raise MissingExtraError(
            "build --backend tensorrt builds the engines on this machine, which has no TensorRT",
            why="engines are built on the GPU that runs them",
            fix=f"Build the ONNX bundle here (--backend onnxruntime) and run nvlm-export engine "
            f"{out} --target {settings.target or 'TARGET'} on the target, or install the "
            "tensorrt extra there and build there",
        )
    target = None
    name = settings.target or ("auto" if settings.backend == "tensorrt" else None)
    if name is not None:
        target = resolve_target(name)
        if settings.backend == "tensorrt":  # the engines are built here
            target = building_here(target, name, tensorrt)
        check_precision(target, settings.precision)
    return target


def _check_memory(model_dir: Path, settings: BuildSettings) -> None:
    from nvlm_export.export.memory_plan import available_memory, check_fits, plan

    memory = plan(model_dir, settings.max_tiles, settings.max_context, available_memory())
    stages = memory.build_stages(settings.precision, settings.check_accuracy, settings.validate)
    check_fits(memory, stages, "nvlm-export build")


def _export(model_dir: Path, bundle: Path, settings: BuildSettings, quiet: bool) -> None:
    from nvlm_export.export.bundle import ExportSettings, export_bundle

    options = _export_options(settings)
    export_bundle(model_dir, bundle, ExportSettings(**options, overwrite=True), quiet=quiet)


def _export_options(settings: BuildSettings) -> dict[str, Any]:
    # Quantization starts from fp32 graphs (calibration and Q/DQ on full-precision weights).
    dtype = "fp16" if settings.precision == "fp16" else "fp32"
    return {
        "dtype": dtype,
        "max_tiles": settings.max_tiles,
        "max_context": settings.max_context,
        "validate": settings.validate,
    }


def _read_accuracy(bundle: Path) -> dict[str, Any] | None:
    from nvlm_export.export.quantize import ACCURACY_FILE

    path = bundle / ACCURACY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# --- fingerprints -------------------------------------------------------------------------------


def _fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _files_fingerprint(root: Path) -> str:
    """Relative path, size and modification time of every file under `root` (or of `root`)."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    entries = [
        (
            str(p.relative_to(root)) if root.is_dir() else str(p),
            p.stat().st_size,
            p.stat().st_mtime_ns,
        )
        for p in files
        if p.exists()
    ]
    return _fingerprint(entries)


def _images_fingerprint(spec: str) -> str:
    from nvlm_export.calibration.collect import find_images

    files = find_images(spec)
    return _fingerprint([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _is_complete(output: Path) -> bool:
    from nvlm_export.calibration.dataset import CALIBRATION_MANIFEST
    from nvlm_export.runtime.manifest import MANIFEST_NAME

    return (output / MANIFEST_NAME).is_file() or (output / CALIBRATION_MANIFEST).is_file()


def _tree_bytes(root: Path) -> int:
    root = Path(root)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
