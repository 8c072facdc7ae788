"""The decoder of an NVLM-D / InternVL checkpoint, written as a standard Hugging Face checkpoint.

Any engine that serves Qwen2 / Llama models (vLLM, TensorRT-LLM's converters, transformers) loads
the result as it is: `config.json` (the decoder's own config, with the class its weights really
belong to: NVLM-D-72B's llm_config says "llama" but its decoder is a Qwen2 with q/k/v biases),
safetensors shards with the decoder's standard parameter names, `generation_config.json`, the
tokenizer and a chat template rendering the bundle's text conversation.

The weights are streamed: the parameter list comes from a decoder built on the `meta` device (no
memory), and each tensor is read from the checkpoint by the layout's key map, checked against the
shape the config implies, cast and written, one shard at a time. Peak memory is one shard.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from nvlm_export.errors import CheckpointError, InputError
from nvlm_export.models.checkpoint import (
    DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    StoredTensors,
    canonical_parameters,
    stored_names,
)
from nvlm_export.models.config import ModelConfig, decoder_architecture
from nvlm_export.models.config_io import read_config
from nvlm_export.models.language import build_decoder, decoder_config
from nvlm_export.models.registry import architecture_of
from nvlm_export.runtime.manifest import Manifest
from nvlm_export.runtime.prompt import ChatTemplate

LANGUAGE_PREFIX = "language_model."  # our canonical names of decoder parameters start with it
DEFAULT_SHARD_BYTES = 2 * 1024**3
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass(frozen=True)
class DecoderCheckpoint:
    """What was written: the transformers class, the weights' dtype and the files."""

    directory: Path
    architecture: str
    dtype: str
    num_parameters: int
    files: tuple[str, ...]


def write_decoder_checkpoint(
    checkpoint: Path,
    manifest: Manifest,
    bundle: Path,
    out: Path,
    *,
    dtype: str = "auto",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> DecoderCheckpoint:
    """Write the decoder of `checkpoint` to the empty directory `out` (see the module docstring).

    `manifest` / `bundle` are the vision bundle exported from the same checkpoint: its tokenizer
    files, end-of-turn ids and chat template go with the decoder. `dtype` is `auto` (as stored),
    `bfloat16`, `float16` or `float32`.
    """
    config = read_config(checkpoint)
    _check_decoder_only(config)
    stored = StoredTensors(checkpoint)
    with torch.device("meta"):
        decoder = build_decoder(config.llm_config)
    shapes = {name: tuple(t.shape) for name, t in canonical_parameters(decoder).items()}
    target = _resolve_dtype(dtype, stored, config.layout, next(iter(shapes)))
    out.mkdir(parents=True, exist_ok=True)
    weights = _write_shards(stored, config.layout, shapes, target, out, max_shard_bytes)
    architecture = _write_config(config, target, out)
    _write_generation_config(manifest, out)
    tokenizer = _write_tokenizer(manifest, bundle, out)
    count = sum(_numel(shape) for shape in shapes.values())
    return DecoderCheckpoint(
        out, architecture, target, count, (*weights, "config.json", GENERATION_CONFIG, *tokenizer)
    )


def _check_decoder_only(config: ModelConfig) -> None:
    if not architecture_of(config.layout).handoff:
        raise InputError(
            f"A {config.layout} decoder cannot be handed off to a serving engine",
            why="its layers include gated cross-attention blocks, which neither vLLM nor "
            "TensorRT-LLM implements for Qwen2 / Llama decoders",
            fix="Run NVLM-X / NVLM-H bundles with nvlm-export's own runtime",
        )


def _resolve_dtype(dtype: str, stored: StoredTensors, layout: str, probe: str) -> str:
    if dtype == "auto":
        name = stored_names(layout, LANGUAGE_PREFIX + probe)[0]
        stored_dtype = stored.get(name).dtype
        return next((key for key, value in DTYPES.items() if value == stored_dtype), "float32")
    if dtype not in DTYPES:
        raise InputError(
            f"Unknown dtype '{dtype}' for the handed-off decoder",
            fix=f"Choose auto, {', '.join(DTYPES)}",
        )
    return dtype


def _stream(
    stored: StoredTensors, layout: str, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """(standard name, tensor) for every decoder parameter, read and checked one at a time."""
    for name, shape in shapes.items():
        sources = stored_names(layout, LANGUAGE_PREFIX + name)
        parts = []
        for source in sources:
            if source not in stored.files:
                raise CheckpointError(
                    f"{stored.source}: missing key {source!r}",
                    why="the decoder built from config.json needs it",
                    fix="Check that the checkpoint is complete",
                )
            parts.append(stored.get(source))
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{stored.path(sources[0])}: {sources[0]!r} has shape {list(tensor.shape)}",
                why=f"config.json implies {list(shape)}",
                fix="Check that config.json belongs to these weights",
            )
        yield name, tensor.to(dtype).contiguous()


def _write_shards(
    stored: StoredTensors,
    layout: str,
    shapes: dict[str, tuple[int, ...]],
    dtype: str,
    out: Path,
    max_shard_bytes: int,
) -> list[str]:
    """Safetensors shards of at most `max_shard_bytes` (one tensor may exceed it alone), written
    as they fill; named model-0000i-of-0000n once the count is known, with an index if > 1."""
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in _stream(stored, layout, shapes, DTYPES[dtype]):
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            shards.append(_flush(shard, out, len(shards)))
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    shards.append(_flush(shard, out, len(shards)))
    return _name_shards(shards, out)


def _flush(shard: dict[str, torch.Tensor], out: Path, index: int) -> list[str]:
    path = out / f".shard-{index}.safetensors"
    save_file(shard, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates 0600 files; a bundle is meant to be shared
    return list(shard)


def _name_shards(shards: list[list[str]], out: Path) -> list[str]:
    if len(shards) == 1:
        (out / ".shard-0.safetensors").rename(out / SINGLE_FILE)
        return [SINGLE_FILE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for index, (file, names) in enumerate(zip(files, shards, strict=True)):
        (out / f".shard-{index}.safetensors").rename(out / file)
        weight_map.update(dict.fromkeys(names, file))
    total = sum((out / file).stat().st_size for file in files)
    _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*files, INDEX_FILE]


def _write_config(config: ModelConfig, dtype: str, out: Path) -> str:
    """The decoder's transformers config (its real class), saved by transformers itself."""
    architecture = decoder_architecture(config.llm_config)
    hf_config = decoder_config(config.llm_config)
    hf_config.architectures = [architecture]
    # transformers 5 names the weights' dtype `dtype`; 4.x `torch_dtype`.
    setattr(hf_config, "dtype" if hasattr(hf_config, "dtype") else "torch_dtype", dtype)
    hf_config.save_pretrained(out)
    return architecture


def _write_generation_config(manifest: Manifest, out: Path) -> None:
    """Greedy by default and the bundle's end-of-turn ids, so engines stop where we stop."""
    eos = list(manifest.tokenizer.eos_token_ids)
    _write_json(out / GENERATION_CONFIG, {"eos_token_id": eos, "do_sample": False})


def _write_tokenizer(manifest: Manifest, bundle: Path, out: Path) -> list[str]:
    """The bundle's tokenizer files, with the text conversation as a Jinja chat template."""
    written = []
    for relative in (manifest.tokenizer.file, *manifest.tokenizer.config_files):
        shutil.copyfile(bundle / relative, out / Path(relative).name)
        written.append(Path(relative).name)
    path = out / TOKENIZER_CONFIG
    tokenizer_config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    tokenizer_config["chat_template"] = chat_template(manifest.prompt.chat)
    _write_json(path, tokenizer_config)
    return sorted({*written, TOKENIZER_CONFIG})


def chat_template(chat: ChatTemplate) -> str:
    """`chat` as a Jinja chat template (text only; images are assembled by our prompt code).

    A leading system message replaces the default system turn, as `ChatTemplate.render` does.
    """
    prefix, after_role = (json.dumps(part) for part in chat.turn_prefix.split("{role}"))
    turn_end, default_system = json.dumps(chat.turn_end), json.dumps(chat.default_system)

    def turn(role: str, content: str) -> str:
        return f"{{{{ {prefix} + {role} + {after_role} + {content} + {turn_end} }}}}"

    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {default_system} -%}}{{%- set turns = messages -%}}"
        "{%- endif -%}"
        + turn("'system'", "system")
        + "{%- for message in turns -%}"
        + turn("message['role']", "message['content']")
        + "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {prefix} + 'assistant' + {after_role} }}}}"
        "{%- endif -%}"
    )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
