"""The PyTorch reference: what the bundle must compute, asked the same questions.

Used by export validation and `nvlm-export verify`. Its greedy decoding recomputes the whole
sequence at every step, sharing no KV cache with the bundle or between steps, so it checks the
bundle's cache handling independently instead of sharing its assumptions.

Within one step the sequence goes through the decoder in chunks of `REFERENCE_CHUNK_TOKENS`
(`architectures.prefill_in_chunks`), with transformers' own KV cache made for that step alone:
eager attention over a whole 2.4k-token prompt holds [heads, T, T] scores per layer, which made
the PyTorch fp16 reference the peak of fp16 export validation (3.1 GiB on the bench checkpoint,
docs/memory.md); in chunks the scores are [heads, chunk, T]. The logits agree within rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from torch import nn

from nvlm_export.defaults import REFERENCE_CHUNK_TOKENS
from nvlm_export.export.architectures import ArchitectureExport
from nvlm_export.export.vision import VisionGraph
from nvlm_export.runtime.prompt import PromptTokens
from nvlm_export.runtime.tiling import Tiling, TilingConfig


def _memoized(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`forward` that returns the stored output for tiles it has already seen (compared exactly:
    callers build new tensors with equal contents each step, e.g. by concatenating images)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def cached(pixel_values: torch.Tensor) -> torch.Tensor:
        for tiles, output in seen:
            if tiles.shape == pixel_values.shape and torch.equal(tiles, pixel_values):
                return output
        output = forward(pixel_values)
        seen.append((pixel_values, output))
        return output

    return cached


def _tile_by_tile(
    tile_tokens: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[..., torch.Tensor]:
    """`tile_tokens` run on one tile at a time, as the runtime calls the vision graph (tiles are
    encoded independently). Seven tiles at once hold seven sets of InternViT attention maps, about
    1 GB of activations on top of the weights. Tiles are independent, so the model computes the
    same either way; the model keeps the per-tile form."""

    if getattr(tile_tokens, "one_tile_at_a_time", False):
        return tile_tokens  # a second reference on the same model

    def per_tile(pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.cat([tile_tokens(tile[None]) for tile in pixel_values])

    per_tile.one_tile_at_a_time = True  # type: ignore[attr-defined]
    return per_tile


class TorchReference:
    """The model's answers to the runtime's questions. `chunk_tokens`: tokens per decoder call
    when a sequence is prefilled (None: the whole sequence in one call)."""

    def __init__(
        self,
        model: nn.Module,
        arch: ArchitectureExport,
        chunk_tokens: int | None = REFERENCE_CHUNK_TOKENS,
    ) -> None:
        self.model = model.eval()
        self.arch = arch
        self.chunk_tokens = chunk_tokens
        model.vision.tile_tokens = _tile_by_tile(model.vision.tile_tokens)
        self.vision = VisionGraph(model.vision, arch.vision_outputs(model)).eval()
        self.dtype = next(model.parameters()).dtype

    def _tiles(self, tilings: Sequence[Tiling]) -> list[torch.Tensor]:
        return [torch.from_numpy(t.pixel_values).to(self.dtype) for t in tilings]

    @torch.no_grad()
    def vision_outputs(self, tiling: Tiling) -> dict[str, np.ndarray]:
        """The vision graph's outputs for one image, by output name."""
        outputs = self.vision(self._tiles([tiling])[0])
        return {
            name: out.float().numpy() for name, out in zip(self.vision.names, outputs, strict=True)
        }

    @torch.no_grad()
    def next_token_logits(
        self, prompt: PromptTokens, tilings: Sequence[Tiling], generated: Sequence[int] = ()
    ) -> np.ndarray:
        """Logits [V] for the token after the prompt and the `generated` tokens."""
        ids = np.concatenate([prompt.input_ids, np.asarray(generated, dtype=np.int64)])
        token_ids = torch.from_numpy(ids)[None, :]
        logits = self.arch.hooks.reference_logits(
            self.model, prompt, token_ids, self._tiles(tilings), self.chunk_tokens
        )
        return logits.float().numpy()

    def greedy(
        self,
        prompt: PromptTokens,
        tilings: Sequence[Tiling],
        max_new_tokens: int,
        eos_token_ids: Sequence[int] = (),
    ) -> list[int]:
        """Greedy tokens (argmax, first maximum wins), ending with eos if one is produced."""
        generated: list[int] = []
        with self._vision_computed_once():
            for _ in range(max_new_tokens):
                token = int(np.argmax(self.next_token_logits(prompt, tilings, generated)))
                generated.append(token)
                if token in eos_token_ids:
                    break
        return generated

    @contextmanager
    def _vision_computed_once(self) -> Iterator[None]:
        """Within one greedy run every step sees the same tiles: encode them once.

        Only the vision trunk (ViT + pixel shuffle) is memoised; projectors and the decoder still
        recompute the whole sequence each step, which is the point of the check.
        """
        tower = self.model.vision
        encode = tower.tile_tokens
        tower.tile_tokens = _memoized(encode)
        try:
            yield
        finally:
            tower.tile_tokens = encode


# --- the reference image transform, restated independently of the runtime's tiler -----------
# InternVL's `load_image` / `dynamic_preprocess` as written in its model cards, with torch doing
# the ToTensor + Normalize arithmetic (torchvision is not a dependency). `verify` compares the
# runtime's numpy tiler against this, so a bug in one does not hide in both.


def reference_pixel_values(image: Image.Image, config: TilingConfig) -> np.ndarray:
    tiles = _dynamic_preprocess(
        image, config.min_tiles, config.max_tiles, config.tile_size, config.use_thumbnail
    )
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    out = []
    for tile in tiles:
        tile = tile.resize((config.tile_size, config.tile_size), Image.Resampling.BICUBIC)
        tensor = torch.from_numpy(np.array(tile)).permute(2, 0, 1).float().div(255)
        out.append(((tensor - mean) / std).numpy())
    return np.stack(out)


def _find_closest_aspect_ratio(
    aspect_ratio: float, target_ratios: list[tuple[int, int]], width: int, height: int, size: int
) -> tuple[int, int]:
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * size * size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def _dynamic_preprocess(
    image: Image.Image, min_num: int, max_num: int, image_size: int, use_thumbnail: bool
) -> list[Image.Image]:
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    ordered = sorted(target_ratios, key=lambda x: x[0] * x[1])
    cols, rows = _find_closest_aspect_ratio(
        aspect_ratio, ordered, orig_width, orig_height, image_size
    )
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for i in range(cols * rows):
        box = (
            (i % cols) * image_size,
            (i // cols) * image_size,
            ((i % cols) + 1) * image_size,
            ((i // cols) + 1) * image_size,
        )
        tiles.append(resized.crop(box))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles
