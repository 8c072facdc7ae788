"""Does a bundle compute what the PyTorch model computes? Export validation and `verify`.

Both run the real runtime (`Pipeline` on ONNX Runtime) and the PyTorch reference on the same real
inputs — a tiled image and a chat prompt — and compare stage by stage with one comparator:

- tiling: the runtime's pixel tensor against an independent re-statement of the reference
  transform (`verify` only; export validation uses the runtime's tiles on both sides);
- vision: every vision-graph output per image;
- first-step logits after the prefill;
- greedy tokens for N steps (`verify` only): identical, token for token.

Shape mismatches fail whatever the tolerance; values must be within a tolerance that depends on
the bundle's precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from nvlm_export.assets import example_image_path
from nvlm_export.compare import Comparison, common_prefix, compare
from nvlm_export.export.architectures import ArchitectureExport
from nvlm_export.export.reference import TorchReference, reference_pixel_values
from nvlm_export.runtime.generation import KVCache, prefill
from nvlm_export.runtime.images import ImageSource, load_image
from nvlm_export.runtime.manifest import DECODER_GRAPH
from nvlm_export.runtime.pipeline import Pipeline

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


def tolerance_for(pipeline: Pipeline, reference: np.ndarray) -> float:
    atol, rtol = TOLERANCES.get(pipeline.manifest.precision, TOLERANCES["fp16"])
    return atol + rtol * float(np.abs(reference).max(initial=0.0))


def validate_bundle(
    bundle: Path,
    model: nn.Module,
    arch: ArchitectureExport,
    *,
    images: Sequence[ImageSource] | None = None,
    question: str = DEFAULT_QUESTION,
    greedy_steps: int = 0,
    check_tiling: bool = False,
) -> ValidationReport:
    """Compare the bundle at `bundle` with `model` on real inputs (default: the example image)."""
    pipeline = Pipeline.load(bundle)
    reference = TorchReference(model, arch)
    images = [example_image_path()] if images is None else list(images)
    prepared = pipeline.prepare(question, images)
    report = ValidationReport()
    if check_tiling:
        for index, (source, tiling) in enumerate(zip(images, prepared.tilings, strict=True)):
            expected = reference_pixel_values(load_image(source), pipeline.tiling)
            report.comparisons.append(
                compare(f"tiling[{index}]", expected, tiling.pixel_values, atol=1e-6)
            )

    features = pipeline.encode_images(prepared.tilings)
    for index, (tiling, ours) in enumerate(zip(prepared.tilings, features, strict=True)):
        expected = reference.vision_outputs(tiling)
        for name, value in expected.items():
            tol = tolerance_for(pipeline, value)
            report.comparisons.append(
                compare(f"vision[{index}].{name}", value, ours.get(name, np.empty(0)), atol=tol)
            )

    inputs = pipeline.decoder_inputs(prepared.prompt, features)
    cache = KVCache.from_spec(pipeline.manifest.kv_cache)
    decoder = pipeline.runners[DECODER_GRAPH].infer
    logits = prefill(decoder, inputs.inputs_embeds, cache, extra_feeds=inputs.prefill_feeds)
    expected_logits = reference.next_token_logits(prepared.prompt, prepared.tilings)
    report.comparisons.append(
        compare(
            "first-step logits",
            expected_logits,
            logits,
            atol=tolerance_for(pipeline, expected_logits),
        )
    )
    if greedy_steps > 0:
        report.tokens = _greedy_parity(
            pipeline, reference, prepared, question, images, greedy_steps
        )
    return report


def _greedy_parity(
    pipeline: Pipeline,
    reference: TorchReference,
    prepared: Any,
    question: str,
    images: Sequence[ImageSource],
    steps: int,
) -> dict[str, Any]:
    eos = pipeline.manifest.tokenizer.eos_token_ids
    ours = list(pipeline.generate(question, images, max_new_tokens=steps).run().token_ids)
    theirs = reference.greedy(prepared.prompt, prepared.tilings, steps, eos)
    prefix = common_prefix(ours, theirs)
    return {
        "steps": len(theirs),
        "identical_prefix": prefix,
        "identical": ours == theirs,
        "bundle_tokens": ours,
        "reference_tokens": theirs,
    }
