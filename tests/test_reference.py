"""The PyTorch reference prefills in chunks: same logits as the whole prompt at once, bounded
attention memory for long prompts (export/reference.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from torch import nn

from nvlm_export.defaults import REFERENCE_CHUNK_TOKENS
from nvlm_export.export.architectures import architecture_for_layout
from nvlm_export.export.reference import TorchReference
from nvlm_export.models.checkpoint import load_checkpoint
from nvlm_export.runtime.prompt import PromptTokens, build_prompt
from nvlm_export.runtime.tiling import Tiling, TilingConfig, tile_image

QUESTION = "What is shown in the picture?"
# Image sizes that tile into 1 and 3 tiles with a 1..6 grid (thumbnail included).
ONE_TILE, THREE_TILES = (500, 400), (1920, 1080)


@pytest.fixture(autouse=True)
def _lean() -> None:
    torch.set_num_threads(2)


def request(
    checkpoint: Path, model: nn.Module, size: tuple[int, int]
) -> tuple[PromptTokens, Tiling]:
    """The prompt and tiling the runtime would make for one noise image of `size`."""
    config = model.config
    tiling = TilingConfig(config.vision.image_size, 1, 6, config.use_thumbnail)
    pixels = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    tiled = tile_image(Image.fromarray(pixels), tiling)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    fmt = architecture_for_layout(config.layout).prompt_format
    return build_prompt(tokenizer, fmt, QUESTION, [tiled]), tiled


@contextmanager
def decoder_calls(model: nn.Module) -> Iterator[list[int]]:
    """The number of rows of every call of the decoder's first layer, while inside."""
    rows: list[int] = []
    layer = model.language_model.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[1]))
    try:
        yield rows
    finally:
        handle.remove()


# nvlm-h: its thumbnail's 256 image tokens are in the decoder sequence, so chunks cross them.
@pytest.mark.parametrize("layout", ["nvlm-d", "nvlm-h"])
def test_chunked_reference_gives_the_whole_prompts_logits(
    tiny_checkpoint: Callable[[str], Path], layout: str
) -> None:
    checkpoint = tiny_checkpoint(layout)
    model = load_checkpoint(checkpoint)
    prompt, tiled = request(checkpoint, model, ONE_TILE)
    arch = architecture_for_layout(layout)
    whole = TorchReference(model, arch, chunk_tokens=None).next_token_logits(prompt, [tiled])
    with decoder_calls(model) as rows:
        chunked = TorchReference(model, arch, chunk_tokens=64).next_token_logits(prompt, [tiled])
    length = len(prompt.input_ids)
    assert length > 2 * 64
    assert rows == [64] * (length // 64) + ([length % 64] if length % 64 else [])
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-4 * np.abs(whole).max())
    assert int(np.argmax(chunked)) == int(np.argmax(whole))


def test_long_prompt_is_prefilled_in_chunks_by_default(
    tiny_checkpoint: Callable[[str], Path],
) -> None:
    """Every greedy step recomputes the whole sequence, REFERENCE_CHUNK_TOKENS rows per call."""
    checkpoint = tiny_checkpoint("nvlm-d")
    model = load_checkpoint(checkpoint)
    prompt, tiled = request(checkpoint, model, THREE_TILES)
    reference = TorchReference(model, architecture_for_layout("nvlm-d"))
    length = len(prompt.input_ids)
    assert length > REFERENCE_CHUNK_TOKENS
    with decoder_calls(model) as rows:
        tokens = reference.greedy(prompt, [tiled], max_new_tokens=2)
    assert max(rows) == REFERENCE_CHUNK_TOKENS
    steps = [length + step for step in range(len(tokens))]
    assert sum(rows) == sum(steps)
    assert len(rows) == sum(math.ceil(n / REFERENCE_CHUNK_TOKENS) for n in steps)
