"""The vLLM hand-off's own logic with vLLM's engine replaced by a scripted one: what we hand to
vLLM (prompt embeddings, sampling settings) and how its outputs become our streams, answers and
timings. Runs everywhere; tests/test_vllm_engine.py checks the real vLLM where it is installed."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from nvlm_export.handoff.vllm_engine import Request, VLLMPipeline
from nvlm_export.runtime.manifest import VISION_GRAPH, LanguageEngineSpec
from nvlm_export.runtime.pipeline import Pipeline

IMAGE = Path(__file__).parents[1] / "nvlm_export" / "assets" / "example.png"


@dataclass
class _Completion:
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class _Output:
    request_id: str
    outputs: list[_Completion]
    finished: bool


@dataclass
class ScriptedEngine:
    """vLLM's LLMEngine surface that VLLMPipeline uses; each request emits `script` one token per
    step, honouring max_tokens and stop_token_ids as vLLM does."""

    script: list[int]
    added: dict[str, tuple[dict, dict]] = field(default_factory=dict)
    emitted: dict[str, list[int]] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)

    def add_request(self, request_id: str, prompt: dict, params: dict) -> None:
        self.added[request_id] = (prompt, params)
        self.emitted[request_id] = []

    def has_unfinished_requests(self) -> bool:
        return any(not self._done(r) for r in self.emitted)

    def abort_request(self, request_ids: list[str]) -> None:
        self.aborted += request_ids
        for request_id in request_ids:
            self.emitted.pop(request_id)

    def step(self) -> list[_Output]:
        outputs = []
        for request_id, tokens in self.emitted.items():
            if self._done(request_id):
                continue
            tokens.append(self.script[len(tokens) % len(self.script)])
            done = self._done(request_id)
            reason = (
                ("stop" if tokens[-1] in self._params(request_id)["stop_token_ids"] else "length")
                if done
                else None
            )
            outputs.append(_Output(request_id, [_Completion(list(tokens), reason)], done))
        return outputs

    def _params(self, request_id: str) -> dict:
        return self.added[request_id][1]

    def _done(self, request_id: str) -> bool:
        tokens, params = self.emitted[request_id], self._params(request_id)
        stopped = (
            not params["ignore_eos"] and bool(tokens) and tokens[-1] in params["stop_token_ids"]
        )
        return stopped or len(tokens) >= params["max_tokens"]


@pytest.fixture
def engine_for(tiny_bundle, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """VLLMPipeline over a tiny bundle's vision side, with a scripted engine for vLLM's."""
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=dict))

    def make(script: list[int]) -> tuple[VLLMPipeline, ScriptedEngine]:
        _, bundle = tiny_bundle("internvl")
        pipeline = Pipeline.load(bundle, graphs=(VISION_GRAPH,))
        assert set(pipeline.runners) == {VISION_GRAPH}  # no decoder graph loaded
        scripted = ScriptedEngine(script)
        spec = LanguageEngineSpec("vllm", "llm", "Qwen2ForCausalLM", 1, 4096, "float32")
        return VLLMPipeline(pipeline, types.SimpleNamespace(llm_engine=scripted), spec, 1), scripted

    return make


def _words(pipeline: Pipeline, text: str) -> list[int]:
    return pipeline.tokenizer.encode(text, add_special_tokens=False).ids


def test_hands_vllm_the_spliced_prompt_embeddings(engine_for) -> None:
    engine, scripted = engine_for([5, 6, 7])
    stream = engine.generate("What is it?", [IMAGE], max_new_tokens=3, max_tiles=1)
    assert stream.run().token_ids == (5, 6, 7)
    ((prompt, params),) = scripted.added.values()
    embeds = prompt["prompt_embeds"]
    expected = engine.pipeline.decoder_inputs(
        stream.prepared.prompt, engine.pipeline.encode_images(stream.prepared.tilings)
    ).inputs_embeds[0]
    assert tuple(embeds.shape) == expected.shape == (stream.prepared.prompt.num_tokens, 64)
    np.testing.assert_array_equal(embeds.numpy(), expected)
    assert params["temperature"] == 0.0 and params["max_tokens"] == 3
    assert params["stop_token_ids"] == list(engine.pipeline.manifest.tokenizer.eos_token_ids)
    assert params["detokenize"] is False


def test_stream_text_is_the_answer_and_stops_at_the_budget(engine_for) -> None:
    engine, _ = engine_for([])
    script = _words(engine.pipeline, " the cat sat on the mat")
    engine, _ = engine_for(script)
    stream = engine.generate("Say it.", max_new_tokens=4)
    events = list(stream)
    assert stream.result is not None
    assert "".join(e.text for e in events) == stream.result.text
    assert stream.result.token_ids == tuple(script[:4])
    assert stream.result.finish_reason == "length"
    assert len(stream.result.timings.decode_seconds) == 3
    assert stream.stage_seconds.keys() >= {"prepare", "vision", "splice", "generate"}


def test_a_stop_string_ends_the_answer_and_aborts_the_vllm_request(engine_for) -> None:
    engine, _ = engine_for([])
    script = _words(engine.pipeline, " red blue STOP green yellow")
    engine, scripted = engine_for(script)
    stream = engine.generate("Colours?", max_new_tokens=20, stop=["STOP"])
    result = stream.run()
    assert result.finish_reason == "stop"
    assert "STOP" not in result.text and "green" not in result.text
    assert result.text.strip() == "red blue"
    assert scripted.aborted == list(scripted.added)  # vLLM would have gone on


def test_the_end_of_turn_token_finishes_without_text(engine_for) -> None:
    engine, _ = engine_for([])
    eos = engine.pipeline.manifest.tokenizer.eos_token_ids[0]
    script = [*_words(engine.pipeline, " done"), eos, 9, 9]
    engine, scripted = engine_for(script)
    result = engine.generate("Finish.", max_new_tokens=10).run()
    assert result.finish_reason == "eos"
    assert result.token_ids[-1] == eos and result.text.strip() == "done"
    assert scripted.aborted == []  # vLLM stopped by itself


def test_concurrent_requests_are_served_together_with_timings(engine_for) -> None:
    engine, _ = engine_for([])
    script = _words(engine.pipeline, " one two three four five six")
    engine, scripted = engine_for(script)
    requests = [Request("A?", (IMAGE,), max_tiles=1), Request("B?"), Request("C?", (IMAGE,))]
    batch = engine.generate_concurrent(requests, max_new_tokens=5, ignore_eos=True)
    assert len(scripted.added) == 3
    assert [r.token_ids for r in batch.results] == [tuple(script[:5])] * 3
    assert all(0 < t.first_token <= t.finished for t in batch.timings)
    assert [t.new_tokens for t in batch.timings] == [5, 5, 5]
    assert batch.aggregate_tokens_per_second > 0 and batch.aggregate_decode_tokens_per_second > 0
    lengths = {len(p["prompt_embeds"]) for p, _ in scripted.added.values()}
    assert len(lengths) == 3  # three different prompts (1 tile, no image, many tiles)


def test_a_second_request_about_the_same_image_reuses_its_features(engine_for) -> None:
    engine, scripted = engine_for([5, 6])
    first = engine.generate("What is it?", [IMAGE], max_new_tokens=2, max_tiles=2)
    first.run()
    second = engine.generate("And its colour?", [IMAGE], max_new_tokens=2, max_tiles=2)
    second.run()
    assert engine.pipeline.feature_cache.stats.hits == 1
    assert second.stage_seconds["vision"] < first.stage_seconds["vision"]
    _, (prompt, _) = scripted.added.values()
    expected = engine.pipeline.decoder_inputs(
        second.prepared.prompt, engine.pipeline.encode_images(second.prepared.tilings)
    ).inputs_embeds[0]
    np.testing.assert_array_equal(prompt["prompt_embeds"].numpy(), expected)


def test_concurrent_answers_end_at_a_stop_string_like_streams(engine_for) -> None:
    engine, _ = engine_for([])
    script = _words(engine.pipeline, " red blue STOP green yellow")
    engine, _ = engine_for(script)
    batch = engine.generate_concurrent([Request("Colours?")], max_new_tokens=20, stop=["STOP"])
    (result,) = batch.results
    streamed = engine.generate("Colours?", max_new_tokens=20, stop=["STOP"]).run()
    assert result.finish_reason == streamed.finish_reason == "stop"
    assert result.text == streamed.text and result.token_ids == streamed.token_ids
