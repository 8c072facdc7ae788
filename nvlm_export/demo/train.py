"""Train the demo model on synthetic visual questions (CPU, minutes) and save it as NVLM-D.

    # the shipped run, two stages (docs/demo.md, The shipped run)
    python -m nvlm_export.demo.train -o STAGE1 --steps 10000 --single-tile-steps 3500 \
        --stop-after 5600 --threads 1
    python -m nvlm_export.demo.train -o DIR --init-from STAGE1 --first-index 11200 \
        --steps 4000 --single-tile-steps 1000 --attention-hint 1 --lr 5e-4 --threads 1

The inputs are exactly what the runtime builds: images tiled by `tile_image`, prompts assembled by
`build_prompt` with the NVLM-D format and the tiny tokenizer. The loss is the cross-entropy of the
answer tokens (the answer and its `<|im_end|>`) only.

All questions about one image share the prompt up to the question text, so each image runs the
ViT once and the decoder once over that shared prefix; the questions then continue from a copy of
its KV cache. This is the same computation as running every full prompt separately (the tests
check it), just several times cheaper.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from nvlm_export.demo import dataset
from nvlm_export.demo.model import (
    DEMO_SHAPE,
    LAYOUT,
    demo_config,
    fused_attention,
    init_for_training,
    load_for_training,
    training_config,
    with_dummy_heads,
)
from nvlm_export.models.checkpoint import DTYPES, load_checkpoint, save_checkpoint
from nvlm_export.models.families.nvlm_d import PROMPT_FORMAT as NVLM_D
from nvlm_export.models.model import VisionLanguageModel, build_model
from nvlm_export.models.tokenizer import EOS_TOKEN, PAD_TOKEN, save_tiny_tokenizer
from nvlm_export.runtime.prompt import build_prompt
from nvlm_export.runtime.tiling import TilingConfig, tile_image


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 500
    images_per_step: int = 2
    lr: float = 1e-3  # 3e-3 learnt the answers more slowly (docs/demo.md, How it got unstuck)
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = dataset.TRAIN_SEED
    threads: int = 2
    log_every: int = 10
    save_every: int = 100
    max_minutes: float | None = None  # stop early (and save) when the wall clock runs out
    stop_after: int | None = None  # stop (and save) after this many steps of the `steps` schedule
    init_from: Path | None = None  # go on training a saved demo checkpoint (a new schedule)
    first_index: int = 0  # first training sample (continue where an earlier run stopped)
    single_tile_steps: int = 0  # a curriculum: the first steps use single-tile images only
    aux_loss: bool = True  # the per-image-token probe loss (see AUX_WEIGHT)
    # Loss weight of the reading answers (a heavier weight alone does not teach reading:
    # docs/demo.md, How it got unstuck).
    read_weight: float = 1.0
    attention_hint: float = 0.0  # weight of the retrieval hint for reading (see AttentionHint)


@dataclass(frozen=True, eq=False)
class EncodedImage:
    """One image's tiles and its questions as token ids, split at the shared prompt prefix."""

    pixel_values: torch.Tensor  # (N, 3, 448, 448)
    prefix_ids: torch.Tensor  # (P,) system turn, user turn start and the image block
    suffix_ids: list[list[int]]  # per question: the rest of its prompt, then the answer tokens
    answer_lengths: list[int]  # the answer tokens at the end of each suffix (with <|im_end|>)
    kinds: list[str]
    token_labels: torch.Tensor  # (N, 256) LABELS index per image token, for the auxiliary loss


def encode_sample(tokenizer: Tokenizer, sample: dataset.Sample) -> EncodedImage:
    """Tile the image (NVLM-D's defaults) and tokenize every question + answer exactly as the
    runtime would."""
    tiled = tile_image(sample.image, TilingConfig())
    prompts = [
        build_prompt(tokenizer, NVLM_D, q.text, [tiled]).input_ids.tolist()
        for q in sample.questions
    ]
    shared = _common_prefix_length(prompts)
    answers = [answer_ids(tokenizer, q.answer) for q in sample.questions]
    return EncodedImage(
        pixel_values=torch.from_numpy(tiled.pixel_values),
        prefix_ids=torch.tensor(prompts[0][:shared]),
        suffix_ids=[p[shared:] + a for p, a in zip(prompts, answers, strict=True)],
        answer_lengths=[len(a) for a in answers],
        kinds=[q.kind for q in sample.questions],
        token_labels=token_labels(sample, tiled.grid, tiled.has_thumbnail),
    )


DIGIT_LABELS_START = dataset.LABELS.index("digit 0")
IGNORE_LABEL = -100  # cross_entropy's ignore_index


def token_labels(sample: dataset.Sample, grid: tuple[int, int], thumbnail: bool) -> torch.Tensor:
    """(tiles, 256): per pixel-shuffled token (a 28x28 px cell of a tile), the object covering
    at least 1/25 of the cell, else background. Tiles are cut like `tile_image` cuts them,
    with nearest-neighbour resizing so class ids never blend."""
    mask = dataset.label_image(sample)
    cols, rows = grid
    size, cell = dataset.TILE, dataset.TILE // 16
    resized = mask.resize((size * cols, size * rows), Image.Resampling.NEAREST)
    tiles = [
        resized.crop(
            ((k % cols) * size, (k // cols) * size, (k % cols + 1) * size, (k // cols + 1) * size)
        )
        for k in range(cols * rows)
    ]
    if thumbnail:
        tiles.append(mask.resize((size, size), Image.Resampling.NEAREST))
    labels = np.zeros((len(tiles), 256), dtype=np.int64)
    for t, tile in enumerate(tiles):
        cells = np.asarray(tile).reshape(16, cell, 16, cell).transpose(0, 2, 1, 3).reshape(256, -1)
        for c, values in enumerate(cells):
            counts = np.bincount(values, minlength=len(dataset.LABELS))
            counts[0] = 0
            if counts.max() >= values.size // 25:
                labels[t, c] = int(counts.argmax())
    if thumbnail:  # the thumbnail shrinks the digit past legibility: nothing to learn there
        thumb = labels[-1]
        thumb[thumb >= DIGIT_LABELS_START] = IGNORE_LABEL
    return torch.from_numpy(labels)


def answer_ids(tokenizer: Tokenizer, answer: str) -> list[int]:
    """The answer's tokens and the end-of-turn token the model must produce to stop."""
    return tokenizer.encode(answer + EOS_TOKEN, add_special_tokens=False).ids


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences) - 1  # every suffix keeps at least one prompt token
    for i in range(length):
        if any(s[i] != first[i] for s in sequences):
            return i
    return length


def answer_loss(
    model: VisionLanguageModel,
    encoded: EncodedImage,
    pad_id: int,
    probe: torch.nn.Module | None = None,
    probe_score: ProbeScore | None = None,
    kind_weights: dict[str, float] | None = None,
    hint_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over all answer tokens of one image, and which first tokens are right.

    ViT once, decoder once over the shared prefix, then every question's suffix from a copy of
    the prefix's KV cache. `kind_weights` scales the loss of some question kinds (default 1);
    `hint_weight` adds the retrieval hint for the reading question (AttentionHint).
    """
    lm = model.language_model
    features = model.image_features(encoded.pixel_values)  # (N, 256, D)
    prefix = model.embed_tokens(encoded.prefix_ids[None])  # (1, P, D)
    slots = (encoded.prefix_ids == model.image_token_id)[None, :, None]
    prefix = prefix.masked_scatter(slots, features.reshape(-1, features.shape[-1]))
    cache = DynamicCache(config=lm.config)
    lm.model(inputs_embeds=prefix, cache=cache, use_cache=True)
    questions = len(encoded.suffix_ids)
    cache.batch_repeat_interleave(questions)
    width = max(len(s) for s in encoded.suffix_ids)
    suffix = torch.full((questions, width), pad_id, dtype=torch.long)
    for row, ids in enumerate(encoded.suffix_ids):
        suffix[row, : len(ids)] = torch.tensor(ids)
    # Right padding: padded positions come after every answer token, so causality hides them.
    hint = reading_hint(model, encoded) if hint_weight else None
    with hinting(lm, hint):
        hidden = lm.model(inputs_embeds=model.embed_tokens(suffix), cache=cache).last_hidden_state
    rows, cols, targets, first, weights = [], [], [], [], []
    answers = zip(encoded.suffix_ids, encoded.answer_lengths, encoded.kinds, strict=True)
    for row, (ids, n, kind) in enumerate(answers):
        start = len(ids) - n  # first answer token; it is predicted from the position before it
        first.append(len(targets))
        for j in range(n):
            rows.append(row)
            cols.append(start - 1 + j)
            targets.append(ids[start + j])
            weights.append((kind_weights or {}).get(kind, 1.0))
    logits = lm.lm_head(hidden[rows, cols])  # (answer tokens, vocab)
    target = torch.tensor(targets)
    per_token = F.cross_entropy(logits.float(), target, reduction="none")
    loss = (per_token * torch.tensor(weights)).sum()
    first_right = (logits[first].argmax(-1) == target[first]).detach()
    if probe is not None:
        loss = loss + AUX_WEIGHT * aux_loss(probe, features, encoded.token_labels, probe_score)
    if hint is not None and hint.loss is not None:
        loss = loss + hint_weight * hint.loss
        if probe_score is not None:
            probe_score.hint.append(float(torch.exp(-hint.loss.detach())))
    return loss, first_right


# The retrieval hint: -log(the attention one head of the last layer pays to the digit's token, at
# the position that answers the reading question). Reading hangs on that one token among
# 256-1792, which the decoder's attention starts by weighting ~1/N, so the answer's gradient
# barely reaches the keys and queries that would single it out (docs/demo.md, How it got unstuck).
# Like the probe it only shapes training: model and export are unchanged.
HINT_HEAD = 0
_HINTED_ATTENTION = "demo_hinted_sdpa"


@dataclass(eq=False)
class AttentionHint:
    layer: int  # the decoder layer whose head is hinted
    row: int  # the reading question's row in the suffix batch
    column: int  # its query position that predicts the first answer token
    visible_keys: int  # keys that position sees (prefix + suffix up to itself)
    targets: torch.Tensor  # key positions of the digit's image token(s)
    loss: torch.Tensor | None = None


def reading_hint(model: VisionLanguageModel, encoded: EncodedImage) -> AttentionHint | None:
    if "read" not in encoded.kinds:
        return None
    row = encoded.kinds.index("read")
    column = len(encoded.suffix_ids[row]) - encoded.answer_lengths[row] - 1
    slots = torch.nonzero(encoded.prefix_ids == model.image_token_id).flatten()
    targets = slots[encoded.token_labels.reshape(-1) >= DIGIT_LABELS_START]
    if len(targets) == 0:
        return None
    layers = model.language_model.config.num_hidden_layers
    return AttentionHint(layers - 1, row, column, len(encoded.prefix_ids) + column + 1, targets)


_active_hint: AttentionHint | None = None


@contextlib.contextmanager
def hinting(lm: torch.nn.Module, hint: AttentionHint | None) -> Iterator[None]:
    """Run the decoder with attention that records `hint.loss` (sdpa otherwise unchanged)."""
    global _active_hint
    if hint is None:
        yield
        return
    previous = lm.config._attn_implementation
    _active_hint, lm.config._attn_implementation = hint, _HINTED_ATTENTION
    try:
        yield
    finally:
        _active_hint, lm.config._attn_implementation = None, previous


def _hinted_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, heads, Q, D), rotated
    key: torch.Tensor,  # (B, kv heads, K, D), rotated, with the cache
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    hint = _active_hint
    if hint is not None and module.layer_idx == hint.layer:
        group = query.shape[1] // key.shape[1]
        q = query[hint.row, HINT_HEAD, hint.column]  # (D,)
        k = key[hint.row, HINT_HEAD // group, : hint.visible_keys]  # (K, D)
        log_weights = torch.log_softmax((k @ q) * module.scaling, dim=-1)
        hint.loss = -torch.logsumexp(log_weights[hint.targets], dim=0)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_HINTED_ATTENTION, _hinted_sdpa)
AttentionMaskInterface.register(_HINTED_ATTENTION, sdpa_mask)


# The auxiliary loss: a linear probe on every image token predicts what the token shows (colour +
# shape, digit, background). It only speeds up learning what the image tokens must carry; the
# probe is not part of the model and is not saved. Background tokens, the vast majority, count less.
AUX_WEIGHT = 4.0
BACKGROUND_WEIGHT = 0.05


def new_probe(model: VisionLanguageModel) -> torch.nn.Module:
    return torch.nn.Linear(model.config.llm_hidden_size, len(dataset.LABELS))


def aux_loss(
    probe: torch.nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    score: ProbeScore | None = None,
) -> torch.Tensor:
    weights = torch.ones(len(dataset.LABELS))
    weights[0] = BACKGROUND_WEIGHT
    logits = probe(features.reshape(-1, features.shape[-1]))  # (N*256, classes)
    if score is not None:
        score.add(logits.detach().argmax(-1), labels.reshape(-1))
    return F.cross_entropy(logits, labels.reshape(-1), weight=weights, ignore_index=IGNORE_LABEL)


# What each LABELS index is: (shape, colour) for shape cells, the digit for digit cells.
_LABEL_SHAPE = [next((s for s in dataset.SHAPES if s in name), "") for name in dataset.LABELS]
_LABEL_COLOR = [next((c for c in dataset.COLORS if c in name), "") for name in dataset.LABELS]
_LABEL_DIGIT = [name.removeprefix("digit ") if "digit" in name else "" for name in dataset.LABELS]


@dataclass
class ProbeScore:
    """How well the auxiliary probe reads the image tokens, per true shape, and for colour and
    digits: whether the ViT encodes what the answers need, long before the answers show it."""

    right: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    hint: list[float] = field(default_factory=list)  # the hinted head's weight on the digit

    def add(self, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        for want, got in zip(labels.tolist(), predicted.tolist(), strict=True):
            if want == IGNORE_LABEL:
                continue
            if _LABEL_SHAPE[want]:
                self._count(_LABEL_SHAPE[want], _LABEL_SHAPE[got] == _LABEL_SHAPE[want])
                self._count("color", _LABEL_COLOR[got] == _LABEL_COLOR[want])
            elif _LABEL_DIGIT[want]:
                self._count("digit", got == want)

    def _count(self, row: str, right: bool) -> None:
        self.right[row] = self.right.get(row, 0) + int(right)
        self.total[row] = self.total.get(row, 0) + 1

    def summary(self) -> str:
        rows = (*dataset.SHAPES, "color", "digit")
        scores = [
            f"{row} {self.right.get(row, 0) / self.total[row]:.2f}"
            for row in rows
            if self.total.get(row)
        ]
        if self.hint:
            scores.append(f"hint attention {np.mean(self.hint):.2f}")
        return " ".join(scores)


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


def new_model(tokenizer: Tokenizer, seed: int) -> VisionLanguageModel:
    """A freshly initialised demo model in training form (no dummy heads)."""
    torch.manual_seed(seed)
    config = demo_config(
        tokenizer.get_vocab_size(),
        tokenizer.token_to_id(NVLM_D.placeholder_token),
        tokenizer.token_to_id(EOS_TOKEN),
    )
    model = build_model(training_config(config))
    init_for_training(model, seed)
    return model


def train(output: Path, settings: TrainSettings = TrainSettings()) -> dict[str, float]:
    """Train, then save the NVLM-D checkpoint (with tokenizer) to `output`; returns a summary."""
    torch.set_num_threads(settings.threads)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tiny_tokenizer(output, LAYOUT)
    pad_id = tokenizer.token_to_id(PAD_TOKEN)
    model = new_model(tokenizer, settings.seed)
    if settings.init_from is not None:
        model = load_for_training(load_checkpoint(settings.init_from))
    model.train()
    probe = new_probe(model) if settings.aux_loss else None
    parameters = list(model.parameters()) + (list(probe.parameters()) if probe else [])
    optimizer = torch.optim.AdamW(
        parameters, lr=settings.lr, betas=(0.9, 0.98), weight_decay=settings.weight_decay
    )
    start = time.perf_counter()
    recent: list[tuple[float, int, int]] = []  # (loss, answer tokens, first tokens right)
    probe_score = ProbeScore()
    index, steps_done = settings.first_index, 0
    with fused_attention(model):
        for step in range(settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, settings)
            batch = []
            for _ in range(settings.images_per_step):
                kind = dataset.IMAGE_KINDS[0] if step < settings.single_tile_steps else None
                sample = dataset.make_sample(settings.seed, index, kind)
                batch.append(encode_sample(tokenizer, sample))
                index += 1
            tokens = sum(sum(e.answer_lengths) for e in batch)
            optimizer.zero_grad(set_to_none=True)
            step_loss, right, asked = 0.0, 0, 0
            for encoded in batch:
                loss, first_right = answer_loss(
                    model,
                    encoded,
                    pad_id,
                    probe,
                    probe_score,
                    {"read": settings.read_weight},
                    settings.attention_hint,
                )
                (loss / tokens).backward()  # per-image backward keeps one image's graph alive
                step_loss += float(loss.detach())
                right += int(first_right.sum())
                asked += len(first_right)
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
            optimizer.step()
            recent.append((step_loss / tokens, right, asked))
            if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
                _log(step + 1, settings, recent, time.perf_counter() - start, probe_score)
                recent, probe_score = [], ProbeScore()
            if (step + 1) % settings.save_every == 0 and step + 1 < settings.steps:
                save_demo(model, output)
            steps_done = step + 1
            if steps_done == settings.stop_after:
                break
            if settings.max_minutes and time.perf_counter() - start > 60 * settings.max_minutes:
                print(f"time budget reached after {steps_done} steps", flush=True)
                break
    seconds = time.perf_counter() - start
    save_demo(model, output)
    return {"steps": steps_done, "images": index - settings.first_index, "seconds": seconds}


def save_demo(trained: VisionLanguageModel, output: Path) -> list[Path]:
    """Pad the dummy heads back in and write the checkpoint in the NVLM-D layout (bf16)."""
    stored = with_dummy_heads(trained, DEMO_SHAPE.vision.num_dummy_heads).eval()
    dtype = DTYPES[DEMO_SHAPE.dtype]
    return save_checkpoint(stored, output, LAYOUT, dtype, DEMO_SHAPE.max_shard_bytes)


def _log(
    step: int,
    settings: TrainSettings,
    recent: list[tuple[float, int, int]],
    seconds: float,
    probe_score: ProbeScore,
) -> None:
    loss = float(np.mean([r[0] for r in recent]))
    accuracy = sum(r[1] for r in recent) / max(1, sum(r[2] for r in recent))
    probe = f"  probe: {probe_score.summary()}" if probe_score.total else ""
    print(
        f"step {step}/{settings.steps}  loss {loss:.3f}  first-token acc {accuracy:.2f}  "
        f"lr {lr_at(step - 1, settings):.2e}  {seconds / step:.2f} s/step  {seconds / 60:.1f} min"
        f"{probe}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help="checkpoint directory")
    defaults = TrainSettings()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--images-per-step", type=int, default=defaults.images_per_step)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument(
        "--stop-after", type=int, default=None, help="stop after N steps of the --steps schedule"
    )
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--init-from", type=Path, default=None, help="continue from a checkpoint")
    parser.add_argument("--first-index", type=int, default=0, help="first training sample")
    parser.add_argument(
        "--single-tile-steps", type=int, default=0, help="first steps on single-tile images only"
    )
    parser.add_argument(
        "--no-aux-loss", dest="aux_loss", action="store_false", help="answer tokens only"
    )
    parser.add_argument(
        "--read-weight", type=float, default=defaults.read_weight, help="loss weight of reading"
    )
    parser.add_argument(
        "--attention-hint",
        type=float,
        default=defaults.attention_hint,
        help="weight of the retrieval hint for reading (0: off)",
    )
    arguments = vars(parser.parse_args(argv))
    output = arguments.pop("output")
    settings = TrainSettings(**arguments)  # every other option is named after its setting
    summary = train(output, settings)
    print(
        f"trained {summary['steps']} steps on {summary['images']} images in "
        f"{summary['seconds'] / 60:.1f} min; saved to {output}"
    )


if __name__ == "__main__":
    main()
