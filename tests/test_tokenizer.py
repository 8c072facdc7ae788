"""The tiny tokenizer acts like NVLM's Qwen2 tokenizer wherever the exporter and runtime need it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from nvlm_export.errors import InputError
from nvlm_export.models.families.internvl import CHAT as INTERNVL_CHAT
from nvlm_export.models.families.nvlm_d import CHAT as NVLM_CHAT
from nvlm_export.models.tokenizer import (
    LAYOUTS,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    build_tiny_tokenizer,
    save_tiny_tokenizer,
)

TEXT = "Describe <Image><tile_1> in 42 words, please: café, naïve — 画像!\n  Thanks."


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return build_tiny_tokenizer()


def test_training_is_deterministic(tokenizer: Tokenizer) -> None:
    assert build_tiny_tokenizer().to_str() == tokenizer.to_str()


def test_vocab_is_about_1000_with_specials_at_the_end(tokenizer: Tokenizer) -> None:
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(VOCAB_SIZE - len(SPECIAL_TOKENS), VOCAB_SIZE))


def test_round_trips_any_text_byte_level(tokenizer: Tokenizer) -> None:
    encoding = tokenizer.encode(TEXT)
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == TEXT


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_special_tokens_are_never_split(tokenizer: Tokenizer, special: str) -> None:
    ids = tokenizer.encode(f"a{special}b {special}{special}\n{special}").ids
    assert ids.count(tokenizer.token_to_id(special)) == 4


def test_tile_tags_are_plain_multi_token_text(tokenizer: Tokenizer) -> None:
    for tag in ("<Image>", "<tile_1>", "<tile_global_thumbnail>", "</Image>"):
        assert tokenizer.token_to_id(tag) is None
        assert len(tokenizer.encode(tag).ids) > 1


def test_unknown_layout_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="Unknown tokenizer layout 'llava'"):
        save_tiny_tokenizer(tmp_path, "llava")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_saved_tokenizer_loads_in_tokenizers_and_transformers(tmp_path: Path, layout: str) -> None:
    transformers = pytest.importorskip("transformers")
    saved = save_tiny_tokenizer(tmp_path, layout)
    reloaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)

    assert reloaded.encode(TEXT).ids == saved.encode(TEXT).ids
    assert hf(TEXT)["input_ids"] == saved.encode(TEXT).ids
    assert hf.decode(hf(TEXT)["input_ids"]) == TEXT
    assert hf.eos_token == "<|im_end|>"
    assert hf.eos_token_id == saved.token_to_id("<|im_end|>")
    assert hf.pad_token == "<|endoftext|>"
    assert set(SPECIAL_TOKENS) <= set(hf.all_special_tokens)
    assert (tmp_path / "special_tokens_map.json").is_file()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chat_template_matches_the_prompt_format(tmp_path: Path, layout: str) -> None:
    transformers = pytest.importorskip("transformers")
    save_tiny_tokenizer(tmp_path, layout)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    chat = INTERNVL_CHAT if layout.startswith("internvl") else NVLM_CHAT

    def render(messages: list[dict]) -> str:
        return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    question = "<image>\nWhat is this?"
    assert render([{"role": "user", "content": question}]) == chat.render(question)
    custom = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    assert render(custom) == chat.render(question, system="Be brief.")


def test_nvlm_template_has_no_newline_after_im_end(tmp_path: Path) -> None:
    save_tiny_tokenizer(tmp_path, "nvlm-d")
    template = json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = hf.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "Answer the questions." in template
    assert text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nHi<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_internvl_hf_layout_serves_transformers_internvl_processor(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    save_tiny_tokenizer(tmp_path, "internvl-hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.context_image_token == "<IMG_CONTEXT>"
    assert hf.start_image_token_id == hf.convert_tokens_to_ids("<img>")
    assert hf.end_image_token_id == hf.convert_tokens_to_ids("</img>")
    text = hf.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "<|im_start|>user\n<IMG_CONTEXT>\nQ<|im_end|>\n" in text
