"""How much a quantized bundle drifts from its source, measured on held-out requests.

For each request (an image and a prompt that calibration never saw):

- every graph except the decoder (vision, and cross_kv for NVLM-X/H) is fed the *same* inputs in
  both bundles — the reference pipeline's — so each graph's own error is isolated; each output is
  compared with the project's one comparator (`compare.compare`: cosine and relative error);
- the reference decodes greedily for `steps` tokens through the real pipeline stages, keeping its
  logits; the quantized bundle, end to end (its own vision features), is teacher-forced on that
  continuation: next-token top-1 agreement and KL(reference || quantized) per position;
- the quantized bundle also decodes greedily on its own: how many leading tokens are identical.

Each request is tiled once, with the largest tile budget whose prompt and `steps` tokens fit the
bundle's context (a bundle exported with a small max_context cannot hold a 7-tile image); both
bundles decode from that same preparation, and the report records every request's budget.

The two bundles run one after the other, not side by side: the reference answers every request
first and what the comparison needs is kept (its vision features, the feeds and outputs of its
side graphs, its tokens and logits: megabytes), then its graphs are unloaded and the quantized
bundle is loaded. Only one bundle's weights are resident at a time. A graph the quantized bundle
holds unchanged is not loaded for it at all: its outputs are the reference's.
The reference runs once per quantization (`ReferenceRun`): a second candidate, such as
`--lm-head auto`'s float head, is compared with the same kept answers.

Tiny random checkpoints have nearly flat logits, where a small perturbation flips the argmax, so
top-1 agreement is harsh there; KL and cosine are the steadier measures.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from nvlm_export.calibration.collect import Request, capped_message, fit_to_context, tiling_record
from nvlm_export.calibration.dataset import RequestTiling
from nvlm_export.compare import common_prefix, compare
from nvlm_export.defaults import ACCURACY_STEPS
from nvlm_export.errors import InputError
from nvlm_export.runtime.manifest import (
    DECODER_GRAPH,
    INPUTS_EMBEDS,
    LOGITS,
    POSITION_IDS,
    VISION_GRAPH,
)
from nvlm_export.runtime.pipeline import Features, Pipeline, PreparedRequest


@dataclass(frozen=True)
class Thresholds:
    """The accuracy budget: a quantized bundle outside it is refused unless --force."""

    min_cosine: float  # every compared graph output, worst request
    min_top1: float  # next-token agreement, teacher-forced, over all positions
    max_kl: float  # mean KL(reference || quantized) per position, in nats

    def __post_init__(self) -> None:
        # A budget outside the metric's range would run the whole check (twice with --lm-head
        # auto) before failing.
        ranges = {"min_cosine": (-1.0, 1.0), "min_top1": (0.0, 1.0), "max_kl": (0.0, None)}
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if not (low <= value and (high is None or value <= high)):
                span = f"from {low} to {high}" if high is not None else f"of {low} or more"
                raise InputError(
                    f"Accuracy budget {name} {value} is impossible",
                    why=f"{name} is {span}",
                    fix=f"Pass a value {span}, or leave it at the precision's default",
                )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# Defaults per precision, met by the tiny random test checkpoints with a margin, while a broken
# scale (a wrong axis, a missing channel) falls far outside them. INT4 weight-only moves logits
# the most; FP8's 3 mantissa bits sit between INT4 and INT8. See docs/quantization.md.
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "int8": Thresholds(min_cosine=0.98, min_top1=0.60, max_kl=0.15),
    "fp8": Thresholds(min_cosine=0.97, min_top1=0.40, max_kl=0.30),
    "int4": Thresholds(min_cosine=0.97, min_top1=0.30, max_kl=0.60),
}


@dataclass
class OutputAccuracy:
    """One graph output over all requests."""

    graph: str
    output: str
    samples: int = 0
    min_cosine: float = 1.0
    mean_cosine: float = 0.0
    max_rel_error: float = 0.0

    def add(self, expected: np.ndarray, actual: np.ndarray) -> None:
        result = compare(f"{self.graph}.{self.output}", expected, actual, atol=float("inf"))
        self.mean_cosine = (self.mean_cosine * self.samples + result.cosine) / (self.samples + 1)
        self.samples += 1
        self.min_cosine = min(self.min_cosine, result.cosine)
        self.max_rel_error = max(self.max_rel_error, result.max_rel)


@dataclass
class DecoderAccuracy:
    positions: int = 0
    top1_agreement: float = 0.0
    mean_kl: float = 0.0
    max_kl: float = 0.0
    greedy_steps: int = 0
    identical_greedy: list[int] = field(default_factory=list)  # per request

    @property
    def mean_identical(self) -> float:
        return float(np.mean(self.identical_greedy)) if self.identical_greedy else 0.0


@dataclass
class AccuracyReport:
    precision: str
    requests: list[str]
    outputs: list[OutputAccuracy]
    decoder: DecoderAccuracy
    thresholds: Thresholds
    failures: list[str] = field(default_factory=list)
    # The bundle's context and tile budget, and the tile budget each request used to fit it.
    max_context: int = 0
    bundle_max_tiles: int = 0
    tiling: list[RequestTiling] = field(default_factory=list)
    # Graphs the quantized bundle holds unchanged (not quantized): nothing to compare.
    unchanged_graphs: list[str] = field(default_factory=list)
    # How the LM head was chosen (export/quantize.py: LmHeadChoice), with each candidate's figures.
    lm_head: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["decoder"]["mean_identical_greedy"] = self.decoder.mean_identical
        data["passed"] = self.passed
        return data


PipelineSource = Pipeline | Callable[[], Pipeline]


@dataclass
class _ReferenceAnswer:
    """What the reference computed for one request: all the comparison needs once its graphs
    are unloaded."""

    prepared: PreparedRequest
    tiling: RequestTiling
    features: list[Features]
    side_calls: list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]]
    tokens: list[int]
    logits: np.ndarray


@dataclass(frozen=True)
class ReferenceRun:
    """The reference bundle's answers to the held-out requests and what the report needs of it.
    Computed once, it serves every candidate compared with it (`--lm-head auto`'s float head is
    a second candidate), so the reference never runs twice."""

    answers: tuple[_ReferenceAnswer, ...]
    steps: int
    max_context: int
    bundle_max_tiles: int
    graphs: tuple[str, ...]


def run_reference(
    reference: PipelineSource, requests: Sequence[Request], steps: int = ACCURACY_STEPS
) -> ReferenceRun:
    """The reference's answers to `requests`; a pipeline it loaded is unloaded again once they
    are kept, so the candidate's weights are never resident beside it."""
    pipe = reference if isinstance(reference, Pipeline) else reference()
    try:
        return ReferenceRun(
            tuple(_reference_answer(pipe, request, steps) for request in requests),
            steps,
            pipe.manifest.kv_cache.max_context,
            pipe.tiling.max_tiles,
            tuple(pipe.manifest.graphs),
        )
    finally:
        if pipe is not reference:
            _unload(pipe)


def measure_accuracy(
    reference: PipelineSource | ReferenceRun,
    quantized: PipelineSource,
    requests: Sequence[Request],
    *,
    precision: str,
    thresholds: Thresholds,
    steps: int = ACCURACY_STEPS,
    unchanged: Collection[str] = (),
    warn: Callable[[str], None] | None = None,
) -> AccuracyReport:
    """Compare `quantized` with `reference` on `requests`; see the module docstring.

    Each side is a pipeline or a loader of one; a loaded one is unloaded again once its part is
    done, so only one side's weights are resident at a time. `reference` may also be a
    `ReferenceRun` of these requests (its steps are used). `unchanged` names the graphs the
    quantized bundle holds exactly as the reference does: the loader need not load them (the
    reference's outputs stand for theirs). `warn` gets one line when images had to be capped to
    fit the bundle's context."""
    run = (
        reference
        if isinstance(reference, ReferenceRun)
        else run_reference(reference, requests, steps)
    )
    q_pipe = quantized if isinstance(quantized, Pipeline) else quantized()
    try:
        outputs: dict[tuple[str, str], OutputAccuracy] = {}
        decoder = DecoderAccuracy(greedy_steps=run.steps)
        top1_hits, kl_values = 0, []
        for answer in run.answers:
            q_features = _quantized_features(q_pipe, answer, unchanged, outputs)
            _compare_side_calls(q_pipe, answer, unchanged, outputs)
            forced = dict(forced=answer.tokens, features=q_features)
            _, q_logits = decode(q_pipe, answer.prepared, run.steps, **forced)
            top1_hits += int((q_logits.argmax(-1) == answer.logits.argmax(-1)).sum())
            kl_values += list(kl_divergence(answer.logits, q_logits))
            own, _ = decode(q_pipe, answer.prepared, run.steps, features=q_features)
            decoder.identical_greedy.append(common_prefix(answer.tokens, own))
    finally:
        if q_pipe is not quantized:
            _unload(q_pipe)
    decoder.positions = len(kl_values)
    decoder.top1_agreement = top1_hits / max(decoder.positions, 1)
    decoder.mean_kl = float(np.mean(kl_values)) if kl_values else 0.0
    decoder.max_kl = float(np.max(kl_values)) if kl_values else 0.0
    tilings = [answer.tiling for answer in run.answers]
    report = AccuracyReport(
        precision,
        [r.name for r in requests],
        list(outputs.values()),
        decoder,
        thresholds,
        max_context=run.max_context,
        bundle_max_tiles=run.bundle_max_tiles,
        tiling=tilings,
        unchanged_graphs=[n for n in run.graphs if n in unchanged],
    )
    report.failures = check_thresholds(report)
    message = capped_message(tilings, report.max_context, report.bundle_max_tiles)
    if message and warn is not None:
        warn(message)
    return report


def graphs_to_load(graphs: Collection[str], unchanged: Collection[str]) -> list[str]:
    """The quantized bundle's graphs the check runs: all but an unchanged vision graph (the
    reference's features are its outputs; an unchanged side graph still runs inside the
    decoder's input assembly)."""
    return [name for name in graphs if not (name == VISION_GRAPH and name in unchanged)]


def _reference_answer(pipe: Pipeline, request: Request, steps: int) -> _ReferenceAnswer:
    """The reference's greedy decode of one request, with its vision features and the feeds and
    outputs of every side-graph call (cross_kv) on the way."""
    request = fit_to_context(pipe, request, steps)
    prepared = pipe.prepare(request.prompt, [request.image], max_tiles=request.max_tiles)
    features = pipe.encode_images(prepared.tilings)
    side_calls: list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    recording = _recording_side_graphs(pipe, side_calls)
    try:
        tokens, logits = decode(pipe, prepared, steps, features=features)
    finally:
        pipe.runners.update(recording)
    return _ReferenceAnswer(
        prepared, tiling_record(request, prepared), features, side_calls, tokens, logits
    )


def _recording_side_graphs(pipe: Pipeline, calls: list) -> dict[str, Any]:
    """Wrap the runners that run inside `decoder_inputs` (cross_kv-like: neither the vision
    graph nor the decoder) so each call's feeds and outputs are kept; returns the originals."""
    originals = {
        name: runner
        for name, runner in pipe.runners.items()
        if name not in (DECODER_GRAPH, VISION_GRAPH)
    }
    for name, runner in originals.items():
        pipe.runners[name] = _RecordingRunner(name, runner, calls)
    return originals


def _quantized_features(
    pipe: Pipeline, answer: _ReferenceAnswer, unchanged: Collection[str], table: dict
) -> list[Features]:
    """The quantized bundle's vision features for one request. A quantized vision graph's
    outputs are scored per tile against the reference's; an unchanged one computes exactly the
    reference's features, which stand for its own."""
    if VISION_GRAPH in unchanged:
        return answer.features
    ours = pipe.encode_images(answer.prepared.tilings)
    for expected, actual in zip(answer.features, ours, strict=True):
        for output, value in expected.items():
            record = table.setdefault((VISION_GRAPH, output), OutputAccuracy(VISION_GRAPH, output))
            for tile in range(len(value)):  # the budget holds for the worst tile
                record.add(value[tile], actual[output][tile])
    return ours


def _compare_side_calls(
    pipe: Pipeline, answer: _ReferenceAnswer, unchanged: Collection[str], table: dict
) -> None:
    """Each side-graph call of the reference, fed to the quantized graph: outputs scored."""
    for name, feeds, expected in answer.side_calls:
        if name in unchanged:
            continue
        actual = pipe.runners[name].infer(feeds)
        for output, value in expected.items():
            key = (name, output)
            table.setdefault(key, OutputAccuracy(name, output)).add(value, actual[output])


def _unload(pipe: Pipeline) -> None:
    for runner in pipe.runners.values():
        runner.deactivate()


def check_thresholds(report: AccuracyReport) -> list[str]:
    limits, failures = report.thresholds, []
    for out in report.outputs:
        if not out.min_cosine >= limits.min_cosine:
            failures.append(
                f"{out.graph}.{out.output} cosine {out.min_cosine:.4f} < {limits.min_cosine}"
            )
    if not report.decoder.top1_agreement >= limits.min_top1:
        failures.append(f"top-1 agreement {report.decoder.top1_agreement:.3f} < {limits.min_top1}")
    if not report.decoder.mean_kl <= limits.max_kl:
        failures.append(f"mean KL {report.decoder.mean_kl:.4f} > {limits.max_kl}")
    return failures


def decode(
    pipe: Pipeline,
    prepared: PreparedRequest,
    steps: int,
    *,
    forced: Sequence[int] | None = None,
    features: Sequence[Features] | None = None,
) -> tuple[list[int], np.ndarray]:
    """Greedy (or, with `forced`, teacher-forced) decoding of a prepared request (tiles and
    prompt) through the pipeline's own stages: its vision graph (unless its `features` are
    given), splice and decoder.

    Returns the tokens and the logits [n, V] that predicted each of them. Greedy decoding stops at
    an end-of-turn token, like `Pipeline.generate` at temperature 0.
    """
    if features is None:
        features = pipe.encode_images(prepared.tilings)
    inputs = pipe.decoder_inputs(prepared.prompt, features)
    cache = pipe.new_cache()
    decoder = pipe.runners[DECODER_GRAPH].infer
    eos = set(pipe.manifest.tokenizer.eos_token_ids)
    limit = min(
        len(forced) if forced is not None else steps, cache.capacity - prepared.prompt.num_tokens
    )
    logits = [pipe.prefill(inputs, cache)]
    tokens: list[int] = []
    while True:
        token = int(forced[len(tokens)]) if forced is not None else int(np.argmax(logits[-1]))
        tokens.append(token)
        if len(tokens) >= limit or (forced is None and token in eos):
            return tokens, np.stack(logits)
        feeds = {
            INPUTS_EMBEDS: pipe.embed(np.array([[token]], dtype=np.int64)),  # (1, 1, D)
            POSITION_IDS: np.array([[cache.length]], dtype=np.int64),  # (1, 1)
            **inputs.decode_feeds,
        }
        logits.append(cache.step(decoder, feeds)[LOGITS][0])


def kl_divergence(reference: np.ndarray, quantized: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(quantized)) per row, in nats."""
    log_p = _log_softmax(reference.astype(np.float64))
    log_q = _log_softmax(quantized.astype(np.float64))
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


class _RecordingRunner:
    """Runs a reference side graph and keeps each call's feeds and outputs."""

    def __init__(self, name: str, inner: Any, calls: list) -> None:
        self.name, self.inner, self.calls = name, inner, calls
        self.spec = inner.spec

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.inner.infer(feeds)
        self.calls.append((self.name, dict(feeds), dict(outputs)))
        return outputs

    __call__ = infer
