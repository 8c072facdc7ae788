"""Does a bundle compute what the PyTorch model computes? Export validation and `verify`.

Both run the real runtime (`Pipeline` on ONNX Runtime) and the PyTorch reference on the same real
inputs — a tiled image and a chat prompt — one after the other (the runtime's results are kept,
its graphs unloaded, then the reference runs; the bundle's graphs themselves run one at a time),
and compare stage by stage with one comparator:

- tiling: the runtime's pixel tensor against an independent re-statement of the reference
  transform (`verify` only; export validation uses the runtime's tiles on both sides);
- vision: every vision-graph output per image;
- first-step logits after the prefill;
- greedy tokens for N steps (`verify` only): identical, token for token.

Shape mismatches fail whatever the tolerance; values must be within a tolerance that depends on
the bundle's precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from nvlm_export.assets import example_image_path
from nvlm_export.compare import Comparison, common_prefix, compare
from nvlm_export.export.architectures import ArchitectureExport
from nvlm_export.export.reference import TorchReference, reference_pixel_values
from nvlm_export.runtime.images import ImageSource, load_image
from nvlm_export.runtime.manifest import VISION_GRAPH, Manifest, load_manifest
from nvlm_export.runtime.pipeline import Pipeline, PreparedRequest
from nvlm_export.runtime.tiling import TilingConfig

DEFAULT_QUESTION = "Describe the image in detail."

# (absolute, relative to the reference's largest magnitude) tolerance per bundle precision.
TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (1e-2, 2e-2)}


@dataclass
class ValidationReport:
    comparisons: list[Comparison] = field(default_factory=list)
    tokens: dict[str, Any] | None = None  # greedy parity: steps, identical prefix, both sequences

    @property
    def passed(self) -> bool:
        tokens_ok = self.tokens is None or self.tokens["identical"]
        return tokens_ok and all(c.passed for c in self.comparisons)

    def failure_reason(self) -> str:
        bad = [c for c in self.comparisons if not c.passed]
        if bad:
            c = bad[0]
            return c.detail or f"{c.name} differs by {c.max_abs:.3g} (tolerance {c.tolerance:.3g})"
        assert self.tokens is not None
        return f"greedy tokens diverge at step {self.tokens['identical_prefix'] + 1}"

    def summary_lines(self) -> list[str]:
        lines = [
            f"{c.name}: max abs diff {c.max_abs:.3g} (tol {c.tolerance:.3g}), "
            f"cosine {c.cosine:.6f} {'ok' if c.passed else 'FAILED'}"
            for c in self.comparisons
        ]
        if self.tokens is not None:
            t = self.tokens
            lines.append(
                f"greedy tokens: {t['identical_prefix']}/{t['steps']} identical "
                f"{'ok' if t['identical'] else 'FAILED'}"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "tokens": self.tokens,
        }


def tolerance_for(precision: str, reference: np.ndarray) -> float:
    atol, rtol = TOLERANCES.get(precision, TOLERANCES["fp16"])
    return atol + rtol * float(np.abs(reference).max(initial=0.0))


@dataclass
class BundleRun:
    """What the bundle computed for one request: all a comparison needs once its graphs are
    unloaded (a few arrays; no weights)."""

    precision: str
    tiling: TilingConfig
    prepared: PreparedRequest
    features: list[dict[str, np.ndarray]]
    logits: np.ndarray
    eos_token_ids: tuple[int, ...]
    tokens: list[int] | None


def validate_bundle(
    bundle: Path,
    model: nn.Module | Callable[[], nn.Module],
    arch: ArchitectureExport,
    *,
    images: Sequence[ImageSource] | None = None,
    question: str = DEFAULT_QUESTION,
    greedy_steps: int = 0,
    check_tiling: bool = False,
    manifest: Manifest | None = None,
) -> ValidationReport:
    """Compare the bundle at `bundle` with `model` on real inputs (default: the example image).

    The bundle runs first and its graphs are unloaded again; then the model (or `model()`, a
    loader) is asked the same questions. Given a loader, the weights are resident once at a
    time: ONNX Runtime's, then PyTorch's, never both. `manifest`: the bundle's manifest when it
    is not written yet (an export validates before it writes the manifest).
    """
    images = [example_image_path()] if images is None else list(images)
    ours = _run_bundle(bundle, question, images, greedy_steps, manifest)
    if not isinstance(model, nn.Module):
        model = model()
    reference = TorchReference(model, arch)
    prepared = ours.prepared
    report = ValidationReport()
    if check_tiling:
        for index, (source, tiling) in enumerate(zip(images, prepared.tilings, strict=True)):
            expected = reference_pixel_values(load_image(source), ours.tiling)
            report.comparisons.append(
                compare(f"tiling[{index}]", expected, tiling.pixel_values, atol=1e-6)
            )
    for index, (tiling, features) in enumerate(zip(prepared.tilings, ours.features, strict=True)):
        for name, value in reference.vision_outputs(tiling).items():
            tol = tolerance_for(ours.precision, value)
            report.comparisons.append(
                compare(f"vision[{index}].{name}", value, features.get(name, np.empty(0)), atol=tol)
            )
    expected_logits = reference.next_token_logits(prepared.prompt, prepared.tilings)
    report.comparisons.append(
        compare(
            "first-step logits",
            expected_logits,
            ours.logits,
            atol=tolerance_for(ours.precision, expected_logits),
        )
    )
    if ours.tokens is not None:
        theirs = reference.greedy(
            prepared.prompt, prepared.tilings, greedy_steps, ours.eos_token_ids
        )
        report.tokens = _token_parity(ours.tokens, theirs)
    return report


def _run_bundle(
    bundle: Path,
    question: str,
    images: Sequence[ImageSource],
    greedy_steps: int,
    manifest: Manifest | None = None,
) -> BundleRun:
    """Every vision output, the first-step logits and (greedy_steps > 0) the greedy tokens of
    the bundle on ONNX Runtime, one graph resident at a time: the vision graph encodes the
    images and is unloaded, then the decoder's side prefills the prompt in the runtime's chunks.

    Both graphs at once would hold both graphs' weights, and for an fp16 bundle ONNX Runtime's
    CPU kernels hold those as fp32 copies (it folds the fp16->fp32 Casts it inserts around fp16
    MatMuls): twice the bundle; an unchunked prefill would add the whole prompt's attention
    scores on top (docs/memory.md). The greedy tokens (`verify`) come from
    `Pipeline.generate`, which needs every graph: those are loaded together afterwards.
    """
    with _loaded(bundle, manifest, [VISION_GRAPH]) as vision:
        prepared = vision.prepare(question, images)
        features = [dict(f) for f in vision.encode_images(prepared.tilings)]
        tiling, precision = vision.tiling, vision.manifest.precision
        eos_token_ids = tuple(vision.manifest.tokenizer.eos_token_ids)
    language = [name for name in (manifest or load_manifest(bundle)).graphs if name != VISION_GRAPH]
    with _loaded(bundle, manifest, language) as pipeline:
        inputs = pipeline.decoder_inputs(prepared.prompt, features)
        logits = pipeline.prefill(inputs, pipeline.new_cache())
        del inputs
    tokens = None
    if greedy_steps > 0:
        with _loaded(bundle, manifest, None) as pipeline:
            generation = pipeline.generate(question, images, max_new_tokens=greedy_steps)
            tokens = list(generation.run().token_ids)
    return BundleRun(precision, tiling, prepared, features, logits, eos_token_ids, tokens)


@contextmanager
def _loaded(
    bundle: Path, manifest: Manifest | None, graphs: Sequence[str] | None
) -> Iterator[Pipeline]:
    """The bundle with only `graphs` loaded (None: all), their sessions closed on exit."""
    pipeline = Pipeline.load(bundle, manifest=manifest, graphs=graphs)
    try:
        yield pipeline
    finally:
        for runner in pipeline.runners.values():
            runner.deactivate()


def _token_parity(ours: list[int], theirs: list[int]) -> dict[str, Any]:
    prefix = common_prefix(ours, theirs)
    return {
        "steps": len(theirs),
        "identical_prefix": prefix,
        "identical": ours == theirs,
        "bundle_tokens": ours,
        "reference_tokens": theirs,
    }
