"""KV-cached generation against a mock numpy decoder (nanochat style) and a tiny real tokenizer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nvlm_export.errors import BundleError, InputError, PromptError
from nvlm_export.runtime.generation import (
    GenerateOptions,
    GenerationResult,
    InPlaceKVCache,
    KVCache,
    check_prompt_fits,
    generate,
    prefill,
)
from nvlm_export.runtime.manifest import KVCacheSpec

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 3
PROMPT = "User: what is this?"
ANSWER = "The answer is 42.\nUser: hello"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A tiny byte-level BPE; characters outside its corpus ('€') become one token per byte."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([PROMPT, ANSWER, "Hello world, hello there."] * 20, trainer)
    return tokenizer


class MockDecoder:
    """A deterministic fake decoder following the graph contract.

    The embedding table is the identity, so the fed token is the argmax of its embedding. Logits
    strongly favour `script[cache length - prompt length]` and carry a small ripple that depends on
    the fed token and the cache length, so sampling at high temperature wanders. Keys and values
    store the fed token id, so the final cache spells out exactly what was fed, in order.
    """

    def __init__(self, script: list[int], vocab: int, prompt_length: int) -> None:
        self.script = script
        self.vocab = vocab
        self.prompt_length = prompt_length
        self.steps = 0  # one-token calls after the prefill

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        embeds, positions = feeds["inputs_embeds"], feeds["position_ids"]  # (1, S, V), (1, S)
        past = feeds["past_key_values.0.key"].shape[2]
        seq = embeds.shape[1]
        assert embeds.shape == (1, seq, self.vocab) and positions.dtype == np.int64
        np.testing.assert_array_equal(positions[0], np.arange(past, past + seq))
        if past > 0:
            assert seq == 1, "after the prefill every step must feed exactly one token"
            self.steps += 1
        fed = embeds[0].argmax(axis=-1)  # (S,)
        outputs = {"logits": self._logits(int(fed[-1]), past + seq)[None, :]}  # (1, V)
        new = np.broadcast_to(fed[None, None, :, None], (1, KV_HEADS, seq, HEAD_DIM))
        for layer in range(LAYERS):
            for kind in ("key", "value"):
                old = feeds[f"past_key_values.{layer}.{kind}"]
                assert old.shape == (1, KV_HEADS, past, HEAD_DIM), "cache of the wrong length"
                outputs[f"present.{layer}.{kind}"] = np.concatenate([old, new], axis=2)
        return outputs

    def _logits(self, last_token: int, length: int) -> np.ndarray:
        ripple = np.cos(np.arange(self.vocab) * (last_token + 1) + length)
        logits = ripple.astype(np.float32)
        index = length - self.prompt_length
        if index < len(self.script):
            logits[self.script[index]] += 8.0
        return logits


class Setup:
    """Prompt, prefill and wiring, the way the pipeline does it."""

    def __init__(self, tokenizer: Tokenizer, answer_ids: list[int], capacity: int = 512) -> None:
        self.tokenizer = tokenizer
        self.vocab = tokenizer.get_vocab_size()
        self.prompt_ids = tokenizer.encode(PROMPT).ids
        self.table = np.eye(self.vocab, dtype=np.float32)  # token embeddings (V, D=V)
        self.decoder = MockDecoder(answer_ids, self.vocab, len(self.prompt_ids))
        self.cache = KVCache.empty(LAYERS, KV_HEADS, HEAD_DIM, capacity=capacity)
        prompt_embeds = self.table[np.array([self.prompt_ids])]  # (1, T, D)
        self.first_logits = prefill(self.decoder, prompt_embeds, self.cache)

    def run(
        self, eos_token_ids: tuple[int, ...] = (), **options: object
    ) -> tuple[GenerationResult, list[str]]:
        stream = generate(
            self.decoder,
            self.first_logits,
            cache=self.cache,
            embed=self.table.__getitem__,
            tokenizer=self.tokenizer,
            options=GenerateOptions(**options),  # type: ignore[arg-type]
            eos_token_ids=eos_token_ids,
            prompt_ids=self.prompt_ids,
        )
        texts = [event.text for event in stream]
        assert stream.result is not None
        return stream.result, texts

    def cached_tokens(self) -> list[int]:
        return self.cache.keys[0][0, 0, :, 0].astype(int).tolist()


def eos_id(tokenizer: Tokenizer) -> int:
    return tokenizer.token_to_id("<|im_end|>")


def test_greedy_follows_the_model_and_stops_at_eos(tokenizer: Tokenizer) -> None:
    script = [*tokenizer.encode("The answer is 42.").ids, eos_id(tokenizer)]
    setup = Setup(tokenizer, script)
    result, texts = setup.run(eos_token_ids=(eos_id(tokenizer),))
    assert result.token_ids == tuple(script)
    assert result.text == "The answer is 42." == "".join(texts)
    assert result.finish_reason == "eos"
    # The first token comes from the prefill's logits; every later one costs one decoder step.
    assert setup.decoder.steps == len(script) - 1 == len(result.timings.decode_seconds)
    assert setup.cached_tokens() == setup.prompt_ids + script[:-1]
    assert result.timings.time_to_first_token > 0


def test_stop_string_across_tokens_ends_generation_without_emitting_it(
    tokenizer: Tokenizer,
) -> None:
    script = [*tokenizer.encode(ANSWER).ids, eos_id(tokenizer)]
    stop_tokens = tokenizer.encode("\nUser:").ids
    assert len(stop_tokens) > 1, "the stop string should span several tokens"
    setup = Setup(tokenizer, script)
    result, texts = setup.run(stop=("\nUser:",), eos_token_ids=(eos_id(tokenizer),))
    assert result.finish_reason == "stop"
    assert result.text == "The answer is 42." == "".join(texts)
    assert len(result.token_ids) < len(script) - 1


def test_multibyte_characters_split_over_tokens_stream_whole(tokenizer: Tokenizer) -> None:
    answer = "Hello €5 🙂"
    script = [*tokenizer.encode(answer).ids, eos_id(tokenizer)]
    result, texts = Setup(tokenizer, script).run(eos_token_ids=(eos_id(tokenizer),))
    assert result.text == answer == "".join(texts)
    assert "" in texts[:-1], "some tokens carry only part of a character"
    assert not any("\ufffd" in text for text in texts)


def test_max_new_tokens_limits_the_answer(tokenizer: Tokenizer) -> None:
    script = tokenizer.encode(ANSWER).ids
    setup = Setup(tokenizer, script)
    result, _ = setup.run(max_new_tokens=3)
    assert result.token_ids == tuple(script[:3])
    assert result.finish_reason == "length"
    assert result.text == tokenizer.decode(script[:3])
    assert setup.decoder.steps == 2


def test_the_context_capacity_ends_generation(tokenizer: Tokenizer) -> None:
    script = tokenizer.encode(ANSWER).ids
    prompt_length = len(tokenizer.encode(PROMPT).ids)
    setup = Setup(tokenizer, script, capacity=prompt_length + 4)
    result, _ = setup.run(max_new_tokens=100)
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 4  # prompt + answer fill the capacity exactly
    assert setup.cache.length <= setup.cache.capacity


def test_a_prompt_that_fills_the_context_is_a_prompt_error(tokenizer: Tokenizer) -> None:
    prompt_length = len(tokenizer.encode(PROMPT).ids)
    with pytest.raises(PromptError, match=f"prompt is {prompt_length} tokens long"):
        Setup(tokenizer, [], capacity=prompt_length)
    with pytest.raises(PromptError, match="context holds 10 tokens"):
        check_prompt_fits(10, 10)
    check_prompt_fits(9, 10)


def test_seeded_sampling_is_reproducible_and_seeds_differ(tokenizer: Tokenizer) -> None:
    script = tokenizer.encode(ANSWER).ids

    def sample(seed: int) -> tuple[int, ...]:
        result, _ = Setup(tokenizer, script).run(temperature=6.0, seed=seed, max_new_tokens=12)
        return result.token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1) != tuple(script[:12]), "high temperature should leave the greedy path"


@pytest.mark.parametrize("options", [{"top_k": 1}, {"top_p": 1e-6}])
def test_top_k_one_and_tiny_top_p_equal_greedy(
    tokenizer: Tokenizer, options: dict[str, float]
) -> None:
    script = tokenizer.encode(ANSWER).ids
    greedy, _ = Setup(tokenizer, script).run(max_new_tokens=8)
    sampled, _ = Setup(tokenizer, script).run(temperature=6.0, seed=3, max_new_tokens=8, **options)
    assert sampled.token_ids == greedy.token_ids == tuple(script[:8])


def test_embeddings_come_from_a_memory_mapped_table(tokenizer: Tokenizer, tmp_path: Path) -> None:
    script = [*tokenizer.encode("Hello world").ids, eos_id(tokenizer)]
    setup = Setup(tokenizer, script)
    np.save(tmp_path / "embed_tokens.npy", setup.table)
    setup.table = np.load(tmp_path / "embed_tokens.npy", mmap_mode="r")
    result, _ = setup.run(eos_token_ids=(eos_id(tokenizer),))
    assert result.text == "Hello world"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens 0 is invalid"),
        ({"temperature": -1.0}, "Temperature -1.0 is invalid"),
        ({"top_p": 2.0}, "top_p 2.0 is invalid"),
        ({"stop": ("",)}, "stop string is empty"),
        ({"seed": -1}, "Seed -1 is invalid"),  # numpy raised a ValueError at the first sample
        ({"seed": 2**64}, "from 0 to 18446744073709551615"),  # the C API's uint64_t
        ({"seed": 1.5}, "Seed 1.5 is invalid"),
    ],
)
def test_invalid_generation_config_is_an_input_error(
    config: dict[str, object], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        GenerateOptions(**config)  # type: ignore[arg-type]


def test_cache_rejects_presents_that_do_not_extend_it() -> None:
    cache = KVCache.empty(1, 1, 2, capacity=4)
    grown = {"present.0.key": np.zeros((1, 1, 5, 2)), "present.0.value": np.zeros((1, 1, 5, 2))}
    with pytest.raises(PromptError, match=r"grew to 5 tokens.*holds 4 tokens"):
        cache.update(grown)
    same = {"present.0.key": np.zeros((1, 1, 0, 2)), "present.0.value": np.zeros((1, 1, 0, 2))}
    with pytest.raises(BundleError, match="cache of length 0"):
        cache.update(same)
    assert cache.length == 0


def test_an_in_place_cache_this_machine_cannot_hold_is_one_bundle_error() -> None:
    """A bundle's context sizes each request's whole-context buffers (128 TiB here)."""
    spec = KVCacheSpec(num_layers=2, num_kv_heads=4096, head_dim=8192, max_context=2**20)
    with pytest.raises(BundleError, match="cannot be allocated") as refused:
        InPlaceKVCache(spec)
    assert "GiB of address space" in str(refused.value) and "\n" not in str(refused.value)


def test_cache_layout_and_names_come_from_the_manifest_spec() -> None:
    spec = KVCacheSpec(
        num_layers=3,
        num_kv_heads=2,
        head_dim=4,
        max_context=64,
        dtype="float16",
        past_key="past.{layer}.k",
        past_value="past.{layer}.v",
        present_key="out.{layer}.k",
        present_value="out.{layer}.v",
    )
    cache = KVCache.from_spec(spec)
    feeds = cache.feeds()
    assert sorted(feeds) == sorted(f"past.{i}.{kv}" for i in range(3) for kv in "kv")
    assert feeds["past.2.v"].shape == (1, 2, 0, 4) and feeds["past.2.v"].dtype == np.float16
    presents = {f"out.{i}.{kv}": np.ones((1, 2, 5, 4), np.float16) for i in range(3) for kv in "kv"}
    cache.update(presents)
    assert cache.length == 5 and cache.remaining == 59


def test_keyword_arguments_override_an_options_object_and_are_validated() -> None:
    base = GenerateOptions(temperature=0.7, seed=1, stop=["\n"])
    merged = GenerateOptions.merged(base, {"max_new_tokens": 5})
    assert merged == GenerateOptions(max_new_tokens=5, temperature=0.7, seed=1, stop=("\n",))
    assert GenerateOptions.merged(None, {}) == GenerateOptions()
    with pytest.raises(InputError, match="top_p 0 is invalid"):
        GenerateOptions.merged(base, {"top_p": 0})
    with pytest.raises(TypeError, match="max_tokens"):
        GenerateOptions.merged(base, {"max_tokens": 5})


def test_ignore_eos_generates_through_end_of_turn_tokens(tokenizer: Tokenizer) -> None:
    script = [*tokenizer.encode("Hello").ids, eos_id(tokenizer), *tokenizer.encode(" world").ids]
    result, _ = Setup(tokenizer, script).run(
        eos_token_ids=(eos_id(tokenizer),), ignore_eos=True, max_new_tokens=len(script)
    )
    assert result.token_ids == tuple(script)
    assert result.finish_reason == "length"
