"""Prompt assembly: a question and tiled images -> token ids, feature positions, cross masks.

One `PromptFormat` per architecture family (declared in its module under `models/families/`)
says everything the assembly needs as plain JSON data (it is stored in the bundle manifest): the
chat template, the image token strings, the tile tags, tokens per tile and the name of an
`ImageLayout`. The four layouts differ only in where an image's
tiles go — into the decoder's token sequence (NVLM-D, InternVL), into the cross-attention key/value
sequence (NVLM-X), or the thumbnail into the decoder and the regular tiles into cross-attention
(NVLM-H) — and each is declared once, as data, in `IMAGE_LAYOUTS`.

User text is data. The prompt is assembled from `TextPiece`s that say who wrote them: the chat
template's parts and the image blocks are trusted, so their special-token strings become control and
image ids; the question, the system message and earlier answers are not, and no added token is
recognised in them (`<|im_end|>` typed by a user is just characters). Only a question's (or a raw
prompt's) `<image>` markers stand for images: the same characters in a system message or in an
answer the model wrote are text. A `raw` prompt is trusted as a whole.

The prompt is tokenized as one text, split only at the trusted added tokens (which the tokenizer
splits at anyway), because byte-level BPE merges across tag boundaries ("<Image><tile_1>" gives
"<Image", "><", "tile", ...); the tokenizer's character offsets then map tags to tokens, and visual
slots are found by the placeholder token id.

Tile indices follow the tiling order: regular tiles 0..n-2, then the thumbnail n-1 (a single-tile
image has only tile 0). Torch-free: numpy and tokenizers only.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Protocol

import numpy as np
from tokenizers import Tokenizer

from nvlm_export.errors import BundleError, PromptError, check_choice

Slot = tuple[int, int]  # (image index, tile index)


class TiledImage(Protocol):
    """What prompt assembly needs to know about one image (the tiler's result has both)."""

    @property
    def num_tiles(self) -> int: ...

    @property
    def has_thumbnail(self) -> bool: ...


@dataclass(frozen=True)
class TextPiece:
    """A run of prompt text, whether its author is trusted and whether it places images.

    Trusted pieces (the chat template's own parts, image blocks, a `raw` prompt) may contain
    special-token strings that become control or image ids. Untrusted pieces (prompt text, system
    messages, earlier answers: anything a user typed or a model wrote) are data: no added token is
    recognised in them. `image_markers`: each `<image>` in the piece is replaced by the next
    image's block (questions and raw prompts); elsewhere `<image>` is plain text.
    """

    text: str
    trusted: bool
    image_markers: bool = False


def template_text(text: str) -> TextPiece:
    """Text written by the chat template or the bundle author: special tokens are honoured."""
    return TextPiece(text, trusted=True)


def user_text(text: str) -> TextPiece:
    """Text a user supplied: tokenized as plain characters, never as control or image tokens."""
    return TextPiece(text, trusted=False)


def question_text(text: str) -> TextPiece:
    """A user's question: data like `user_text`, whose `<image>` markers place its images."""
    return TextPiece(text, trusted=False, image_markers=True)


# What a turn's text is, by role: only questions place images; a system message and an answer
# the model wrote (which may well say "<image>") are plain data.
_TURN_TEXT = {"system": user_text, "user": question_text, "assistant": user_text}


@dataclass(frozen=True)
class ChatTemplate:
    """An MPT-style chatml conversation: every turn is `turn_prefix` + text + `turn_end`.

    The system turn is always present (with `default_system` unless overridden); the prompt ends
    with the assistant's turn prefix so the model writes the answer next.
    """

    default_system: str
    turn_end: str
    turn_prefix: str = "<|im_start|>{role}\n"

    def turn(self, role: str, text: str) -> list[TextPiece]:
        """One turn: the template's prefix and end around `text`, which is data."""
        return [self.start(role), _TURN_TEXT[role](text), template_text(self.turn_end)]

    def start(self, role: str) -> TextPiece:
        """The opening of a `role` turn (the prompt ends with the assistant's)."""
        return template_text(self.turn_prefix.replace("{role}", role))

    def pieces(self, question: str, system: str | None = None) -> list[TextPiece]:
        """The whole single-turn prompt: system turn, user turn, then the assistant's opening."""
        return self.conversation([Message("user", question)], system)

    def conversation(
        self, messages: Sequence[Message], system: str | None = None
    ) -> list[TextPiece]:
        """System turn, every message's turn in order, then the assistant's opening. Earlier
        answers are data like the questions: they never produce control tokens."""
        system_message = self.default_system if system is None else system
        turns = [self.turn("system", system_message)]
        turns += [self.turn(message.role, message.text) for message in messages]
        return [*(piece for turn in turns for piece in turn), self.start("assistant")]

    def render(self, question: str, system: str | None = None) -> str:
        return "".join(piece.text for piece in self.pieces(question, system))


@dataclass(frozen=True)
class Message:
    """One turn of a conversation. `images` of the request's images (in order) belong to it;
    a user turn without `<image>` markers gets one per image prepended, as a single question."""

    role: Literal["user", "assistant"]
    text: str
    images: int = 0


@dataclass(frozen=True)
class ImageLayout:
    """Where one image's tiles go. Generic assembly code asks these fields, never the arch name.

    text_tiles:  which tiles are written into the decoder text — "all", or only the "global" one
                 (the thumbnail, or the only tile of a single-tile image).
    text_tags:   each tile in the text is preceded by its tag ("<tile_1>", ...).
    text_pads:   each tile in the text carries `tokens_per_tile` placeholders that its features
                 overwrite (a decoder feature slot).
    cross_tiles: which tiles form the cross-attention key/value sequence — "none", "all", or
                 "regular" (all but the global tile).
    cross_tags:  each cross tile's visual slots are preceded by its tag's token ids.
    tag_rows_see_own_tile: a token of a tile tag in the text attends only to that tile's visual
                 slots; other tokens attend to every image that started at or before them.
    """

    kind: str
    text_tiles: Literal["all", "global"]
    text_tags: bool
    text_pads: bool
    cross_tiles: Literal["none", "all", "regular"]
    cross_tags: bool = False
    tag_rows_see_own_tile: bool = False


IMAGE_LAYOUTS: dict[str, ImageLayout] = {
    layout.kind: layout
    for layout in (
        ImageLayout("tile_tags", "all", text_tags=True, text_pads=True, cross_tiles="none"),
        ImageLayout("img_context", "all", text_tags=False, text_pads=True, cross_tiles="none"),
        ImageLayout(
            "cross_tile_tags",
            "all",
            text_tags=True,
            text_pads=False,
            cross_tiles="all",
            tag_rows_see_own_tile=True,
        ),
        ImageLayout(
            "hybrid",
            "global",
            text_tags=True,
            text_pads=True,
            cross_tiles="regular",
            cross_tags=True,
        ),
    )
}


@dataclass(frozen=True)
class PromptFormat:
    """One architecture family's prompt conventions, as plain JSON data for the bundle manifest."""

    name: str
    image_layout: str  # a key of IMAGE_LAYOUTS
    chat: ChatTemplate
    placeholder_token: str  # visual-slot token: decoder positions and cross key/value slots
    image_start: str
    image_end: str
    tile_tag: str = "<tile_{index}>"  # regular tile k (0-based) is tagged with index k + 1
    thumbnail_tag: str = "<tile_global_thumbnail>"
    tokens_per_tile: int = 256
    image_marker: str = "<image>"
    eos_token: str = "<|im_end|>"

    def __post_init__(self) -> None:
        per_tile = self.tokens_per_tile
        if isinstance(per_tile, bool) or not isinstance(per_tile, int) or per_tile < 1:
            raise BundleError(
                f"The prompt format's tokens_per_tile {per_tile!r} is not a positive integer",
                fix="Re-export the bundle with this version of nvlm-export",
            )
        check_choice(
            self.image_layout,
            IMAGE_LAYOUTS,
            "image layout",
            BundleError,
            fix="Re-export the bundle with this version of nvlm-export",
        )

    @property
    def layout(self) -> ImageLayout:
        return IMAGE_LAYOUTS[self.image_layout]

    def tag(self, tile: int, num_tiles: int) -> str:
        # As in NVLM-D's reference code: the last tile is always the global one.
        if tile == num_tiles - 1:
            return self.thumbnail_tag
        return self.tile_tag.replace("{index}", str(tile + 1))  # data, not a format string

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # read back, keys and types checked, by runtime/manifest.py


@dataclass(frozen=True, eq=False)
class PromptTokens:
    """Everything the decoder needs about one prompt, as token ids and positions (T tokens).

    decoder_feature_slots[k] = (image, tile) whose features overwrite the input embeddings at
    decoder_feature_positions[k * tokens_per_tile : (k + 1) * tokens_per_tile].
    The cross-attention key/value sequence has K entries: cross_token_ids holds the placeholder id
    at visual slots and tag token ids (NVLM-H) elsewhere; cross_feature_slots[k] fills
    cross_feature_positions[k * tokens_per_tile : ...]. cross_attention_mask[t, k] says whether
    decoder token t may attend to entry k; fully masked rows are expected (text before any image).
    """

    text: str
    input_ids: np.ndarray  # int64 [T]
    decoder_feature_slots: tuple[Slot, ...]
    decoder_feature_positions: np.ndarray  # int64 [tokens_per_tile * len(decoder_feature_slots)]
    cross_token_ids: np.ndarray  # int64 [K]
    cross_feature_slots: tuple[Slot, ...]
    cross_feature_positions: np.ndarray  # int64 [tokens_per_tile * len(cross_feature_slots)]
    cross_attention_mask: np.ndarray  # bool [T, K]
    image_start_tokens: np.ndarray  # int64 [images]: from here on tokens depend on each image

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class _TagSpan:
    start: int  # character span of a tile tag in the prompt text
    end: int
    slot: Slot


@dataclass(frozen=True)
class _PromptText:
    pieces: tuple[TextPiece, ...]
    image_starts: tuple[int, ...]  # character offset of each image block
    tags: tuple[_TagSpan, ...]
    decoder_slots: tuple[Slot, ...]

    @property
    def text(self) -> str:
        return "".join(piece.text for piece in self.pieces)


def build_prompt(
    tokenizer: Tokenizer,
    fmt: PromptFormat,
    question: str,
    images: Sequence[TiledImage] = (),
    *,
    system: str | None = None,
    raw: bool = False,
) -> PromptTokens:
    """Assemble and tokenize a prompt for `images` (in `<image>` order).

    Chat mode wraps `question` in the format's chat template (`system` overrides the default
    system message). Each `<image>` in the question is replaced, in order, by its image's block;
    a question without any `<image>` gets one "<image>\\n" per image prepended. Raw mode takes a
    fully formed prompt string and only replaces its `<image>` markers, which must match exactly.
    """
    return _tokenize(tokenizer, fmt, _assemble_text(fmt, question, images, system, raw), images)


def build_chat_prompt(
    tokenizer: Tokenizer,
    fmt: PromptFormat,
    messages: Sequence[Message],
    images: Sequence[TiledImage] = (),
    *,
    system: str | None = None,
) -> PromptTokens:
    """Assemble a multi-turn conversation in the format's chat template, ending with the
    assistant's opening. Each message's images fill its `<image>` markers in order (or are
    prepended); the messages' image counts must add up to `len(images)`."""
    for message in messages:
        _check_text("message", message.text)
    if system is not None:
        _check_text("system message", system)
    pieces = fmt.chat.conversation(_with_markers(fmt, messages, len(images)), system)
    return _tokenize(tokenizer, fmt, _expand_images(fmt, pieces, images, raw=False), images)


def _tokenize(
    tokenizer: Tokenizer, fmt: PromptFormat, assembled: _PromptText, images: Sequence[TiledImage]
) -> PromptTokens:
    encoding = encode_pieces(tokenizer, assembled.pieces)
    input_ids = np.asarray(encoding.ids, dtype=np.int64)
    token_ends = np.asarray([end for _, end in encoding.offsets], dtype=np.int64)
    placeholder_id = _placeholder_id(tokenizer, fmt)
    if not encoding.ids:
        raise PromptError(
            "The prompt is empty",
            why="the decoder needs at least one token",
            fix="Pass a non-empty prompt (a raw prompt is used exactly as given)",
        )

    decoder_positions = np.flatnonzero(input_ids == placeholder_id).astype(np.int64)
    _check_placeholder_count(fmt, decoder_positions, len(assembled.decoder_slots))

    cross_ids, cross_slots, cross_columns = _cross_sequence(tokenizer, fmt, images, placeholder_id)
    image_start_tokens = np.searchsorted(token_ends, assembled.image_starts, side="right")
    mask = _cross_attention_mask(
        fmt.layout, len(input_ids), image_start_tokens, cross_columns, encoding.offsets, assembled
    )
    return PromptTokens(
        text=assembled.text,
        input_ids=input_ids,
        decoder_feature_slots=assembled.decoder_slots,
        decoder_feature_positions=decoder_positions,
        cross_token_ids=cross_ids,
        cross_feature_slots=cross_slots,
        cross_feature_positions=np.flatnonzero(cross_ids == placeholder_id).astype(np.int64),
        cross_attention_mask=mask,
        image_start_tokens=image_start_tokens.astype(np.int64),
    )


def count_prompt_tokens(
    tokenizer: Tokenizer,
    fmt: PromptFormat,
    question: str,
    images: Sequence[TiledImage] = (),
    *,
    system: str | None = None,
    raw: bool = False,
) -> int:
    """The decoder length `build_prompt` would produce, without building masks (for an early
    "context overflow" check before any image is encoded)."""
    pieces = _assemble_text(fmt, question, images, system, raw).pieces
    return len(encode_pieces(tokenizer, pieces).ids)


def prompt_text(
    fmt: PromptFormat,
    question: str,
    images: Sequence[TiledImage] = (),
    *,
    system: str | None = None,
    raw: bool = False,
) -> str:
    """The full prompt string (chat template applied, image blocks expanded), for inspection."""
    return _assemble_text(fmt, question, images, system, raw).text


# --- text assembly -------------------------------------------------------------------------------


def _assemble_text(
    fmt: PromptFormat,
    question: str,
    images: Sequence[TiledImage],
    system: str | None,
    raw: bool,
) -> _PromptText:
    _check_text("prompt", question)
    if system is not None:
        _check_text("system message", system)
    if raw:
        raw_prompt = TextPiece(question, trusted=True, image_markers=True)
        return _expand_images(fmt, [raw_prompt], images, raw=True)
    (message,) = _with_markers(fmt, [Message("user", question, len(images))], len(images))
    return _expand_images(fmt, fmt.chat.pieces(message.text, system), images, raw=False)


def _with_markers(fmt: PromptFormat, messages: Sequence[Message], images: int) -> list[Message]:
    """Questions whose images have no `<image>` marker get one per image prepended
    (InternVL's and NVLM's own chat() do the same); a question with markers has one per image
    of its own, so no image ever lands in another turn."""
    if sum(m.images for m in messages) != images:
        raise PromptError(
            f"The conversation's messages hold {sum(m.images for m in messages)} image(s) but "
            f"{images} were given",
            fix="Give each message the number of images that belong to it",
        )
    for message in messages:
        markers = message.text.count(fmt.image_marker) if message.role == "user" else 0
        if markers:
            _check_marker_count(fmt, markers, message.images, raw=False)
    return [
        replace(m, text=f"{fmt.image_marker}\n" * m.images + m.text)
        if m.images and fmt.image_marker not in m.text
        else m
        for m in messages
    ]


def _expand_images(
    fmt: PromptFormat, pieces: Sequence[TextPiece], images: Sequence[TiledImage], *, raw: bool
) -> _PromptText:
    """Replace each `<image>` marker of the pieces that place images by its image's block, in
    order."""
    split = [
        (piece, piece.text.split(fmt.image_marker) if piece.image_markers else [piece.text])
        for piece in pieces
    ]
    _check_marker_count(fmt, sum(len(parts) - 1 for _, parts in split), len(images), raw=raw)

    out: list[TextPiece] = []
    length, image_starts, tags, decoder_slots = 0, [], [], []
    blocks = iter(enumerate(images))
    for piece, parts in split:
        for number, part in enumerate(parts):
            if number:  # an `<image>` marker stood here: the next image's block replaces it
                index, image = next(blocks)
                image_starts.append(length)
                block, block_tags, block_slots = _image_block(fmt, index, image, offset=length)
                out.append(template_text(block))
                length += len(block)
                tags += block_tags
                decoder_slots += block_slots
            out.append(TextPiece(part, piece.trusted, piece.image_markers))
            length += len(part)
    return _PromptText(tuple(out), tuple(image_starts), tuple(tags), tuple(decoder_slots))


def _image_block(
    fmt: PromptFormat, index: int, image: TiledImage, *, offset: int
) -> tuple[str, list[_TagSpan], list[Slot]]:
    """One image's text block, the character spans of its tags and its decoder feature slots."""
    layout, n = fmt.layout, _checked_num_tiles(fmt, index, image)
    tiles = range(n) if layout.text_tiles == "all" else [n - 1]
    block, tags, slots = fmt.image_start, [], []
    for tile in tiles:
        if layout.text_tags:
            tag = fmt.tag(tile, n)
            tags.append(
                _TagSpan(offset + len(block), offset + len(block) + len(tag), (index, tile))
            )
            block += tag
        if layout.text_pads:
            block += fmt.placeholder_token * fmt.tokens_per_tile
            slots.append((index, tile))
    return block + fmt.image_end, tags, slots


def _checked_num_tiles(fmt: PromptFormat, index: int, image: TiledImage) -> int:
    n = int(image.num_tiles)
    if n < 1:
        raise PromptError(
            f"Image {index + 1} has {n} tiles",
            why="every image needs at least one tile",
            fix="Pass the tiler's result for the image",
        )
    if fmt.layout.text_tiles == "global" and n > 1 and not image.has_thumbnail:
        raise PromptError(
            f"Image {index + 1} has {n} tiles but no thumbnail",
            why=f"the {fmt.name} layout feeds the thumbnail to the decoder",
            fix="Tile with use_thumbnail enabled",
        )
    return n


# --- cross-attention sequence and mask -----------------------------------------------------------


def _cross_tiles(layout: ImageLayout, num_tiles: int) -> range:
    if layout.cross_tiles == "all":
        return range(num_tiles)
    if layout.cross_tiles == "regular":
        return range(num_tiles - 1)  # empty for a single-tile image: it went to the decoder
    return range(0)


@dataclass(frozen=True)
class _CrossColumns:
    """One image's columns in the cross key/value sequence."""

    image: range  # everything the image contributes (tags included)
    tiles: dict[Slot, range]  # each tile's visual slots


def _cross_sequence(
    tokenizer: Tokenizer, fmt: PromptFormat, images: Sequence[TiledImage], placeholder_id: int
) -> tuple[np.ndarray, tuple[Slot, ...], list[_CrossColumns]]:
    """Cross key/value token ids, the (image, tile) of each visual block, and per-image columns."""
    ids: list[int] = []
    slots: list[Slot] = []
    columns: list[_CrossColumns] = []
    for index, image in enumerate(images):
        n, image_start, tiles = int(image.num_tiles), len(ids), {}
        for tile in _cross_tiles(fmt.layout, n):
            if fmt.layout.cross_tags:
                ids += tokenizer.encode(fmt.tag(tile, n), add_special_tokens=False).ids
            tiles[(index, tile)] = range(len(ids), len(ids) + fmt.tokens_per_tile)
            ids += [placeholder_id] * fmt.tokens_per_tile
            slots.append((index, tile))
        columns.append(_CrossColumns(range(image_start, len(ids)), tiles))
    return np.asarray(ids, dtype=np.int64), tuple(slots), columns


def _cross_attention_mask(
    layout: ImageLayout,
    num_tokens: int,
    image_start_tokens: np.ndarray,
    columns: list[_CrossColumns],
    offsets: list[tuple[int, int]],
    assembled: _PromptText,
) -> np.ndarray:
    num_columns = columns[-1].image.stop if columns else 0
    mask = np.zeros((num_tokens, num_columns), dtype=bool)  # (T, K)
    # Every token from an image's first token on sees that image's whole cross range.
    for start_token, image_columns in zip(image_start_tokens, columns, strict=True):
        mask[start_token:, image_columns.image.start : image_columns.image.stop] = True
    if layout.tag_rows_see_own_tile:
        for token, tag_slots in _tag_tokens(offsets, assembled.tags).items():
            mask[token] = False
            for image, tile in tag_slots:
                own = columns[image].tiles[(image, tile)]
                mask[token, own.start : own.stop] = True
    return mask


def _tag_tokens(offsets: list[tuple[int, int]], tags: Sequence[_TagSpan]) -> dict[int, list[Slot]]:
    """Tokens holding any character of a tile tag, with the tiles whose tags they touch.

    BPE may merge the end of one tag with the start of the next ("><"); such a token belongs to
    both tags and attends to both tiles.
    """
    starts = np.asarray([s for s, _ in offsets], dtype=np.int64)
    ends = np.asarray([e for _, e in offsets], dtype=np.int64)
    owners: dict[int, list[Slot]] = {}
    for tag in tags:
        for token in np.flatnonzero((starts < tag.end) & (ends > tag.start)):
            owners.setdefault(int(token), []).append(tag.slot)
    return owners


# --- tokenization: control tokens only where the template put them -------------------------------


@dataclass(frozen=True)
class PromptEncoding:
    """Token ids of a prompt and each token's character span in the prompt text."""

    ids: list[int]
    offsets: list[tuple[int, int]]


def encode_pieces(tokenizer: Tokenizer, pieces: Sequence[TextPiece]) -> PromptEncoding:
    """Tokenize the concatenated pieces; added tokens are recognised in trusted pieces only.

    The text is cut at the trusted pieces' added tokens (control and image tokens), where the
    tokenizer cuts anyway, and every run between them is encoded with no added token recognised.
    A prompt whose untrusted text contains no added-token string therefore gets exactly the ids
    of one `tokenizer.encode` call over the whole text; one that does gets those strings as
    plain characters.
    """
    text = "".join(piece.text for piece in pieces)
    data = _data_tokenizer(tokenizer)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    cursor = 0
    for start, end, token_id in [*_trusted_added_tokens(tokenizer, pieces), (len(text), 0, -1)]:
        if start > cursor:
            run = data.encode(text[cursor:start], add_special_tokens=False)
            ids += run.ids
            offsets += [(cursor + s, cursor + e) for s, e in run.offsets]
        if token_id >= 0:
            ids.append(token_id)
            offsets.append((start, end))
            cursor = end
    return PromptEncoding(ids, offsets)


def _trusted_added_tokens(
    tokenizer: Tokenizer, pieces: Sequence[TextPiece]
) -> list[tuple[int, int, int]]:
    """(start, end, id) of every added token the tokenizer finds inside a trusted piece."""
    added = set(tokenizer.get_added_tokens_decoder())
    found, offset = [], 0
    for piece in pieces:
        if piece.trusted and piece.text:
            encoding = tokenizer.encode(piece.text, add_special_tokens=False)
            found += [
                (offset + start, offset + end, token_id)
                for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)
                if token_id in added
            ]
        offset += len(piece.text)
    return found


# A copy of each tokenizer that recognises no added token, made once per tokenizer object.
_DATA_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, Tokenizer] = weakref.WeakKeyDictionary()
_DATA_TOKENIZERS_LOCK = threading.Lock()


def _data_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with every added token marked special and special-token matching off.

    `encode_special_tokens` alone would still match added tokens not flagged special; marking
    them all special first makes the copy treat every added-token string as text.
    """
    with _DATA_TOKENIZERS_LOCK:
        data = _DATA_TOKENIZERS.get(tokenizer)
        if data is None:
            spec = json.loads(tokenizer.to_str())
            for token in spec.get("added_tokens") or []:
                token["special"] = True
            data = Tokenizer.from_str(json.dumps(spec))
            data.encode_special_tokens = True
            _DATA_TOKENIZERS[tokenizer] = data
    return data


# --- checks --------------------------------------------------------------------------------------


def _placeholder_id(tokenizer: Tokenizer, fmt: PromptFormat) -> int:
    token_id = tokenizer.token_to_id(fmt.placeholder_token)
    if token_id is None:
        raise PromptError(
            f"The tokenizer has no '{fmt.placeholder_token}' token",
            why=f"the {fmt.name} prompt format marks image features with it",
            fix="Use the tokenizer exported with the bundle",
        )
    return token_id


def _check_text(what: str, text: object) -> None:
    if not isinstance(text, str):
        raise PromptError(f"The {what} must be text, not a {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        # Python keeps undecodable command-line bytes as lone surrogates (PEP 383).
        raise PromptError(
            f"The {what} is not valid UTF-8 text",
            why=f"it holds an undecodable byte or lone surrogate at character {error.start}",
            fix="Pass UTF-8 text (check the terminal's or the file's encoding)",
        ) from None


def _check_marker_count(fmt: PromptFormat, markers: int, images: int, *, raw: bool) -> None:
    if markers == images:
        return
    where = "raw prompt" if raw else "prompt"
    raise PromptError(
        f"The {where} has {markers} '{fmt.image_marker}' placeholder(s) but {images} image(s) "
        "were given",
        why="each image replaces one placeholder, in order",
        fix=f"Put exactly one '{fmt.image_marker}' per image in the prompt"
        + ("" if raw else ", or none to have them prepended"),
    )


def _check_placeholder_count(fmt: PromptFormat, positions: np.ndarray, slots: int) -> None:
    expected = slots * fmt.tokens_per_tile
    if len(positions) != expected:
        raise PromptError(
            f"The prompt has {len(positions)} '{fmt.placeholder_token}' tokens where the images "
            f"need {expected}",
            why="the raw prompt contains the reserved image token itself",
            fix=f"Remove '{fmt.placeholder_token}' from the text",
        )
