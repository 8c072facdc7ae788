"""Streaming text: whole characters only, stop strings held back and cut, bounded decode cost."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nvlm_export.errors import InputError
from nvlm_export.runtime.streaming import IncrementalDetokenizer, StopStringFilter, TextStream

CORPUS = ["The answer is 42.", "Hello world, hello there.", "User: what is this?"] * 20


def byte_level_tokenizer() -> Tokenizer:
    """A tiny Qwen2-like byte-level BPE; characters outside the corpus become single bytes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return byte_level_tokenizer()


def stream_pieces(stream: TextStream | IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    return [stream.add(i) for i in ids] + [stream.flush()]


def test_streamed_pieces_rebuild_the_text_exactly(tokenizer: Tokenizer) -> None:
    text = "Hello wörld, naïve café for 5€ 🙂 — done."
    ids = tokenizer.encode(text).ids
    pieces = stream_pieces(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_a_multibyte_character_is_held_until_its_last_byte(tokenizer: Tokenizer) -> None:
    euro = tokenizer.encode("€").ids
    assert len(euro) == 3, "the test needs '€' split into its three UTF-8 bytes"
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.add(i) for i in tokenizer.encode("Hello").ids] == ["Hello"]
    assert [detokenizer.add(i) for i in euro] == ["", "", "€"]


def test_flush_releases_an_unfinished_character(tokenizer: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.add(tokenizer.encode("€").ids[0]) == ""
    assert detokenizer.flush() == "\ufffd"


def test_special_tokens_are_not_streamed(tokenizer: Tokenizer) -> None:
    ids = [*tokenizer.encode("Hello").ids, tokenizer.token_to_id("<|im_end|>")]
    assert "".join(stream_pieces(IncrementalDetokenizer(tokenizer), ids)) == "Hello"


class CountingTokenizer:
    """Records how many ids each decode call sees."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decode_cost_per_token_does_not_grow_with_the_sequence(tokenizer: Tokenizer) -> None:
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode("Hello world, hello there. " * 200).ids
    prompt = tokenizer.encode("User: what is this?").ids
    pieces = stream_pieces(IncrementalDetokenizer(counting, prompt_ids=prompt), ids)  # type: ignore[arg-type]
    assert "".join(pieces) == "Hello world, hello there. " * 200
    assert len(ids) > 500 and max(counting.lengths) <= 6


def test_stop_string_split_across_tokens_is_cut_and_never_emitted(tokenizer: Tokenizer) -> None:
    text = "The answer is 42.\nUser: what is this?"
    ids = tokenizer.encode(text).ids
    stream = TextStream(tokenizer, stop=["\nUser:"])
    emitted = []
    for token_id in ids:
        emitted.append(stream.add(token_id))
        if stream.stopped:
            break
    assert "".join(emitted) == "The answer is 42."
    assert stream.stopped and stream.flush() == ""
    assert len(emitted) < len(ids)
    assert all("\n" not in piece for piece in emitted), "a possible stop prefix leaked"


def test_text_that_only_looked_like_a_stop_string_is_released() -> None:
    stops = StopStringFilter(["STOP"])
    assert stops.push("a ST") == "a "
    assert stops.push("A") == "STA"  # "STA" can no longer become "STOP"
    assert not stops.stopped


def test_held_text_is_released_when_the_stop_string_fails() -> None:
    stops = StopStringFilter(["STOP", "END"])
    assert stops.push("x S") == "x "
    assert stops.push("T") == ""
    assert stops.push("AR") == "STAR"
    assert stops.push(" EN") == " "
    assert stops.flush() == "EN"
    assert not stops.stopped


def test_the_earliest_of_several_stop_strings_wins() -> None:
    stops = StopStringFilter(["world", "lo"])
    assert stops.push("hello world") == "hel"
    assert stops.stopped
    assert stops.push("more") == ""


def test_an_empty_stop_string_is_rejected() -> None:
    with pytest.raises(InputError, match="stop string is empty"):
        StopStringFilter([""])
