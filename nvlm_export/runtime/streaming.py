"""Text from tokens as they arrive: incremental detokenization and stop strings.

`IncrementalDetokenizer` follows the prefix/read-offset scheme of transformers' and vLLM's
incremental detokenizers: each new token decodes only a short window of recent tokens, so the cost
per token does not grow with the sequence, and text is held back while the window's decoded tail is
U+FFFD (an unfinished multi-byte UTF-8 character whose bytes span several tokens).
`StopStringFilter` holds back text that could still become a stop string. `TextStream` chains both.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

from nvlm_export.errors import InputError

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context, so tokenizers whose decoders treat the first token specially
# (SentencePiece's leading-space strip) decode the first new token as it appears mid-sequence.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of complete text pieces."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Only a short window is kept: ids[:read] is already-emitted left context (decoded for
        # correct spacing and byte merging), ids[read:] is not yet emitted.
        self._ids: list[int] = [int(i) for i in prompt_ids[-PROMPT_CONTEXT_TOKENS:]]
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def add(self, token_id: int) -> str:
        """Text that `token_id` completes; "" while a character is still unfinished."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[: self._read_offset])
        full_text = self._decode(self._ids)
        if full_text.endswith(REPLACEMENT_CHAR) or len(full_text) <= len(prefix_text):
            return ""
        # The unread tokens become the next call's left context; older ones are dropped.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation), even if incomplete."""
        prefix_text = self._decode(self._ids[: self._read_offset])
        full_text = self._decode(self._ids)
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]


class StopStringFilter:
    """Passes text through until a stop string appears; the stop string itself is never emitted.

    Text that could still be the start of a stop string is held back until it either completes
    the stop string or cannot anymore.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise InputError("A stop string is empty", fix="Remove the empty stop string")
        self._stop = tuple(stop)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text that is now safe to emit. Sets `stopped` when a stop string completed."""
        if self.stopped or not self._stop:
            return "" if self.stopped else text
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        keep = self._partial_stop_length(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def _partial_stop_length(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


class TextStream:
    """Token ids in, emit-ready text out, with stop strings applied."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        stop: Sequence[str] = (),
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens
        )
        self._stops = StopStringFilter(stop)

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def add(self, token_id: int) -> str:
        return self._stops.push(self._detokenizer.add(token_id))

    def flush(self) -> str:
        """All remaining text; call once when generation ends for a reason other than a stop."""
        return self._stops.push(self._detokenizer.flush()) + self._stops.flush()
