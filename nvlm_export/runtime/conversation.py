"""Multi-turn chat about images: `Pipeline.chat()` returns a `Conversation`.

    chat = pipe.chat()
    print(chat.ask("What colour is the shape?", images=["photo.png"]).run().text)
    print(chat.ask("And its shape?").run().text)      # prefills only the new question

Each turn renders the whole conversation in the model's own chat template and asks the pipeline
for an answer, offering the keys/values the conversation kept after its last answer: everything up
to the end of that answer is reused, so a follow-up prefills only its own tokens (and encodes only
its own new images). The answer is therefore exactly what a fresh request with the same history
would give. A turn that is abandoned before its answer ends (a cancel) leaves the conversation as
it was before the turn.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nvlm_export.errors import PromptError
from nvlm_export.runtime.caches import ImageKey, KVState
from nvlm_export.runtime.generation import GenerateOptions, GenerationResult
from nvlm_export.runtime.images import ImageSource
from nvlm_export.runtime.prompt import Message
from nvlm_export.runtime.tiling import Tiling, tile_image

if TYPE_CHECKING:  # the pipeline builds conversations (Pipeline.chat); only its types are used
    from nvlm_export.runtime.pipeline import Pipeline, RequestStream


class Conversation:
    """The turns so far, their images (tiled once) and the keys/values after the last answer."""

    def __init__(
        self, pipeline: Pipeline, *, system: str | None = None, max_tiles: int | None = None
    ) -> None:
        self.pipeline = pipeline
        self.system = system
        self.max_tiles = max_tiles
        self.messages: list[Message] = []
        self._images: list[tuple[Tiling, ImageKey]] = []
        self._state: KVState | None = None

    @property
    def turns(self) -> int:
        """Answered turns so far (each a question and its answer)."""
        return len(self.messages) // 2

    @property
    def num_tokens(self) -> int:
        """Tokens of the conversation so far whose keys/values are kept."""
        return self._state.length if self._state is not None else 0

    def reset(self) -> None:
        """Forget every turn and image (a new conversation with the same settings)."""
        self.messages, self._images, self._state = [], [], None

    def ask(
        self,
        text: str,
        images: Sequence[ImageSource] = (),
        options: GenerateOptions | None = None,
        **overrides: object,
    ) -> RequestStream:
        """Add a user turn (with its own `images`, if any) and stream the answer, generated with
        `options` and keyword overrides as in `Pipeline.generate`. The turn and the answer join
        the conversation when the stream ends; a stream abandoned early adds nothing.

        Raises PromptError, naming the tokens used, when the conversation no longer fits the
        context: nothing is truncated silently.
        """
        started = time.perf_counter()  # time to first token counts tiling and the history
        options = GenerateOptions.merged(options, overrides)
        loaded = [self.pipeline.load_image(image) for image in images]
        new_images = [
            (
                tile_image(image, self.pipeline.tiling, self.max_tiles),
                self.pipeline.image_key(image, self.max_tiles),
            )
            for image in loaded
        ]
        question = Message("user", text, len(new_images))
        prepared = self.pipeline.prepare_chat(
            [*self.messages, question], [*self._images, *new_images], system=self.system
        )
        self._check_fits(prepared.prompt.num_tokens, len(new_images))

        def keep(result: GenerationResult, state: KVState) -> None:
            self.messages += [question, Message("assistant", result.text)]
            self._images += new_images
            self._state = state
            for tiling, _ in self._images:
                tiling.release_pixels()  # their features are cached or in the keys/values

        return self.pipeline.start(
            prepared,
            options,
            start_time=started,
            stages={"prepare": time.perf_counter() - started},
            also_reuse=[self._state] if self._state else [],
            on_finish=keep,
        )

    def _check_fits(self, prompt_tokens: int, new_images: int) -> None:
        capacity = self.pipeline.context_tokens
        if prompt_tokens < capacity:
            return
        fewer_images = ", or ask with fewer or smaller images (--max-tiles)" if new_images else ""
        turns = self.turns
        if not turns:
            raise PromptError(
                f"The question takes {prompt_tokens} of the context's {capacity} tokens",
                why="an answer needs at least one more",
                fix=f"Shorten the question{fewer_images}, or export the bundle with a larger "
                "--max-context",
            )
        raise PromptError(
            f"The conversation is full: {turns} earlier turn{'s' if turns != 1 else ''} and this "
            f"question take {prompt_tokens} of the context's {capacity} tokens",
            why="earlier turns are never dropped or truncated behind your back",
            fix="Start a new conversation (reset(), or /reset in `nvlm-export chat`)"
            + fewer_images
            + ", or export the bundle with a larger --max-context",
        )
