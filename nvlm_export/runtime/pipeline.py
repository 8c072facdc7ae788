"""The pipeline: images and a question in, streamed answer tokens out.

    pipe = Pipeline.load("bundle/")
    for event in pipe.generate("What is in the picture?", images=["cat.jpg"]):
        print(event.text, end="", flush=True)

One request goes through these stages, each timed:

1. tiling      — every image is decoded and tiled (DHR) with the bundle's tiling parameters;
2. prompt      — the prompt is assembled and tokenized; a prompt that does not fit the context is
                 refused here, before any model runs;
3. vision      — the vision graph encodes each image's tiles;
4. splice      — token embeddings are looked up in the memory-mapped table and image features
                 overwrite the placeholder positions; for cross-attention models (NVLM-X/H) the
                 cross key/value sequence is assembled the same way and the `cross_kv` graph turns
                 it into every block's keys and values, once per request;
5. prefill     — the decoder runs once over the whole prompt and fills the KV cache;
6. decode      — one decoder step per new token.

Work already done is reused (docs/conversations.md): each image's vision outputs are kept in a
byte-budgeted `FeatureCache` keyed by its pixels and tiling, and each prompt's prefilled keys/values
in a `PrefixCache`, so a request sharing a prefix with an earlier one (same system prompt and image,
another question; or the next turn of a `Conversation`) prefills only what follows the prefix.

Architecture differences are data: which vision outputs exist (`image_features` for the decoder
sequence, `cross_features` for cross-attention) and whether the bundle has a `cross_kv` graph. The
prompt format from the manifest places the images; nothing here asks for the architecture's name.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from nvlm_export.defaults import PREFILL_CHUNK_TOKENS
from nvlm_export.errors import BundleError, InputError, PromptError
from nvlm_export.runtime.backends import (
    DEFAULT_BACKEND,
    PREFILL,
    BackendChoice,
    GraphRunner,
    GraphSpec,
    accepted_options,
    get_backend,
)
from nvlm_export.runtime.caches import (
    DEFAULT_FEATURE_CACHE_BYTES,
    DEFAULT_PREFIX_CACHE_BYTES,
    CrossState,
    FeatureCache,
    Features,
    ImageKey,
    KVState,
    PrefixCache,
    image_key,
)
from nvlm_export.runtime.conversation import Conversation
from nvlm_export.runtime.generation import (
    GenerateOptions,
    GenerationResult,
    GenerationStream,
    InPlaceKVCache,
    KVCache,
    KVCacheLike,
    TokenEvent,
    TokenStream,
    check_prompt_fits,
    generate,
    prefill,
)
from nvlm_export.runtime.images import ImageSource, load_image
from nvlm_export.runtime.limits import DEFAULT_MAX_IMAGE_BYTES
from nvlm_export.runtime.manifest import (
    CROSS_ATTENTION_MASK,
    CROSS_EMBEDS,
    CROSS_FEATURES,
    CROSS_KV_GRAPH,
    DECODER_GRAPH,
    IMAGE_FEATURES,
    INPUTS_EMBEDS,
    PIXEL_VALUES,
    VISION_GRAPH,
    Manifest,
    load_manifest,
)
from nvlm_export.runtime.manifest import GraphSpec as ManifestGraph
from nvlm_export.runtime.prompt import (
    Message,
    PromptTokens,
    Slot,
    build_chat_prompt,
    build_prompt,
    count_prompt_tokens,
)
from nvlm_export.runtime.tiling import Tiling, choose_grid, tile_count, tile_image

# Activation memory bounds: one tile per vision call, prompts prefilled in chunks (512 tokens).
# Neither changes results; both keep peak memory near the weights' size. Measured against 4 tiles
# per call and 1024-token chunks (the fused decoder too), neither was reliably faster and both
# hold several times the activation memory (docs/performance.md).
DEFAULT_VISION_TILES_PER_CALL = 1
DEFAULT_PREFILL_CHUNK_TOKENS = PREFILL_CHUNK_TOKENS


@dataclass(frozen=True, eq=False)
class PreparedRequest:
    """A request after tiling and prompt assembly: everything known before a model runs."""

    tilings: tuple[Tiling, ...]
    prompt: PromptTokens
    image_keys: tuple[ImageKey, ...] = ()  # one per image: its features' cache key


@dataclass(frozen=True)
class TileCount:
    """How many tiles an image gets, without its pixels: all that prompt assembly needs."""

    num_tiles: int
    has_thumbnail: bool


@dataclass(frozen=True, eq=False)
class DecoderInputs:
    """What the decoder needs for one request: the prompt's embeddings and the extra feeds of
    the prefill and of each decode step (cross-attention keys/values and mask rows; none for
    NVLM-D)."""

    inputs_embeds: np.ndarray  # [1, T, D]
    prefill_feeds: dict[str, np.ndarray] = field(default_factory=dict)
    decode_feeds: dict[str, np.ndarray] = field(default_factory=dict)
    cross_key_values: Mapping[str, np.ndarray] | None = None  # NVLM-X/H: every block's K/V


class RequestStream(TokenStream):
    """Iterate for `TokenEvent`s as they are generated; afterwards `result` holds the answer and
    `stage_seconds` the time of every stage (tiling, prompt, vision, splice, prefill, decode)."""

    def __init__(
        self,
        stream: GenerationStream,
        prepared: PreparedRequest,
        stage_seconds: dict[str, float],
        *,
        reused_tokens: int = 0,
        cache_stats: dict[str, dict[str, int]] | None = None,
        on_finish: Callable[[GenerationResult], None] | None = None,
    ) -> None:
        self._stream = stream
        self.prepared = prepared
        self.stage_seconds = stage_seconds
        self.reused_tokens = reused_tokens  # prompt tokens whose keys/values were reused
        self.cache_stats = cache_stats or {}  # this request's feature/prefix cache hits and misses
        self._on_finish = on_finish

    def __iter__(self) -> Iterator[TokenEvent]:
        start = time.perf_counter()
        yield from self._stream
        self.stage_seconds["decode"] = time.perf_counter() - start
        if self._on_finish is not None and self.result is not None:
            self._on_finish(self.result)

    @property  # type: ignore[override]
    def result(self) -> GenerationResult | None:
        return self._stream.result


class Pipeline:
    """A loaded bundle: its graphs, tokenizer and embedding table, ready for requests."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        runners: dict[str, GraphRunner],
        tokenizer: Tokenizer,
        embedding: np.ndarray,
        *,
        vision_tiles_per_call: int | None = DEFAULT_VISION_TILES_PER_CALL,
        prefill_chunk_tokens: int | None = DEFAULT_PREFILL_CHUNK_TOKENS,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        feature_cache_bytes: int = DEFAULT_FEATURE_CACHE_BYTES,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.runners = runners
        self.tokenizer = tokenizer
        self.embedding = embedding  # [vocab, D], memory-mapped
        self.tiling = manifest.tiling
        self.prompt_format = manifest.prompt
        # Tokens the decoder holds, prompt + answer: the bundle's cache, or a serving engine's
        # context where one runs the decoder (VLLMPipeline sets it).
        self.context_tokens = manifest.kv_cache.max_context
        self._embeds_dtype = np.dtype(manifest.graph(DECODER_GRAPH).input(INPUTS_EMBEDS).dtype)
        self.vision_tiles_per_call = vision_tiles_per_call
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_image_bytes = max_image_bytes  # image files and bytes above this are refused
        self.feature_cache = FeatureCache(feature_cache_bytes)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._vision_identity = _graph_identity(bundle_dir, manifest.graph(VISION_GRAPH))

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        *,
        backend: str | Mapping[str, str] | BackendChoice = DEFAULT_BACKEND,
        vision_tiles_per_call: int | None = DEFAULT_VISION_TILES_PER_CALL,
        prefill_chunk_tokens: int | None = DEFAULT_PREFILL_CHUNK_TOKENS,
        shared_runners: Mapping[str, GraphRunner] | None = None,
        graphs: Collection[str] | None = None,
        verify_hashes: bool = False,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        feature_cache_bytes: int = DEFAULT_FEATURE_CACHE_BYTES,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        manifest: Manifest | None = None,
        graph_variants: bool = True,
        **backend_options: object,
    ) -> Pipeline:
        """Load a bundle. `backend` is one backend for every graph or a choice per graph
        (`BackendChoice`: "vision=openvino", {"vision": "openvino"}; graphs not named run on
        ONNX Runtime). `backend_options` go to each graph's runner that takes them (for ONNX
        Runtime: `providers`, `intra_op_threads`, `optimization_level`, `allow_spinning`,
        `memory_arena`); one that no runner takes is refused. `vision_tiles_per_call` and
        `prefill_chunk_tokens` bound activation memory (None: a whole image / the whole prompt
        in one call). `shared_runners` are used
        for their graphs instead of loading them again: another pipeline's runners for graphs the
        two bundles share unchanged (runners hold no per-request state). `graphs` names the
        graphs to load (default: all): a language engine that serves the decoder itself needs
        only the vision side (see nvlm_export/handoff). Every file's size is
        checked against the manifest's records; `verify_hashes` checks their SHA-256 too (reads
        the whole bundle once). Image files and encoded bytes above `max_image_bytes` are refused
        before they are read.
        `feature_cache_bytes` and `prefix_cache_bytes` budget the reuse caches (0 = off).
        `manifest` is used instead of reading the bundle's (no checks of the files): exporters
        validate a staged bundle before they write its manifest, so an interrupted export never
        leaves a directory that loads. A graph with a variant for `backend` in the manifest (ONNX
        Runtime: fused attention, docs/bundle.md) runs that variant unless `graph_variants` is
        False."""
        bundle_dir = Path(bundle)
        manifest = manifest or load_manifest(bundle_dir, verify_hashes=verify_hashes)
        loaded = [name for name in manifest.graphs if graphs is None or name in graphs]
        choice = BackendChoice.of(backend)
        choice.check_graphs(list(manifest.graphs))
        choice = choice.resolve({name: manifest.graphs[name].precision for name in loaded})
        # The decoder's prompt calls get a runner of their own where they run elsewhere.
        slots = {name: name for name in loaded}
        if DECODER_GRAPH in loaded and choice.prefill_apart:
            slots[PREFILL] = DECODER_GRAPH
        choice.check_options(backend_options, list(slots))
        shared = shared_runners or {}
        runners = {}
        for slot, name in slots.items():
            graph_backend = choice.for_graph(slot)
            runner_class = get_backend(graph_backend)
            spec = GraphSpec.from_manifest(
                name,
                manifest.graphs[name],
                bundle_dir,
                backend=graph_backend if graph_variants else None,
                engine=manifest.engines.get(name),
            )
            if slot in shared:
                runners[slot] = _check_shared(shared[slot], spec, runner_class)
            else:
                options = accepted_options(graph_backend, backend_options)
                runners[slot] = runner_class(spec, **options)
        for runner in runners.values():
            runner.activate()
        return cls(
            bundle_dir,
            manifest,
            runners,
            _load_tokenizer(bundle_dir, manifest),
            _load_embedding(bundle_dir, manifest),
            vision_tiles_per_call=vision_tiles_per_call,
            prefill_chunk_tokens=prefill_chunk_tokens,
            max_image_bytes=max_image_bytes,
            feature_cache_bytes=feature_cache_bytes,
            prefix_cache_bytes=prefix_cache_bytes,
        )

    @property
    def backends(self) -> BackendChoice:
        """The backend each loaded graph runs on."""
        return BackendChoice.of_runners({n: r.backend_name for n, r in self.runners.items()})

    # --- the stages -----------------------------------------------------------------------------
    def prepare(
        self,
        prompt: str,
        images: Sequence[ImageSource] = (),
        *,
        max_tiles: int | None = None,
        system: str | None = None,
        raw: bool = False,
    ) -> PreparedRequest:
        """Tile the images and assemble the prompt; refuses a prompt that overflows the context
        (naming the largest `max_tiles` that would fit, when there is one)."""
        loaded = [self.load_image(image) for image in images]
        tilings = tuple(tile_image(image, self.tiling, max_tiles) for image in loaded)
        keys = tuple(self.image_key(image, max_tiles) for image in loaded)
        tokens = build_prompt(
            self.tokenizer, self.prompt_format, prompt, tilings, system=system, raw=raw
        )
        try:
            check_prompt_fits(tokens.num_tokens, self.context_tokens)
        except PromptError as error:
            fix = self._fewer_tiles_fix(prompt, loaded, system=system, raw=raw)
            if fix is None:
                raise
            raise PromptError(error.what, why=error.why, fix=fix) from None
        return PreparedRequest(tilings, tokens, keys)

    def prepare_chat(
        self,
        messages: Sequence[Message],
        images: Sequence[tuple[Tiling, ImageKey]],
        *,
        system: str | None = None,
    ) -> PreparedRequest:
        """Assemble a conversation (already tiled images with their keys, in message order);
        the caller checks that it fits the context (a `Conversation` says how to go on)."""
        tilings = tuple(tiling for tiling, _ in images)
        tokens = build_chat_prompt(
            self.tokenizer, self.prompt_format, messages, tilings, system=system
        )
        return PreparedRequest(tilings, tokens, tuple(key for _, key in images))

    def image_key(self, image: Image.Image, max_tiles: int | None = None) -> ImageKey:
        """The feature-cache key of a loaded image under this bundle's tiling and `max_tiles`."""
        budget = (
            self.tiling.max_tiles if max_tiles is None else min(max_tiles, self.tiling.max_tiles)
        )
        return image_key(image, {**self.tiling.to_dict(), "budget": budget}, self._vision_identity)

    def load_image(self, image: ImageSource) -> Image.Image:
        """An image source as RGB, with this pipeline's limit on encoded size."""
        return load_image(image, max_bytes=self.max_image_bytes)

    def max_tiles_fitting(
        self,
        prompt: str,
        images: Sequence[ImageSource] = (),
        *,
        new_tokens: int = 1,
        system: str | None = None,
        raw: bool = False,
    ) -> int:
        """The largest tile budget (`max_tiles` of `prepare` / `generate`) with which the prompt
        plus `new_tokens` generated tokens fit the bundle's context; the bundle's own budget when
        nothing needs capping. `run` and `generate` never cap on their own: callers that prefer
        fewer tiles to a context error (calibration, the accuracy report) ask here first.

        Counts tokens with the real prompt assembly and tokenizer; tile counts come from each
        image's size (no pixels are resized). Raises PromptError when even `min_tiles` per image
        does not fit.
        """
        sizes = [self.load_image(image).size for image in images]
        capacity = self.context_tokens
        budgets = range(self.tiling.max_tiles, self.tiling.min_tiles - 1, -1) if sizes else [None]
        for budget in budgets:
            length = self._prompt_length(prompt, sizes, budget, system=system, raw=raw)
            if length + new_tokens <= capacity:
                return budget or self.tiling.max_tiles
        least = self.tiling.min_tiles
        tiles = f" even with {least} tile{'s' if least > 1 else ''} per image" if sizes else ""
        raise PromptError(
            f"The prompt does not fit the bundle's context{tiles}",
            why=f"it is {length} tokens long and {new_tokens} more are to be generated; the "
            f"context holds {capacity} tokens",
            fix="Use a shorter question or fewer images, or export the bundle with a larger "
            "--max-context",
        )

    def _prompt_length(
        self,
        prompt: str,
        sizes: Sequence[tuple[int, int]],
        max_tiles: int | None,
        *,
        system: str | None,
        raw: bool,
    ) -> int:
        """Prompt tokens for images of these (width, height) sizes under a tile budget."""
        counts = []
        for width, height in sizes:
            grid = choose_grid(width, height, self.tiling, max_tiles)
            tiles = tile_count(grid, self.tiling)
            counts.append(TileCount(tiles, has_thumbnail=tiles > grid[0] * grid[1]))
        return count_prompt_tokens(
            self.tokenizer, self.prompt_format, prompt, counts, system=system, raw=raw
        )

    def _fewer_tiles_fix(
        self, prompt: str, images: Sequence[ImageSource], *, system: str | None, raw: bool
    ) -> str | None:
        """The advice for an overflowing prompt with images: the tile budget that fits, if any."""
        if not images:
            return None
        try:
            budget = self.max_tiles_fitting(prompt, images, system=system, raw=raw)
        except PromptError:
            return None
        tiles = "1 tile" if budget == 1 else f"{budget} tiles"
        return (
            f"Use at most {tiles} per image (max_tiles={budget}, --max-tiles {budget} on the "
            "command line), fewer images or a shorter question"
        )

    def encode_images(self, tilings: Sequence[Tiling]) -> list[Features]:
        """Run the vision graph on each image's tiles (one call per image keeps the tile count
        within the range the graph and its TensorRT profile were built for), in calls of at most
        `vision_tiles_per_call` tiles: tiles are encoded independently, so splitting changes
        nothing but the activation memory."""
        vision = self.runners[VISION_GRAPH]
        dtype = np.dtype(vision.spec.inputs[0].dtype)
        return [
            self._encode_tiles(vision, t.pixel_values.astype(dtype, copy=False)) for t in tilings
        ]

    def _encode_tiles(self, vision: GraphRunner, pixel_values: np.ndarray) -> Features:
        step = self.vision_tiles_per_call or len(pixel_values)
        if len(pixel_values) <= step:
            return vision.infer({PIXEL_VALUES: pixel_values})
        parts = [
            vision.infer({PIXEL_VALUES: pixel_values[start : start + step]})
            for start in range(0, len(pixel_values), step)
        ]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def encode_cached(
        self, prepared: PreparedRequest, needed: Sequence[int] | None = None
    ) -> dict[int, Features]:
        """Vision outputs of the `needed` images (default: all) by image index, through the
        feature cache."""
        vision = self.runners[VISION_GRAPH]
        dtype = np.dtype(vision.spec.inputs[0].dtype)
        features = {}
        for index in range(len(prepared.tilings)) if needed is None else needed:
            key = prepared.image_keys[index]
            cached = self.feature_cache.get(key) if self.feature_cache.enabled else None
            if cached is None:
                pixels = prepared.tilings[index].pixel_values.astype(dtype, copy=False)
                cached = self._encode_tiles(vision, pixels)
                self.feature_cache.put(key, cached)
            features[index] = cached
        return features

    def encode_and_splice(
        self,
        prepared: PreparedRequest,
        stages: dict[str, float],
        *,
        start: int = 0,
        cross_reuse: CrossState | None = None,
    ) -> DecoderInputs:
        """The vision and splice stages (timed in `stages`): the images whose features the tokens
        from `start` on need, through the feature cache, spliced into the decoder's inputs."""
        with timed(stages, "vision"):
            needed = _images_needed(prepared.prompt, start, cross_reuse)
            features = self.encode_cached(prepared, needed)
        with timed(stages, "splice"):
            return self.decoder_inputs(
                prepared.prompt, features, start=start, cross_reuse=cross_reuse
            )

    def prefill(self, inputs: DecoderInputs, cache: KVCacheLike) -> np.ndarray:
        """The prompt's embeddings through the decoder into `cache`, in `prefill_chunk_tokens`
        chunks; the last position's logits [V]. Runs on the prefill runner where the prompt
        calls have their own backend (`BackendChoice`, "prefill=...")."""
        runner = self.runners.get(PREFILL, self.runners[DECODER_GRAPH])
        decoder = runner.infer
        if isinstance(cache, InPlaceKVCache) and not runner.keeps_kv_in_place:
            decoder = cache.fed_by_copies(decoder)  # prompt calls apart, on another backend
        return prefill(
            decoder,
            inputs.inputs_embeds,
            cache,
            extra_feeds=inputs.prefill_feeds,
            # Cross-attention masks have a per-token axis: those prompts go in one call.
            chunk_tokens=None if inputs.prefill_feeds else self.prefill_chunk_tokens,
        )

    def decoder_inputs(
        self,
        prompt: PromptTokens,
        features: Sequence[Features] | Mapping[int, Features],
        *,
        start: int = 0,
        cross_reuse: CrossState | None = None,
    ) -> DecoderInputs:
        """Embed the prompt from token `start` on (the keys/values before it are reused), splice
        image features in, and prepare cross-attention feeds (extending `cross_reuse`'s keys and
        values when the request's cross sequence starts with its)."""
        embeds = self.embed(prompt.input_ids[None, start:])  # (1, T - start, D)
        _splice(
            embeds[0],
            features,
            IMAGE_FEATURES,
            prompt.decoder_feature_slots,
            prompt.decoder_feature_positions,
            start,
        )
        if CROSS_KV_GRAPH not in self.runners:
            return DecoderInputs(embeds)
        return self._with_cross_attention(embeds, prompt, features, start, cross_reuse)

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids [B, S] -> embeddings [B, S, D] in the decoder's input dtype (a fresh array)."""
        return np.asarray(self.embedding[token_ids], dtype=self._embeds_dtype)

    def _with_cross_attention(
        self,
        embeds: np.ndarray,
        prompt: PromptTokens,
        features: Sequence[Features] | Mapping[int, Features],
        start: int,
        reuse: CrossState | None,
    ) -> DecoderInputs:
        cross_ids, mask = prompt.cross_token_ids, prompt.cross_attention_mask
        if len(cross_ids) == 0:
            # A request without cross tokens still feeds one masked slot: zero-length tensors are
            # not portable to TensorRT, and a fully masked row contributes nothing.
            cross_ids = np.zeros(1, dtype=np.int64)
            mask = np.zeros((prompt.num_tokens, 1), dtype=bool)
            reuse = None
        # The cross_kv graph projects each entry on its own, so an extended sequence's keys and
        # values are the kept ones followed by those of the new entries.
        kept = len(reuse.token_ids) if reuse is not None else 0
        cross_kv = reuse.key_values if reuse is not None else {}
        if kept < len(cross_ids):
            cross_embeds = self.embed(cross_ids[None, kept:])  # (1, K - kept, D)
            _splice(
                cross_embeds[0],
                features,
                CROSS_FEATURES,
                prompt.cross_feature_slots,
                prompt.cross_feature_positions,
                kept,
            )
            new = self.runners[CROSS_KV_GRAPH].infer({CROSS_EMBEDS: cross_embeds})
            cross_kv = {name: _extend(cross_kv.get(name), new[name]) for name in new}
        # Generated tokens come after every image, so they see what the prompt's last token sees.
        return DecoderInputs(
            embeds,
            prefill_feeds={**cross_kv, CROSS_ATTENTION_MASK: mask[None, start:, :]},
            decode_feeds={**cross_kv, CROSS_ATTENTION_MASK: mask[None, -1:, :]},
            cross_key_values=cross_kv if len(prompt.cross_token_ids) else None,
        )

    # --- the whole request ------------------------------------------------------------------
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
    ) -> RequestStream:
        """Answer `prompt` about `images` (paths, bytes, PIL images or HxWx3 uint8 arrays).

        `options` (a `GenerateOptions`; default greedy, 128 new tokens) say how tokens are
        picked and when to stop; any of its fields may also be given as keyword arguments
        (`max_new_tokens=16, temperature=0.7`), which override `options`. Returns a stream of
        `TokenEvent`s; its `result` holds the full text, token ids and timings.
        """
        options = GenerateOptions.merged(options, overrides)
        start = time.perf_counter()
        stages: dict[str, float] = {}
        with timed(stages, "prepare"):
            prepared = self.prepare(prompt, images, max_tiles=max_tiles, system=system, raw=raw)
        return self.start(prepared, options, start_time=start, stages=stages)

    def start(
        self,
        prepared: PreparedRequest,
        options: GenerateOptions,
        *,
        start_time: float | None = None,
        stages: dict[str, float] | None = None,
        also_reuse: Sequence[KVState] = (),
        on_finish: Callable[[GenerationResult, KVState], None] | None = None,
    ) -> RequestStream:
        """Encode, splice and prefill a prepared request, reusing the longest prefix kept in the
        prefix cache or in `also_reuse` (a conversation's own state); returns its token stream.
        `on_finish` gets the result and the keys/values of everything but the last token."""
        start_time = time.perf_counter() if start_time is None else start_time
        stages = {} if stages is None else stages
        before = self._cache_counters()
        prompt = prepared.prompt
        with timed(stages, "splice"):
            state, shared = self._reusable(prepared, also_reuse)
            cross_reuse = self._reusable_cross(prepared, state)
        inputs = self.encode_and_splice(prepared, stages, start=shared, cross_reuse=cross_reuse)
        with timed(stages, "splice"):
            cache = self._cache_from(state, shared)
        decoder = self.runners[DECODER_GRAPH].infer
        with timed(stages, "prefill"):
            first_logits = self.prefill(inputs, cache)
        cross = self._cross_state(prepared, inputs)
        if self.prefix_cache.enabled:
            self._keep(_state_of(prepared, prompt.input_ids, cache, cross))
        stream = generate(
            decoder,
            first_logits,
            cache=cache,
            embed=self.embed,
            tokenizer=self.tokenizer,
            options=options,
            eos_token_ids=self.manifest.tokenizer.eos_token_ids,
            prompt_ids=prompt.input_ids.tolist(),
            extra_feeds=inputs.decode_feeds,
            start_time=start_time,
        )

        def finished(result: GenerationResult) -> None:
            if on_finish is not None:
                ids = np.concatenate([prompt.input_ids, np.asarray(result.token_ids[:-1])])
                on_finish(result, _state_of(prepared, ids.astype(np.int64), cache, cross))

        return RequestStream(
            stream,
            prepared,
            stages,
            reused_tokens=shared,
            cache_stats=_counter_delta(before, self._cache_counters()),
            on_finish=finished,
        )

    def chat(self, *, system: str | None = None, max_tiles: int | None = None) -> Conversation:
        """A multi-turn conversation about images (see `nvlm_export.runtime.conversation`)."""
        return Conversation(self, system=system, max_tiles=max_tiles)

    # --- reuse ------------------------------------------------------------------------------
    def _reusable(
        self, prepared: PreparedRequest, also: Sequence[KVState]
    ) -> tuple[KVState | None, int]:
        """The kept state sharing the longest prefix with the request; at least the prompt's
        last token is always prefilled (its logits start the answer)."""
        if not (self.prefix_cache.enabled or also):
            return None, 0
        prompt = prepared.prompt
        state, shared = self.prefix_cache.longest(
            prompt.input_ids, prepared.image_keys, prompt.image_start_tokens.tolist(), also
        )
        shared = min(shared, prompt.num_tokens - 1)
        return (state, shared) if shared > 0 else (None, 0)

    def _reusable_cross(
        self, prepared: PreparedRequest, state: KVState | None
    ) -> CrossState | None:
        cross = state.cross if state is not None else None
        if cross is None or not cross.extended_by(
            prepared.prompt.cross_token_ids, prepared.image_keys
        ):
            return None
        return cross

    @property
    def keeps_kv_in_place(self) -> bool:
        """Whether requests get an `InPlaceKVCache`: the decode runner writes its keys/values in
        place (prompt calls on another backend copy theirs in, `InPlaceKVCache.fed_by_copies`)."""
        return self.runners[DECODER_GRAPH].keeps_kv_in_place

    def new_cache(self) -> KVCache | InPlaceKVCache:
        """An empty key/value cache for one request, of the kind this pipeline's decoder runners
        fill: buffers written in place where they can, otherwise arrays replaced each step."""
        spec = self.manifest.kv_cache
        return InPlaceKVCache(spec) if self.keeps_kv_in_place else KVCache.from_spec(spec)

    def _cache_from(self, state: KVState | None, shared: int) -> KVCache | InPlaceKVCache:
        spec = self.manifest.kv_cache
        if state is None:
            return self.new_cache()
        if self.keeps_kv_in_place:  # always a copy: the request writes into buffers of its own
            keys = [k[:, :, :shared] for k in state.keys]
            return InPlaceKVCache.holding(spec, keys, [v[:, :, :shared] for v in state.values])
        if shared == state.length:  # the arrays themselves: these graphs never write into inputs
            keys, values = list(state.keys), list(state.values)
        else:
            keys = [np.ascontiguousarray(k[:, :, :shared]) for k in state.keys]
            values = [np.ascontiguousarray(v[:, :, :shared]) for v in state.values]
        return KVCache(keys, values, spec.max_context, names=spec)

    def _cross_state(self, prepared: PreparedRequest, inputs: DecoderInputs) -> CrossState | None:
        if inputs.cross_key_values is None:
            return None
        return CrossState(
            prepared.prompt.cross_token_ids, prepared.image_keys, inputs.cross_key_values
        )

    def _keep(self, state: KVState) -> None:
        """Keep a prompt's state; states it extends are dropped (it answers all they could)."""
        for key, kept in list(self.prefix_cache.values()):
            if (
                kept.length <= state.length
                and kept.shared_prefix(state.token_ids, state.images, state.image_starts)
                == kept.length
            ):
                self.prefix_cache.discard(key)
        self.prefix_cache.put(_state_id(state), state)

    def _cache_counters(self) -> dict[str, dict[str, int]]:
        return {
            "feature_cache": self.feature_cache.stats.as_dict(),
            "prefix_cache": self.prefix_cache.stats.as_dict(),
        }

    def cache_report(self) -> dict[str, dict[str, int]]:
        """Both caches' counters since the pipeline was loaded (hits, misses, bytes, peak…)."""
        return self._cache_counters()

    def clear_caches(self) -> None:
        self.feature_cache.clear()
        self.prefix_cache.clear()


def _check_shared(runner: GraphRunner, spec: GraphSpec, runner_class: type) -> GraphRunner:
    """A runner another pipeline lends for `spec`'s graph: same backend, same interface."""
    if not isinstance(runner, runner_class):
        raise InputError(
            f"The shared runner for the {spec.name} graph is a {runner.backend_name} runner",
            why=f"this pipeline loads that graph with {runner_class.backend_name}",
        )
    if (runner.spec.inputs, runner.spec.outputs) != (spec.inputs, spec.outputs):
        raise InputError(
            f"The shared runner for the {spec.name} graph has another interface",
            why="its inputs or outputs differ from this bundle's manifest",
        )
    return runner


class timed:
    """Adds the seconds spent in a `with` block to `stages[name]`."""

    def __init__(self, stages: dict[str, float], name: str) -> None:
        self.stages, self.name = stages, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        self.stages[self.name] = self.stages.get(self.name, 0.0) + time.perf_counter() - self.start


def _splice(
    embeds: np.ndarray,
    features: Sequence[Features] | Mapping[int, Features],
    output: str,
    slots: Sequence[Slot],
    positions: np.ndarray,
    start: int,
) -> None:
    """Write the features of `slots` at `positions` (of the whole sequence) into `embeds`, which
    holds the sequence from `start` on; slots wholly before `start` are not read."""
    if not slots:
        return
    per_slot = len(positions) // len(slots)
    first = next(
        (k for k, pos in enumerate(positions[per_slot - 1 :: per_slot]) if pos >= start), None
    )
    if first is None:
        return
    rows = _gather(features, output, slots[first:])  # [(len(slots) - first) * per_slot, D]
    wanted = positions[first * per_slot :]
    inside = wanted >= start
    embeds[wanted[inside] - start] = rows[inside]


def _images_needed(prompt: PromptTokens, start: int, cross: CrossState | None) -> list[int]:
    """Images whose features a request needs when tokens before `start` and the cross entries
    of `cross` are reused."""
    needed: set[int] = set()
    for slots, positions, first in (
        (prompt.decoder_feature_slots, prompt.decoder_feature_positions, start),
        (
            prompt.cross_feature_slots,
            prompt.cross_feature_positions,
            len(cross.token_ids) if cross is not None else 0,
        ),
    ):
        if slots:
            last_positions = positions[
                len(positions) // len(slots) - 1 :: len(positions) // len(slots)
            ]
            needed.update(
                image
                for (image, _), last in zip(slots, last_positions, strict=True)
                if last >= first
            )
    return sorted(needed)


def _extend(kept: np.ndarray | None, new: np.ndarray) -> np.ndarray:
    return new if kept is None else np.concatenate([kept, new], axis=2)


def _state_of(
    prepared: PreparedRequest,
    token_ids: np.ndarray,
    cache: KVCache | InPlaceKVCache,
    cross: CrossState | None,
) -> KVState:
    """What a request computed, to keep. An in-place cache's keys/values are views of buffers of
    the whole context: kept as compact copies, so a kept state holds (and the prefix cache's
    budget counts) its own positions, not the request's buffers. A `KVCache`'s arrays are kept
    as they are (already compact; no graph writes into them)."""
    prompt = prepared.prompt
    # Always a copy for an in-place cache: with one KV head its filled positions are already
    # contiguous, and ascontiguousarray would return the view that pins the whole buffer.
    own = np.array if isinstance(cache, InPlaceKVCache) else np.asarray
    return KVState(
        token_ids,
        prepared.image_keys,
        tuple(int(s) for s in prompt.image_start_tokens),
        tuple(own(k) for k in cache.keys),
        tuple(own(v) for v in cache.values),
        cross,
    )


def _state_id(state: KVState) -> str:
    digest = hashlib.blake2b(state.token_ids.tobytes(), digest_size=16)
    digest.update("\n".join(state.images).encode())
    return digest.hexdigest()


def _counter_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    counted = ("hits", "misses", "evictions")
    return {
        cache: {name: after[cache][name] - before[cache][name] for name in counted}
        | {"bytes": after[cache]["bytes"]}
        for cache in after
    }


def _graph_identity(bundle_dir: Path, graph: ManifestGraph) -> str:
    """What identifies a graph's computation: its manifest entry and its file's size and time."""
    path = bundle_dir / graph.file
    stat = path.stat() if path.exists() else None
    facts = [str(path.resolve()), repr(graph), stat and (stat.st_size, stat.st_mtime_ns)]
    return hashlib.blake2b(repr(facts).encode(), digest_size=16).hexdigest()


def _gather(
    features: Sequence[Features] | Mapping[int, Features], output: str, slots: Sequence[Slot]
) -> np.ndarray:
    """The features of each (image, tile) slot, in order: [len(slots) * 256, D]."""
    try:
        return np.concatenate([features[image][output][tile] for image, tile in slots])
    except KeyError:
        raise BundleError(
            f"The vision graph has no '{output}' output",
            why="the bundle's prompt format places image features where this graph provides none",
            fix="Re-export the bundle",
        ) from None


def _load_tokenizer(bundle_dir: Path, manifest: Manifest) -> Tokenizer:
    path = bundle_dir / manifest.tokenizer.file
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on malformed files
        raise BundleError(
            f"Cannot read the tokenizer {path}",
            why=str(error).splitlines()[0],
            fix="Re-export the bundle",
        ) from None
    _check_placeholder_id(tokenizer, manifest)
    return tokenizer


def _check_placeholder_id(tokenizer: Tokenizer, manifest: Manifest) -> None:
    """Prompts find image slots by the prompt format's placeholder token; the manifest records
    its id too (for readers without a tokenizer), and the two must agree."""
    token = manifest.prompt.placeholder_token
    found, recorded = tokenizer.token_to_id(token), manifest.tokenizer.placeholder_token_id
    if found != recorded:
        raise BundleError(
            f"The bundle's tokenizer gives the image placeholder {token!r:.40} the id {found}",
            why=f"the manifest records tokenizer.placeholder_token_id {recorded}",
            fix="The tokenizer and the manifest come from different exports; re-export the bundle",
        )


def _load_embedding(bundle_dir: Path, manifest: Manifest) -> np.ndarray:
    """The token-embedding table, memory-mapped so it costs no resident memory until used."""
    spec, path = manifest.embedding, bundle_dir / manifest.embedding.file
    try:
        table = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise BundleError(
            f"Cannot read the embedding table {path}", why=str(error), fix="Re-export the bundle"
        ) from None
    if table.shape != (spec.vocab_size, spec.hidden_size):
        raise BundleError(
            f"The embedding table {path} has shape {list(table.shape)}",
            why=f"the manifest declares [{spec.vocab_size}, {spec.hidden_size}]",
            fix="Re-export the bundle",
        )
    return table
