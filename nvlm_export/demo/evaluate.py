"""Held-out exact-match accuracy of the demo model, per question type, for any model form.

An `Answerer` maps (image, question, tile budget) to the answer text; there is one for a PyTorch
checkpoint (`TorchAnswerer`, needs the export extra) and one for any bundle (`BundleAnswerer`, the
runtime `Pipeline`: fp32, fp16 or quantized alike). `evaluate` asks every held-out question with
the default tiling, and the reading questions of multi-tile images once more with `max_tiles=1`
(the whole image squeezed into one 448 tile, i.e. the thumbnail's view), which shows what the
high-resolution tiles are worth.

Both answerers run the vision encoder once per image (not once per question); answers are the
same either way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from nvlm_export.demo.dataset import KINDS, Sample
from nvlm_export.runtime.backends import DEFAULT_BACKEND
from nvlm_export.runtime.tiling import Tiling, tile_image

if TYPE_CHECKING:
    import torch

    from nvlm_export.models.model import VisionLanguageModel

Answerer = Callable[[Image.Image, str, "int | None"], str]
MAX_NEW_TOKENS = 4  # answers are one word or digit (+ <|im_end|>)

# Report rows beyond the question kinds: reading on multi-tile images, default vs one tile.
READ_TILED = "read, multi-tile images"
READ_ONE_TILE = "read, multi-tile images, max_tiles=1"
ROWS = (*KINDS, READ_TILED, READ_ONE_TILE)


@dataclass
class Score:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def add(self, right: bool) -> None:
        self.correct += int(right)
        self.total += 1


@dataclass
class EvalReport:
    """Accuracy per row of ROWS, plus a few wrong answers to look at."""

    scores: dict[str, Score] = field(default_factory=lambda: {row: Score() for row in ROWS})
    mistakes: list[tuple[int, str, str, str]] = field(default_factory=list)  # index, q, want, got

    def accuracy(self, row: str) -> float:
        return self.scores[row].accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            row: {"correct": s.correct, "total": s.total, "accuracy": s.accuracy}
            for row, s in self.scores.items()
        }

    def lines(self) -> list[str]:
        return [
            f"{row:<40} {s.accuracy * 100:6.1f}%  ({s.correct}/{s.total})"
            for row, s in self.scores.items()
            if s.total
        ]


def evaluate(
    answer: Answerer, held_out: Iterable[Sample], *, keep_mistakes: int = 20
) -> EvalReport:
    """Exact-match accuracy of `answer` on every question of every sample."""
    report = EvalReport()
    for sample in held_out:
        multi_tile = sample.image_kind.tiles > 1
        for question in sample.questions:
            got = answer(sample.image, question.text, None)
            right = got.strip() == question.answer
            report.scores[question.kind].add(right)
            if question.kind == "read" and multi_tile:
                report.scores[READ_TILED].add(right)
                one_tile = answer(sample.image, question.text, 1)
                report.scores[READ_ONE_TILE].add(one_tile.strip() == question.answer)
            if not right and len(report.mistakes) < keep_mistakes:
                report.mistakes.append((sample.index, question.text, question.answer, got))
    return report


def _key(tiling: Tiling) -> str:
    return hashlib.sha1(tiling.pixel_values.tobytes()).hexdigest()


class BundleAnswerer:
    """Greedy answers from an exported bundle through the runtime pipeline (no PyTorch); the
    pipeline's feature cache encodes each image once for all its questions."""

    def __init__(self, bundle: Path, backend: str = DEFAULT_BACKEND, **options: object) -> None:
        from nvlm_export.runtime.pipeline import Pipeline

        self.pipeline = Pipeline.load(bundle, backend=backend, **options)

    def __call__(self, image: Image.Image, question: str, max_tiles: int | None) -> str:
        stream = self.pipeline.generate(
            question, images=[image], max_new_tokens=MAX_NEW_TOKENS, max_tiles=max_tiles
        )
        return stream.run().text


class TorchAnswerer:
    """Greedy answers from the PyTorch model, with the runtime's tiling and prompt assembly."""

    def __init__(self, model: VisionLanguageModel, tokenizer_file: Path) -> None:
        from tokenizers import Tokenizer

        config = model.config
        self.model = model.eval()
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.eos_id = int(config.llm_config["eos_token_id"])
        self.tiling = config.tiling()
        self._features: tuple[str, torch.Tensor] | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: Path) -> TorchAnswerer:
        from nvlm_export.models.checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint)
        return cls(model, Path(checkpoint) / "tokenizer.json")  # type: ignore[arg-type]

    def __call__(self, image: Image.Image, question: str, max_tiles: int | None) -> str:
        import torch
        from transformers import DynamicCache

        from nvlm_export.models.families import nvlm_d
        from nvlm_export.runtime.prompt import build_prompt

        tiled = tile_image(image.convert("RGB"), self.tiling, max_tiles)
        prompt = build_prompt(self.tokenizer, nvlm_d.PROMPT_FORMAT, question, [tiled])
        lm = self.model.language_model
        with torch.no_grad():
            features = self._vision(tiled)  # (N, 256, D)
            embeds = self.model.embed_tokens(torch.from_numpy(prompt.input_ids)[None])
            embeds[0, torch.from_numpy(prompt.decoder_feature_positions)] = features.reshape(
                -1, embeds.shape[-1]
            )
            cache = DynamicCache(config=lm.config)
            logits = lm(inputs_embeds=embeds, cache=cache, use_cache=True).logits[0, -1]
            answer: list[int] = []
            for _ in range(MAX_NEW_TOKENS):
                token = int(logits.argmax())
                if token == self.eos_id:
                    break
                answer.append(token)
                step = self.model.embed_tokens(torch.tensor([[token]]))
                logits = lm(inputs_embeds=step, cache=cache, use_cache=True).logits[0, -1]
        return self.tokenizer.decode(answer)

    def _vision(self, tiled: Tiling) -> torch.Tensor:
        import torch

        key = _key(tiled)
        if self._features is None or self._features[0] != key:
            pixels = torch.from_numpy(np.ascontiguousarray(tiled.pixel_values))
            self._features = (key, self.model.image_features(pixels))
        return self._features[1]
