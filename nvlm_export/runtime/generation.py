"""KV-cached generation on token ids: one decoder step per new token.

The pieces, wired by the pipeline in a few lines:

    cache = KVCache.from_spec(manifest.kv_cache)
    check_prompt_fits(len(prompt_ids), cache.capacity)
    first_logits = prefill(decoder.infer, prompt_embeds, cache, extra_feeds=cross)
    stream = generate(decoder.infer, first_logits, cache=cache, embed=table_lookup,
                      tokenizer=tokenizer, options=options, eos_token_ids=eos_ids,
                      prompt_ids=prompt_ids, extra_feeds=cross)
    for event in stream: print(event.text, end="")
    result = stream.result

`decoder` is any callable from feeds to outputs (a `GraphRunner.infer`), following the decoder
graph contract whose names `runtime/manifest.py` declares (INPUTS_EMBEDS, POSITION_IDS, LOGITS and
the KV cache's PAST_* / PRESENT_* patterns). The cache makes each decoder call (`step`): a
`KVCache` feeds its arrays and keeps the presents the graph returns; an `InPlaceKVCache` feeds
buffers of the whole context that a `kv_in_place` graph variant writes its new positions into.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Literal, Protocol

import numpy as np
from tokenizers import Tokenizer

from nvlm_export.defaults import MAX_NEW_TOKENS
from nvlm_export.errors import BundleError, InputError, PromptError
from nvlm_export.runtime.manifest import (
    INPUTS_EMBEDS,
    LOGITS,
    POSITION_IDS,
    KVCacheSpec,
    layer_tensor,
)
from nvlm_export.runtime.sampling import check_sampling_options, check_seed, sample_next_token
from nvlm_export.runtime.streaming import TextStream

FinishReason = Literal["eos", "stop", "length"]
# Token ids [B, S] int64 -> embeddings [B, S, D]; a memory-mapped table's `__getitem__` qualifies.
EmbedTokens = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class GenerateOptions:
    """How to pick new tokens and when to stop: the options of every generate call (Python API,
    conversations, the vLLM engine, the CLI and the C API). Validated on creation and on
    `replace`.

    Greedy by default; `temperature` > 0 samples (with `top_k` / `top_p`, reproducibly for a
    `seed`). Generation stops at the bundle's end-of-turn tokens (unless `ignore_eos`: benchmarks
    need a fixed length), at a `stop` string, or after `max_new_tokens`.
    """

    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise InputError(f"max_new_tokens {self.max_new_tokens!r} is not an integer")
        if self.max_new_tokens < 1:
            raise InputError(
                f"max_new_tokens {self.max_new_tokens} is invalid",
                why="at least one token must be generated",
                fix="Use a value >= 1",
            )
        check_sampling_options(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        check_seed(self.seed)
        if any(not s for s in self.stop):
            raise InputError("A stop string is empty", fix="Remove the empty stop string")

    @classmethod
    def merged(
        cls, options: GenerateOptions | None, overrides: Mapping[str, object]
    ) -> GenerateOptions:
        """`options` (default: the defaults) with some fields given as keyword arguments: how
        every generate call's keyword arguments become options."""
        if not overrides:
            return options or cls()
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            known = ", ".join(f.name for f in fields(cls))
            raise TypeError(f"Unknown generate option(s) {', '.join(unknown)}; options: {known}")
        return replace(options or cls(), **overrides)

    def replace(self, **changes: object) -> GenerateOptions:
        """A validated copy with `changes`."""
        return replace(self, **changes)

    def end_tokens(self, eos_token_ids: Sequence[int]) -> frozenset[int]:
        """The token ids that end an answer, given the bundle's end-of-turn tokens."""
        return frozenset() if self.ignore_eos else frozenset(int(t) for t in eos_token_ids)

    def make_rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


class DecoderStep(Protocol):
    """One decoder call (`GraphRunner.infer`); `outputs_into` only for an `InPlaceKVCache`."""

    def __call__(
        self,
        feeds: Mapping[str, np.ndarray],
        *,
        outputs_into: Mapping[str, np.ndarray] | None = None,
    ) -> Mapping[str, np.ndarray]: ...


class KVCacheLike(Protocol):
    """What generation needs from a cache: its length and capacity, and one decoder call on the
    step's other feeds (`step`) after which the cache holds the step's positions too."""

    @property
    def length(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    def step(
        self, decoder: DecoderStep, feeds: Mapping[str, np.ndarray]
    ) -> Mapping[str, np.ndarray]: ...


class KVCacheNames(Protocol):
    """Input/output name templates with a `{layer}` field (the manifest's KVCacheSpec has them)."""

    @property
    def past_key(self) -> str: ...
    @property
    def past_value(self) -> str: ...
    @property
    def present_key(self) -> str: ...
    @property
    def present_value(self) -> str: ...


# The decoder contract's names, from the manifest's defaults.
DEFAULT_NAMES: KVCacheNames = KVCacheSpec(num_layers=0, num_kv_heads=0, head_dim=0, max_context=0)


class KVCache:
    """Per-layer key and value arrays [B, kv_heads, length, head_dim], replaced by each step's
    `present.*` outputs (the decoder graph concatenates past and new internally)."""

    def __init__(
        self,
        keys: list[np.ndarray],
        values: list[np.ndarray],
        capacity: int,
        *,
        names: KVCacheNames = DEFAULT_NAMES,
    ) -> None:
        self.keys = keys
        self.values = values
        self.capacity = capacity
        layers = range(len(keys))
        self._past = [
            (layer_tensor(names.past_key, i), layer_tensor(names.past_value, i)) for i in layers
        ]
        self._present = [
            (layer_tensor(names.present_key, i), layer_tensor(names.present_value, i))
            for i in layers
        ]

    @classmethod
    def from_spec(cls, spec: KVCacheSpec, *, batch: int = 1) -> KVCache:
        """An empty cache laid out as the bundle manifest declares; capacity = max_context."""
        return cls.empty(
            spec.num_layers,
            spec.num_kv_heads,
            spec.head_dim,
            capacity=spec.max_context,
            batch=batch,
            dtype=np.dtype(spec.dtype),
            names=spec,
        )

    @classmethod
    def empty(
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        capacity: int,
        batch: int = 1,
        dtype: np.dtype | type = np.float32,
        names: KVCacheNames = DEFAULT_NAMES,
    ) -> KVCache:
        def zero() -> np.ndarray:  # (B, kv_heads, 0, head_dim)
            return np.zeros((batch, num_kv_heads, 0, head_dim), dtype=dtype)

        keys = [zero() for _ in range(num_layers)]
        values = [zero() for _ in range(num_layers)]
        return cls(keys, values, capacity, names=names)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def remaining(self) -> int:
        return self.capacity - self.length

    def feeds(self) -> dict[str, np.ndarray]:
        feeds = {}
        for (key_name, value_name), key, value in zip(
            self._past, self.keys, self.values, strict=True
        ):
            feeds[key_name] = key
            feeds[value_name] = value
        return feeds

    def step(
        self, decoder: DecoderStep, feeds: Mapping[str, np.ndarray]
    ) -> Mapping[str, np.ndarray]:
        outputs = decoder({**feeds, **self.feeds()})
        self.update(outputs)
        return outputs

    def update(self, outputs: Mapping[str, np.ndarray]) -> None:
        """Take the step's presents; they must extend the cache without passing its capacity."""
        new_length = outputs[self._present[0][0]].shape[2] if self._present else 0
        if new_length <= self.length:
            raise BundleError(
                f"The decoder returned a key/value cache of length {new_length}",
                why=f"it must be longer than the {self.length} positions fed to it",
                fix="The decoder graph breaks the bundle contract; re-export the bundle",
            )
        if new_length > self.capacity:
            raise PromptError(
                f"The sequence grew to {new_length} tokens",
                why=f"the model's context holds {self.capacity} tokens",
                fix="Shorten the prompt or lower max_new_tokens",
            )
        self.keys = [outputs[key_name] for key_name, _ in self._present]
        self.values = [outputs[value_name] for _, value_name in self._present]


class InPlaceKVCache:
    """Per-layer key and value buffers [1, kv_heads, capacity, head_dim] fed whole to a decoder
    graph variant with `kv_in_place`, which writes each step's new positions into them (its
    presents are bound to the same memory): no step copies the cache, which a `KVCache` step
    does (concatenation into new presents). The graph reads the cache length from
    `position_ids`; positions from `length` on hold no data and are never read.

    The buffers are `np.empty`: where they are large enough to be mapped on their own (glibc:
    32 MB at most), the OS backs their pages as positions are first written, so an unused
    capacity costs address space, not memory. `keys` / `values` are views of the filled
    positions, valid for good (later steps write only past them), which pin the whole buffers.
    """

    def __init__(self, spec: KVCacheSpec) -> None:
        layers = range(spec.num_layers)
        self._keys, self._values = _cache_buffers(spec), _cache_buffers(spec)
        self._feeds, self._outputs_into = {}, {}
        for layer, key, value in zip(layers, self._keys, self._values, strict=True):
            self._feeds[layer_tensor(spec.past_key, layer)] = key
            self._feeds[layer_tensor(spec.past_value, layer)] = value
            self._outputs_into[layer_tensor(spec.present_key, layer)] = key
            self._outputs_into[layer_tensor(spec.present_value, layer)] = value
        self.capacity = spec.max_context
        self.length = 0

    @classmethod
    def holding(
        cls, spec: KVCacheSpec, keys: Sequence[np.ndarray], values: Sequence[np.ndarray]
    ) -> InPlaceKVCache:
        """A cache whose first positions are a copy of `keys` / `values` [1, kv, L, head_dim]."""
        cache = cls(spec)
        length = keys[0].shape[2] if keys else 0
        check_prompt_fits(length, cache.capacity)
        for buffer, kept in zip((*cache._keys, *cache._values), (*keys, *values), strict=True):
            buffer[:, :, :length] = kept
        cache.length = length
        return cache

    @property
    def keys(self) -> list[np.ndarray]:
        return [buffer[:, :, : self.length] for buffer in self._keys]

    @property
    def values(self) -> list[np.ndarray]:
        return [buffer[:, :, : self.length] for buffer in self._values]

    def fed_by_copies(self, decoder: DecoderStep) -> DecoderStep:
        """`decoder` as a step of this cache when it cannot write in place (a graph that returns
        concat(past, new): the standard graph, OpenVINO's prompt calls): it is fed copies of the
        filled positions, and its presents' new positions are copied into the buffers. Costs a
        copy of the cache per call, which prompt chunks afford and decode steps would not."""

        def step(
            feeds: Mapping[str, np.ndarray],
            *,
            outputs_into: Mapping[str, np.ndarray] | None = None,
        ) -> Mapping[str, np.ndarray]:
            start, end = self.length, self.length + feeds[INPUTS_EMBEDS].shape[1]
            filled = {
                name: np.ascontiguousarray(b[:, :, :start]) for name, b in self._feeds.items()
            }
            outputs = decoder({**feeds, **filled})
            for name, buffer in self._outputs_into.items():
                present = outputs[name]
                if present.shape[2] != end:
                    raise BundleError(
                        f"The decoder returned '{name}' of length {present.shape[2]}",
                        why=f"{start} positions and {end - start} new ones were fed to it",
                        fix="The decoder graph breaks the bundle contract; re-export the bundle",
                    )
                buffer[:, :, start:end] = present[:, :, start:]
            return outputs

        return step

    def step(
        self, decoder: DecoderStep, feeds: Mapping[str, np.ndarray]
    ) -> Mapping[str, np.ndarray]:
        new_length = self.length + feeds[INPUTS_EMBEDS].shape[1]
        if new_length > self.capacity:  # before the call: the graph would write past the end
            raise PromptError(
                f"The sequence grew to {new_length} tokens",
                why=f"the model's context holds {self.capacity} tokens",
                fix="Shorten the prompt or lower max_new_tokens",
            )
        outputs = decoder({**feeds, **self._feeds}, outputs_into=self._outputs_into)
        self.length = new_length
        return outputs


def _cache_buffers(spec: KVCacheSpec) -> list[np.ndarray]:
    """One uninitialised [1, kv_heads, max_context, head_dim] buffer per layer."""
    shape, dtype = (1, spec.num_kv_heads, spec.max_context, spec.head_dim), np.dtype(spec.dtype)
    try:
        return [np.empty(shape, dtype) for _ in range(spec.num_layers)]
    except MemoryError:
        size = spec.num_layers * math.prod(shape) * dtype.itemsize * 2 / 2**30
        raise BundleError(
            f"The KV cache of the bundle's {spec.max_context}-token context cannot be allocated",
            why=f"its keys and values take {size:.1f} GiB of address space",
            fix="Re-export the bundle with a smaller --max-context",
        ) from None


def check_prompt_fits(prompt_length: int, capacity: int) -> None:
    """A prompt must leave room for at least one new token. Call before any vision/prefill work."""
    if prompt_length >= capacity:
        raise PromptError(
            f"The prompt is {prompt_length} tokens long",
            why=f"the model's context holds {capacity} tokens, including the answer",
            fix="Use fewer or smaller images (fewer tiles) or a shorter question",
        )


def prefill(
    decoder: DecoderStep,
    inputs_embeds: np.ndarray,
    cache: KVCacheLike,
    *,
    extra_feeds: Mapping[str, np.ndarray] | None = None,
    chunk_tokens: int | None = None,
) -> np.ndarray:
    """Run the prompt embeddings [1, T, D] through the decoder; fills `cache`, returns logits [V].

    Positions continue from the cache's length, so a prompt may be prefilled in chunks:
    `chunk_tokens` splits it into decoder calls of at most that many tokens, which bounds the
    activation memory (attention scores grow with chunk x context, not context squared) at the
    cost of reading the weights once per chunk. `extra_feeds` are given to every chunk unchanged,
    so they must not have a per-token axis when chunking.
    """
    seq = inputs_embeds.shape[1]
    check_prompt_fits(cache.length + seq, cache.capacity)
    if chunk_tokens is not None and seq > chunk_tokens:
        for start in range(0, seq, chunk_tokens):
            chunk = inputs_embeds[:, start : start + chunk_tokens]  # (1, <=chunk, D)
            logits = prefill(decoder, chunk, cache, extra_feeds=extra_feeds)
        return logits
    positions = np.arange(cache.length, cache.length + seq, dtype=np.int64)[None, :]  # (1, T)
    feeds = {INPUTS_EMBEDS: inputs_embeds, POSITION_IDS: positions, **(extra_feeds or {})}
    return cache.step(decoder, feeds)[LOGITS][0]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it made ready (may be "" while text is held back)."""

    token_id: int
    text: str


@dataclass
class GenerationTimings:
    """Seconds. `time_to_first_token` counts from `start_time` given to `generate` (default: the
    call itself, i.e. prefill excluded); `decode_seconds` has one entry per decoder step."""

    time_to_first_token: float = 0.0
    decode_seconds: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        total = sum(self.decode_seconds)
        return len(self.decode_seconds) / total if total > 0 else 0.0


@dataclass(frozen=True)
class GenerationResult:
    """The full answer. `token_ids` includes the final eos or stop-completing token, if any;
    `text` never contains an eos token's text or a stop string."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    timings: GenerationTimings


def generate(
    decoder: DecoderStep,
    first_logits: np.ndarray,
    *,
    cache: KVCacheLike,
    embed: EmbedTokens,
    tokenizer: Tokenizer,
    options: GenerateOptions,
    eos_token_ids: Sequence[int] = (),
    prompt_ids: Sequence[int] = (),
    extra_feeds: Mapping[str, np.ndarray] | None = None,
    start_time: float | None = None,
) -> GenerationStream:
    """Generate after a prefill: `first_logits` [V] are the prompt's last-position logits and
    `cache` holds the prompt. Each further token costs exactly one one-token decoder step.

    Stops at one of `eos_token_ids` (unless `options.ignore_eos`), a stop string,
    `max_new_tokens`, or when prompt + answer would fill the cache's capacity (the last two give
    finish_reason "length"). `extra_feeds` (NVLM-X/H cross-attention inputs) are passed
    unchanged to every step.
    """
    check_prompt_fits(cache.length, cache.capacity)
    answer = Answer(
        TextStream(tokenizer, stop=options.stop, prompt_ids=prompt_ids),
        options.end_tokens(eos_token_ids),
        # Prompt + answer never exceed the capacity, as with transformers' max_length.
        budget=min(options.max_new_tokens, cache.capacity - cache.length),
    )
    return GenerationStream(
        _DecodeStep(decoder, cache, embed, extra_feeds or {}),
        first_logits,
        answer,
        options,
        start_time if start_time is not None else time.perf_counter(),
    )


class Answer:
    """An answer as its tokens arrive: text pieces, ids, timings and why it ends. Every token
    source (our decoder steps, a serving engine's outputs) goes through it, so end-of-turn
    tokens, stop strings and the token budget end answers the same way everywhere."""

    def __init__(self, text: TextStream, eos: frozenset[int], budget: int) -> None:
        self._text = text
        self._eos = eos
        self._budget = budget
        self.token_ids: list[int] = []
        self.pieces: list[str] = []
        self.timings = GenerationTimings()
        self.finish: FinishReason | None = None  # set by the token that ends the answer

    def add(self, token: int, *, last: bool = False) -> str:
        """Take the next token (`last`: the source has no more); returns the text it releases."""
        self.token_ids.append(token)
        piece, self.finish = self._text_and_finish(
            token, last or len(self.token_ids) >= self._budget
        )
        self.pieces.append(piece)
        return piece

    def _text_and_finish(self, token: int, budget_spent: bool) -> tuple[str, FinishReason | None]:
        if token in self._eos:
            return self._text.flush(), "eos"
        text = self._text.add(token)
        if self._text.stopped:
            return text, "stop"
        if budget_spent:
            return text + self._text.flush(), "length"
        return text, None

    def result(self) -> GenerationResult:
        """The answer so far; one cut off before an ending token counts as "length"."""
        return GenerationResult(
            "".join(self.pieces), tuple(self.token_ids), self.finish or "length", self.timings
        )


class TokenStream:
    """Iterate for `TokenEvent`s; `result` is set when the last event is yielded.

    The joined event texts equal `result.text`. Stopping the iteration early leaves `result` None.
    """

    result: GenerationResult | None = None

    def __iter__(self) -> Iterator[TokenEvent]:
        raise NotImplementedError

    def run(self) -> GenerationResult:
        """Consume every event and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result


@dataclass(eq=False)
class GenerationStream(TokenStream):
    """The decoder's tokens, sampled one step at a time from a prefilled cache."""

    _step: _DecodeStep
    _first_logits: np.ndarray
    _answer: Answer
    _options: GenerateOptions
    _start_time: float
    _started: bool = field(default=False, init=False)
    result: GenerationResult | None = field(default=None, init=False)

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._started:
            raise RuntimeError("a GenerationStream can be iterated only once (it owns the cache)")
        self._started = True
        options, rng, answer = self._options, self._options.make_rng(), self._answer

        def pick(logits: np.ndarray) -> int:
            return sample_next_token(
                logits,
                temperature=options.temperature,
                top_k=options.top_k,
                top_p=options.top_p,
                rng=rng,
            )

        token = pick(self._first_logits)
        answer.timings.time_to_first_token = time.perf_counter() - self._start_time
        while True:
            piece = answer.add(token)
            if answer.finish is not None:  # the result is ready before the last event is seen
                self.result = answer.result()
                yield TokenEvent(token, piece)
                return
            yield TokenEvent(token, piece)
            start = time.perf_counter()
            token = pick(self._step(token))
            answer.timings.decode_seconds.append(time.perf_counter() - start)


class _DecodeStep:
    """Feeds one token at the next position through the decoder; returns its logits [V]."""

    def __init__(
        self,
        decoder: DecoderStep,
        cache: KVCacheLike,
        embed: EmbedTokens,
        extra_feeds: Mapping[str, np.ndarray],
    ) -> None:
        self.decoder = decoder
        self.cache = cache
        self.embed = embed
        self.extra_feeds = extra_feeds

    def __call__(self, token: int) -> np.ndarray:
        token_ids = np.array([[token]], dtype=np.int64)  # (1, 1)
        position_ids = np.array([[self.cache.length]], dtype=np.int64)  # (1, 1)
        feeds = {
            INPUTS_EMBEDS: self.embed(token_ids),  # (1, 1, D)
            POSITION_IDS: position_ids,
            **self.extra_feeds,
        }
        return self.cache.step(self.decoder, feeds)[LOGITS][0]
