"""A tiny Qwen2-style byte-level BPE tokenizer for test checkpoints (no weights to download).

It is trained deterministically at call time on a small built-in corpus, so tests get a tokenizer
that behaves like the real one where it matters — byte-level pre-tokenizer and decoder, the real
special-token strings as unsplittable added tokens, multi-token tile tags, a chat template — with a
vocabulary of about 1000 instead of 152064.

Only the `tokenizers` library is used (no torch, no transformers), so the runtime's tests can use it
too. The files written are loadable by `tokenizers.Tokenizer.from_file(dir / "tokenizer.json")` and
by `transformers.AutoTokenizer.from_pretrained(dir)`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from nvlm_export.errors import InputError
from nvlm_export.models.registry import LAYOUTS, architecture_of
from nvlm_export.runtime.prompt import ChatTemplate

# Qwen2's pre-tokenizer split (from its tokenizer.json): contractions, letter runs with one leading
# non-letter, single digits, punctuation runs, newlines, whitespace.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The real NVLM-D / InternVL special tokens, in the order they are appended after the BPE vocab.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_pad|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 1000  # total, BPE vocabulary plus SPECIAL_TOKENS
DEFAULT_MODEL_MAX_LENGTH = 8192


def build_tiny_tokenizer() -> Tokenizer:
    """Train the tiny byte-level BPE (deterministic: same corpus, same merges, same ids)."""
    tokenizer = _empty_qwen2_like_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    _add_specials(tokenizer, SPECIAL_TOKENS)
    return tokenizer


def save_tiny_tokenizer(
    directory: Path, layout: str, *, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for `layout`.

    `layout` is one of LAYOUTS; it picks the chat template (its family's prompt format) and the
    layout's own tokenizer additions (`TokenizerSpec`: for "internvl-hf", the named image tokens
    transformers' InternVLProcessor needs, which add a `<video>` token after the common specials).
    """
    if layout not in LAYOUTS:
        raise InputError(
            f"Unknown tokenizer layout '{layout}'",
            why=f"the tiny tokenizer knows {', '.join(LAYOUTS)}",
            fix="Pass one of those layouts",
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    _add_specials(tokenizer, LAYOUTS[layout].tokenizer.extra_specials)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = _tokenizer_config(tokenizer, layout, model_max_length)
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", _special_tokens_map(layout))
    return tokenizer


def chat_template_jinja(chat: ChatTemplate, image_text: str = "<image>\n") -> str:
    """The Jinja form of `chat` for transformers' apply_chat_template.

    Renders exactly what ChatTemplate.render does for [system?, user] + generation prompt; a leading
    system message overrides the default one. A message's content is a string or a list of
    {"type": "image"} / {"type": "text", "text": ...} parts; an image part becomes `image_text`.
    Every literal sits inside an expression, so Jinja whitespace control never eats a newline.
    """

    def lit(text: str) -> str:
        return json.dumps(text)  # a JSON string is a valid Jinja string literal

    prefix, suffix = chat.turn_prefix.split("{role}")
    content = (
        "{%- if m['content'] is string -%}{{- m['content'] -}}"
        "{%- else -%}{%- for part in m['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{- {lit(image_text)} -}}}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set turns = messages -%}"
        "{%- else -%}"
        f"{{%- set turns = [{{'role': 'system', 'content': {lit(chat.default_system)}}}]"
        " + messages -%}"
        "{%- endif -%}"
        "{%- for m in turns -%}"
        f"{{{{- {lit(prefix)} + m['role'] + {lit(suffix)} -}}}}"
        f"{content}"
        f"{{{{- {lit(chat.turn_end)} -}}}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        f"{{{{- {lit(prefix)} + 'assistant' + {lit(suffix)} -}}}}"
        "{%- endif -%}"
    )


def _empty_qwen2_like_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _add_specials(tokenizer: Tokenizer, tokens: tuple[str, ...]) -> None:
    # normalized=False: the text is matched verbatim and never split by the BPE.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])


def _corpus() -> list[str]:
    """A fixed, built-in training text: English, digits, tile tags and chat-role words."""
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "What is shown in this image? Describe it in detail.",
        "Answer the questions.",
        "Please describe the picture and count the objects in it.",
        "A cat is sitting on a red chair next to the window.",
        "There are two birds standing next to each other on a branch.",
        "The chart shows the revenue of the company from 2019 to 2024.",
        "How many people are in the photo? There are three people.",
        "Read the text in the document and summarize it in one sentence.",
        "The answer is 42, and the total cost was $19.99 for 7 items.",
        "Is the traffic light green or red? It is green.",
        "You are a helpful assistant that answers questions about images.",
        "The table lists the name, age and city of each person.",
        "What color is the car parked in front of the house?",
        "She said it's a sunny day, but we'll see if they're right.",
        "Translate the following sentence into French, then explain the grammar.",
        "Compare the two images and list every difference you can find.",
        "The model reads the image as tiles and a global thumbnail.",
    ]
    subjects = ["The dog", "A child", "The robot", "My friend", "The teacher", "A small bird"]
    verbs = ["looks at", "walks to", "points at", "draws", "reads about", "waits near"]
    objects = ["the old tree", "a blue house", "the river", "a tall building", "the red ball"]
    generated = [f"{s} {v} {o}." for s, v, o in itertools.product(subjects, verbs, objects)]
    words = WORDS.split()
    # Word pairs in a fixed stride pattern give the BPE enough distinct text for ~1000 tokens.
    phrases = [f"{words[i]} {words[(i * 7 + 3) % len(words)]}" for i in range(len(words))]
    numbers = [f"{n} + {n * 3} = {n * 4}, {n}.{n % 7}5 and {n * 1234}" for n in range(0, 200, 7)]
    tags = [f"<tile_{i}>" for i in range(1, 13)] + ["<tile_global_thumbnail>"]
    tag_lines = [
        "<Image>" + "".join(tags[:n]) + "<tile_global_thumbnail></Image>" for n in range(13)
    ] + ["<image>\n" + s for s in sentences[:6]]
    roles = [
        f"{role}\n{text}\n"
        for role, text in itertools.product(["system", "user", "assistant"], sentences[:8])
    ]
    return (sentences + generated + phrases + numbers + tag_lines + roles) * 3


WORDS = """
about above across after again against almost alone along already also always among animal
another answer around asked away back ball because become before began behind being below beside
best better between black blue board boat body book both bottom bread bright bring brother brown
build building called camera cannot carry center chair change children circle city clear clock
close cloud color common complete could country course cover cross cup dark daughter day deep
diagram different direction distance document door down draw during early earth east eight
either empty enough evening every example face family father field figure final find fire first
five floor flower follow food foot forest form found four friend front full game garden girl
give glass going good great green ground group grow hand happy hard head hear heavy help high
hold horse hour house however hundred idea important inside island itself keep kind kitchen
knew known label land large last later laugh learn leave left letter light line list little
long look machine made make many map measure middle might mile minute money month morning
mother mountain move much music name near need never next night north nothing notice number
object ocean office often open order other outside page paper part people person picture piece
place plane plant play point position power press problem question quickly quiet rain reach
ready real region remember report rest right road rock room round rule screen second section
see sentence several shape short should show side sign simple since size sky slowly small snow
something sound south space speak special square stand star start station stone story street
strong student study summer table take teacher tell than thing think third though thought
thousand three through time today together took top toward town train travel tree triangle
true turn under until upon usually value very voice walk warm watch water weather week
weight west where which while white whole why wide window winter without woman wonder word
work world would write yellow young zero
"""


def _tokenizer_config(tokenizer: Tokenizer, layout: str, model_max_length: int) -> dict:
    extras = LAYOUTS[layout].tokenizer
    specials = SPECIAL_TOKENS + extras.extra_specials
    added_tokens_decoder = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in specials
    }
    config = {
        "tokenizer_class": "Qwen2TokenizerFast",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [t for t in specials if t not in (EOS_TOKEN, PAD_TOKEN)],
        "chat_template": chat_template_jinja(
            architecture_of(layout).prompt_format.chat, extras.image_text
        ),
    }
    # Top-level `*_token` keys become named special tokens in transformers 5 (and are plain init
    # kwargs in 4.x), leaving `additional_special_tokens` intact.
    config.update(extras.named_tokens)
    return config


def _special_tokens_map(layout: str) -> dict:
    specials = SPECIAL_TOKENS + LAYOUTS[layout].tokenizer.extra_specials
    return {
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [t for t in specials if t not in (EOS_TOKEN, PAD_TOKEN)],
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
