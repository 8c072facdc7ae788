"""The systems the benchmark compares, each run in its own worker process.

One process per system keeps their thread pools apart: ONNX Runtime's and PyTorch's OpenMP threads
spin while waiting for work, and two spinning pools in one process on 2 cores slow both down. The
orchestrator (run.py) sends one measurement at a time and alternates systems, so only the system
being measured is busy and slow drifts of a shared machine hit both sides alike.

Every system answers the same operations, all timed inside the worker:

    vision(tiles)                       -> seconds to encode that many tiles (one image)
    request(tiles, question, new)       -> TTFT and per-token decode seconds for an image request
    decoder(prompt_ids, new)            -> prefill seconds and per-token decode seconds, text only
    peak_rss()                          -> this process's peak resident bytes since it loaded

and the reuse system (caches on, bench/reuse.py) `reuse_round(tiles, questions, new)`.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nvlm_export.profiling.inputs import image_size_for_tiles, synthetic_image
from nvlm_export.profiling.memory import peak_rss_bytes, reset_peak_rss
from nvlm_export.runtime.tiling import TilingConfig, choose_grid, tile_image


def test_image(tiles: int, tiling: TilingConfig) -> Any:
    return synthetic_image(image_size_for_tiles(tiles, tiling), seed=tiles)


def cut_tiles(tiles: int, tiling: TilingConfig) -> Any:
    """The test image's tiling with its pixels already cut (a tiling cuts them on first use):
    the vision rows time the encoder alone."""
    tiled = tile_image(test_image(tiles, tiling), tiling)
    tiled.pixel_values  # noqa: B018 - computed here, outside the timed region
    return tiled


def grid_image(grid: tuple[int, int], tiling: TilingConfig) -> Any:
    """A synthetic image the bundle's tiling cuts into exactly `grid` (cols, rows)."""
    size = (tiling.tile_size * grid[0], tiling.tile_size * grid[1])
    chosen = choose_grid(*size, tiling)
    if chosen != tuple(grid):
        raise ValueError(f"a {size[0]}x{size[1]} image tiles as {chosen}, not {grid}")
    return synthetic_image(size, seed=grid[0] * 10 + grid[1])


class OursSystem:
    """nvlm-export's runtime on a bundle (CPU; `backend` as `run --backend` takes it)."""

    def __init__(self, bundle: str, threads: int, backend: str = "auto") -> None:
        from nvlm_export.runtime.pipeline import Pipeline

        # Caches off: every measured request is cold, like the baselines it is compared with.
        self.pipe = Pipeline.load(
            bundle,
            backend=backend,
            intra_op_threads=threads,
            feature_cache_bytes=0,
            prefix_cache_bytes=0,
        )
        self.weight_bytes = _bundle_weight_bytes(self.pipe)
        reset_peak_rss()

    def vision(self, tiles: int) -> float:
        tiling = cut_tiles(tiles, self.pipe.tiling)
        start = time.perf_counter()
        self.pipe.encode_images([tiling])
        return time.perf_counter() - start

    def request(self, tiles: int, question: str, new_tokens: int) -> dict[str, Any]:
        image = test_image(tiles, self.pipe.tiling)
        stream = self.pipe.generate(question, [image], max_new_tokens=new_tokens, ignore_eos=True)
        result = stream.run()
        return {
            "ttft": result.timings.time_to_first_token,
            "decode": list(result.timings.decode_seconds),
            "prompt_tokens": stream.prepared.prompt.num_tokens,
        }

    def decoder(self, prompt_ids: list[int], new_tokens: int) -> dict[str, Any]:
        from nvlm_export.runtime.generation import GenerateOptions, generate, prefill

        pipe = self.pipe
        decoder = pipe.runners["decoder"].infer
        cache = pipe.new_cache()
        start = time.perf_counter()
        logits = prefill(decoder, pipe.embed(np.asarray(prompt_ids)[None, :]), cache)
        prefill_seconds = time.perf_counter() - start
        stream = generate(
            decoder,
            logits,
            cache=cache,
            embed=pipe.embed,
            tokenizer=pipe.tokenizer,
            options=GenerateOptions(max_new_tokens=new_tokens),
        )
        return {"prefill": prefill_seconds, "decode": list(stream.run().timings.decode_seconds)}

    def question(self, tokens: int) -> str:
        from nvlm_export.profiling.inputs import question_with_tokens

        return question_with_tokens(self.pipe.tokenizer, tokens)

    def info(self) -> dict[str, Any]:
        from nvlm_export.profiling.cost import decoder_cost

        cost = decoder_cost(self.pipe.bundle_dir, self.pipe.manifest)
        return {
            "weight_bytes": self.weight_bytes,
            "decoder_cost": cost.to_dict(0),
            "precision": self.pipe.manifest.precision,
            "backends": str(self.pipe.backends),  # what `auto` (or the choice) resolved to
        }

    def peak_rss(self) -> int:
        return peak_rss_bytes()


class ReuseSystem:
    """nvlm-export's runtime with its reuse caches on (the defaults): a cold request beside a
    new question about the same image, and a conversation's first question beside its follow-up.
    Times are wall clock from the call to the first token, so tiling, hashing and re-rendering
    the history count."""

    def __init__(self, bundle: str, threads: int) -> None:
        from nvlm_export.runtime.pipeline import Pipeline

        self.pipe = Pipeline.load(bundle, intra_op_threads=threads)
        reset_peak_rss()

    def reuse_round(
        self, grid: tuple[int, int], questions: list[str], new_tokens: int
    ) -> dict[str, Any]:
        """One round on an image tiled as `grid` (cols, rows): clear the caches, a cold request,
        then a new question about its image; clear them again, a conversation's first question
        about the image, then a follow-up."""
        pipe, (first, second) = self.pipe, questions
        image = grid_image(tuple(grid), pipe.tiling)
        pipe.clear_caches()
        cold = _first_token(lambda: pipe.generate(first, [image], max_new_tokens=new_tokens))
        same = _first_token(lambda: pipe.generate(second, [image], max_new_tokens=new_tokens))
        pipe.clear_caches()
        chat = pipe.chat()
        turn = _first_token(lambda: chat.ask(first, [image], max_new_tokens=new_tokens))
        follow = _first_token(lambda: chat.ask(second, max_new_tokens=new_tokens))
        return {
            "tiles": cold[1].prepared.tilings[0].num_tiles,
            "grid": list(cold[1].prepared.tilings[0].grid),
            "prompt_tokens": cold[1].prepared.prompt.num_tokens,
            "cold": cold[0],
            "same_image": same[0],
            "same_image_prefilled": _prefilled(same[1]),
            "first_turn": turn[0],
            "follow_up": follow[0],
            "follow_up_prefilled": _prefilled(follow[1]),
            "cache_report": pipe.cache_report(),
        }

    def questions(self, tokens: int) -> list[str]:
        """Two different questions of `tokens` tokens each."""
        from nvlm_export.profiling.inputs import question_with_tokens

        bases = ("Describe the picture in detail", "Which colours dominate the left half")
        return [question_with_tokens(self.pipe.tokenizer, tokens, base) for base in bases]

    def peak_rss(self) -> int:
        return peak_rss_bytes()


def _first_token(start: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds from `start()` to its stream's first token; the stream is then read to the end
    (a conversation keeps a turn only when its answer is complete)."""
    began = time.perf_counter()
    stream = start()
    tokens = iter(stream)
    next(tokens)
    seconds = time.perf_counter() - began
    for _ in tokens:
        pass
    return seconds, stream


def _prefilled(stream: Any) -> int:
    return int(stream.prepared.prompt.num_tokens - stream.reused_tokens)


class EagerSystem:
    """PyTorch eager: transformers' Qwen2ForCausalLM.generate (KV cache, default attention) on the
    same weights, and the reference PyTorch InternViT + projector for the image."""

    def __init__(self, checkpoint: str, hf_dir: str, bundle: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from nvlm_export.models.checkpoint import load_checkpoint
        from nvlm_export.runtime.manifest import load_manifest

        torch.set_num_threads(threads)
        self.torch = torch
        model = load_checkpoint(Path(checkpoint), dtype=torch.float32).eval()
        self.vision_model = model.vision
        self.image_token_id = model.image_token_id
        del model.language_model  # the transformers LM below replaces it (no second copy)
        self.lm = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.embedding = self.lm.get_input_embeddings()
        self.bundle = Path(bundle)  # for the tiling, prompt format and tokenizer only
        self.manifest = load_manifest(self.bundle)
        self.tiling = self.manifest.tiling

    def vision(self, tiles: int) -> float:
        tiling = cut_tiles(tiles, self.tiling)
        start = time.perf_counter()
        with self.torch.no_grad():
            self.vision_model(self.torch.from_numpy(tiling.pixel_values))
        return time.perf_counter() - start

    def request(self, tiles: int, question: str, new_tokens: int) -> dict[str, Any]:
        """Same image decode, tiling and prompt code as the runtime (numpy, shared), then PyTorch:
        vision, splice, `generate`. Token times come from a logits processor called per step."""
        from tokenizers import Tokenizer

        from nvlm_export.runtime.prompt import build_prompt

        torch = self.torch
        tokenizer = self._tokenizer(Tokenizer)
        start = time.perf_counter()
        tiling = tile_image(test_image(tiles, self.tiling), self.tiling)
        prompt = build_prompt(tokenizer, self.manifest.prompt, question, [tiling])
        with torch.no_grad():
            ids = torch.from_numpy(prompt.input_ids)[None, :]
            embeds = self.embedding(ids)
            features = self.vision_model(torch.from_numpy(tiling.pixel_values))
            slots = (ids == self.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(slots, features.reshape(-1, embeds.shape[-1]))
            stamps = self._generate(embeds, new_tokens)
        return {
            "ttft": stamps[0] - start,
            "decode": list(np.diff(stamps)),
            "prompt_tokens": int(ids.shape[1]),
        }

    def decoder(self, prompt_ids: list[int], new_tokens: int) -> dict[str, Any]:
        torch = self.torch
        start = time.perf_counter()
        with torch.no_grad():
            embeds = self.embedding(torch.tensor([prompt_ids]))
            stamps = self._generate(embeds, new_tokens)
        return {"prefill": stamps[0] - start, "decode": list(np.diff(stamps))}

    def _generate(self, embeds: Any, new_tokens: int) -> list[float]:
        return _stamped_generate(self.lm, new_tokens, inputs_embeds=embeds)

    def _tokenizer(self, tokenizer_class: Any) -> Any:
        if not hasattr(self, "_tok"):
            self._tok = tokenizer_class.from_file(str(self.bundle / self.manifest.tokenizer.file))
        return self._tok

    def peak_rss(self) -> int:
        return peak_rss_bytes()


class HfEagerSystem:
    """transformers' InternVLForConditionalGeneration on the CPU in `dtype` (issue #19's baseline,
    bfloat16: what a PyTorch user gets with `from_pretrained(..., dtype=torch.bfloat16)`; float32
    on a CPU without bf16 arithmetic), on the same weights in the transformers layout. Tiling and
    prompt come from the same numpy code as ours; the bundle only lends its tiling, prompt format
    and tokenizer."""

    def __init__(self, hf_dir: str, bundle: str, threads: int, dtype: str = "bfloat16") -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import InternVLForConditionalGeneration

        from nvlm_export.runtime.manifest import load_manifest

        torch.set_num_threads(threads)
        self.torch = torch
        self.dtype = getattr(torch, dtype)
        self.model = InternVLForConditionalGeneration.from_pretrained(hf_dir, dtype=self.dtype)
        self.model.eval()
        self.manifest = load_manifest(Path(bundle))
        self.tiling = self.manifest.tiling
        self.format = self.manifest.prompt
        self.tokenizer = Tokenizer.from_file(str(Path(bundle) / self.manifest.tokenizer.file))
        self.placeholder = self.tokenizer.token_to_id(self.format.placeholder_token)

    def vision(self, tiles: int) -> float:
        tiling = cut_tiles(tiles, self.tiling)
        start = time.perf_counter()
        pixels = self.torch.from_numpy(tiling.pixel_values).to(self.dtype)
        with self.torch.inference_mode():
            self.model.model.get_image_features(pixel_values=pixels)
        return time.perf_counter() - start

    def request(self, tiles: int, question: str, new_tokens: int) -> dict[str, Any]:
        """Tiling and prompt (shared numpy code), then `generate` with the pixels: vision,
        splice, prefill and decode are transformers'. The first token's time is TTFT."""
        from nvlm_export.runtime.prompt import build_prompt

        torch = self.torch
        start = time.perf_counter()
        tiling = tile_image(test_image(tiles, self.tiling), self.tiling)
        prompt = build_prompt(self.tokenizer, self.format, question, [tiling])
        ids = torch.from_numpy(prompt.input_ids)[None, :].clone()
        ids[ids == self.placeholder] = self.model.config.image_token_id
        pixels = torch.from_numpy(tiling.pixel_values).to(self.dtype)
        with torch.inference_mode():
            stamps = _stamped_generate(self.model, new_tokens, input_ids=ids, pixel_values=pixels)
        return {
            "ttft": stamps[0] - start,
            "decode": list(np.diff(stamps)),
            "prompt_tokens": int(ids.shape[1]),
        }

    def peak_rss(self) -> int:
        return peak_rss_bytes()


def _stamped_generate(model: Any, new_tokens: int, **inputs: Any) -> list[float]:
    """Greedy `generate` with the KV cache; the time each token's logits were ready."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            stamps.append(time.perf_counter())
            return scores

    first = next(v for v in inputs.values() if v is not None)
    model.generate(
        **inputs,
        attention_mask=torch.ones(first.shape[:2], dtype=torch.long),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        logits_processor=LogitsProcessorList([Stamp()]),
        pad_token_id=0,
    )
    return stamps


class GenAISystem:
    """ONNX Runtime GenAI on a model its builder wrote from the same LLM weights."""

    def __init__(self, model_dir: str) -> None:
        from genai import GenAIDecoder

        self.genai = GenAIDecoder(Path(model_dir))

    def decoder(self, prompt_ids: list[int], new_tokens: int) -> dict[str, Any]:
        prefill, steps = self.genai.decode_seconds(np.asarray(prompt_ids), new_tokens)
        return {"prefill": prefill, "decode": steps}

    def peak_rss(self) -> int:
        return peak_rss_bytes()


SYSTEMS: dict[str, Callable[..., Any]] = {
    "ours": OursSystem,
    "reuse": ReuseSystem,
    "eager": EagerSystem,
    "hf": HfEagerSystem,
    "genai": GenAISystem,
}


def _bundle_weight_bytes(pipe: Any) -> int:
    from nvlm_export.profiling.profiler import bundle_weight_bytes

    return bundle_weight_bytes(pipe)


def _serve(kind: str, args: tuple[Any, ...], connection: Any) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        system = SYSTEMS[kind](*args)
        connection.send(("ready", None))
    except Exception:
        connection.send(("error", traceback.format_exc()))
        return
    while True:
        message = connection.recv()
        if message is None:
            return
        method, call_args = message
        try:
            connection.send(("ok", getattr(system, method)(*call_args)))
        except Exception:
            connection.send(("error", traceback.format_exc()))


class Worker:
    """A system in its own process; `call(method, *args)` runs one measurement there."""

    def __init__(self, kind: str, *args: Any) -> None:
        context = mp.get_context("spawn")
        self.kind = kind
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(kind, args, child), daemon=True)
        self._process.start()
        self._expect()

    def call(self, method: str, *args: Any) -> Any:
        self._connection.send((method, args))
        return self._expect()

    def _expect(self) -> Any:
        status, value = self._connection.recv()
        if status == "error":
            raise RuntimeError(f"{self.kind} worker failed:\n{value}")
        return value

    def close(self) -> None:
        if self._process.is_alive():
            self._connection.send(None)
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.terminate()
