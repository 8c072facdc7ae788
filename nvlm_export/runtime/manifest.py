"""The bundle manifest: the one contract between the exporter and the runtime.

A bundle is a directory with `manifest.json` and the files it names. The runtime learns everything
from the manifest (graphs and their I/O, KV-cache layout, tiling, prompt format, token ids); it
never guesses from file names. The schema is versioned `MAJOR.MINOR`:

- a runtime refuses a manifest whose MAJOR is newer than its own (the meaning of fields changed);
- within a major version, a newer MINOR may only add optional keys, which an older runtime ignores;
- for a MINOR it knows, unknown keys are an error (they are typos or corruption, not extensions).

Every path in a manifest must resolve, after symlinks, inside the bundle directory, and the
manifest records the size and SHA-256 of every file of the bundle: loading checks sizes always and
hashes on request (`verify_hashes=True`, `nvlm-export lint`).

`docs/bundle.md` documents every field; keep it in step with this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import types
import typing
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from nvlm_export import __version__
from nvlm_export.errors import BundleError, InputError, check_choice
from nvlm_export.runtime.limits import MAX_CONTEXT
from nvlm_export.runtime.prompt import ChatTemplate, PromptFormat
from nvlm_export.runtime.tiling import TilingConfig

# 1.1: the optional `language_engine` section; 2.0: file records required; 2.1: the optional
# per-backend graph `variants`; 2.2: a variant's `kv_in_place`
SCHEMA_VERSION = "2.2"
# Keys that writers of schema 2.0 and 2.1 put in every manifest and no reader needs: ignored.
RETIRED_KEYS = ("extras",)
MANIFEST_NAME = "manifest.json"

DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")


class Precision(StrEnum):
    """A graph's or a bundle's numeric precision: the manifest's `precision` values, the CLI's
    --precision choices. Members are their strings ("int8" == Precision.INT8)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    FP8 = "fp8"
    INT4 = "int4"


PRECISIONS: tuple[Precision, ...] = tuple(Precision)
# Made by `nvlm-export quantize` from a float bundle (explicit Q/DQ or block-wise weights).
QUANTIZED_PRECISIONS = (Precision.INT8, Precision.FP8, Precision.INT4)

Dim = int | str  # a fixed size, or the name of a dynamic axis ("tiles", "seq", "past")

T = TypeVar("T")

# --- graph interface names: the exporter writes graphs with these, the runtime feeds them -------
VISION_GRAPH = "vision"
DECODER_GRAPH = "decoder"
CROSS_KV_GRAPH = "cross_kv"  # NVLM-X/H: image tokens -> every cross-attention block's key/value
GRAPH_NAMES = (VISION_GRAPH, DECODER_GRAPH, CROSS_KV_GRAPH)
PIXEL_VALUES = "pixel_values"  # vision input, float [tiles, 3, S, S]
IMAGE_FEATURES = "image_features"  # vision output spliced into the decoder sequence [tiles, 256, D]
CROSS_FEATURES = "cross_features"  # vision output for the cross key/value sequence [tiles, 256, D]
CROSS_EMBEDS = "cross_embeds"  # cross_kv input [1, K, D]; its outputs are decoder inputs by name
CROSS_KEY = "cross_kv.{block}.key"  # cross_kv outputs = decoder inputs [batch, KV, K, head_dim]
CROSS_VALUE = "cross_kv.{block}.value"
INPUTS_EMBEDS = "inputs_embeds"  # decoder input [batch, seq, D]
POSITION_IDS = "position_ids"  # decoder input int64 [batch, seq]
LOGITS = "logits"  # decoder output [batch, vocab]: the last position's
# The decoder's self-attention cache, per layer: past inputs [batch, kv_heads, past, head_dim],
# present outputs [batch, kv_heads, past + seq, head_dim] (past and new concatenated).
PAST_KEY = "past_key_values.{layer}.key"
PAST_VALUE = "past_key_values.{layer}.value"
PRESENT_KEY = "present.{layer}.key"
PRESENT_VALUE = "present.{layer}.value"
CROSS_ATTENTION_MASK = "cross_attention_mask"  # decoder input bool [1, seq, K]
LAYER_FIELD = "{layer}"


def layer_tensor(pattern: str, layer: int) -> str:
    """`pattern` (a manifest's `kv_cache.past_key`...) for one layer. A plain substitution, not
    str.format: a bundle's strings are data, and format would read fields and attributes."""
    return pattern.replace(LAYER_FIELD, str(layer))


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and shape (ints or dynamic-axis names)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise BundleError(f"Tensor '{self.name}' has unknown dtype '{self.dtype}'")
        object.__setattr__(self, "shape", tuple(self.shape))


@dataclass(frozen=True)
class GraphVariant:
    """The same graph rewritten for one backend's fused kernels: same inputs, outputs, weights
    (it reads the standard graph's external data) and quantization. That backend loads `file`
    instead of the standard one; every other backend ignores it."""

    file: str
    fused_ops: tuple[str, ...] = ()  # "domain.Op" of the ops only this backend runs
    # True: the graph takes the cache length from `position_ids`, not from the past's shape, so
    # past_key_values.* may be buffers longer than the cache, and bound to present.* as the same
    # memory they receive each step's new keys/values in place (docs/decoder-graph.md).
    kv_in_place: bool = False


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph (and, once built, its TensorRT engines) of a bundle."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"
    # Extra facts of quantized graphs: method, calibration provenance, excluded nodes.
    quantization: dict[str, Any] | None = None
    # Backend name -> a variant of this graph that backend prefers (ONNX Runtime: fused attention).
    variants: dict[str, GraphVariant] = field(default_factory=dict)

    def variant_for(self, backend: str | None) -> GraphVariant | None:
        """The variant `backend` loads instead of the standard graph, if the graph has one."""
        return self.variants.get(backend) if backend is not None else None

    def file_for(self, backend: str | None) -> str:
        """The file `backend` loads: its variant if the graph has one, else the standard graph."""
        variant = self.variant_for(backend)
        return variant.file if variant is not None else self.file

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, self.file)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, self.file)


@dataclass(frozen=True)
class EmbeddingSpec:
    """The token-embedding table, kept outside the decoder graph as a memory-mappable .npy file."""

    file: str
    vocab_size: int
    hidden_size: int
    dtype: str = "float32"


@dataclass(frozen=True)
class KVCacheSpec:
    """Self-attention KV cache layout of the decoder graph: [batch, kv_heads, length, head_dim]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    dtype: str = "float32"
    past_key: str = PAST_KEY
    past_value: str = PAST_VALUE
    present_key: str = PRESENT_KEY
    present_value: str = PRESENT_VALUE


@dataclass(frozen=True)
class TokenizerSpec:
    """Tokenizer files (relative to the bundle) and the token ids the runtime needs."""

    file: str
    eos_token_ids: tuple[int, ...]
    placeholder_token_id: int
    config_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceSpec:
    """Where the bundle came from and how it was exported (provenance, not used for inference)."""

    checkpoint: str
    layout: str
    settings: dict[str, Any] = field(default_factory=dict)
    producer: str = f"nvlm-export {__version__}"


LANGUAGE_ENGINES = ("vllm", "tensorrt-llm")  # engines a bundle's decoder can be handed off to


@dataclass(frozen=True)
class LanguageEngineSpec:
    """The language model handed off to a serving engine (`nvlm-export handoff`).

    `checkpoint` is a standard Hugging Face decoder checkpoint inside the bundle (config, weights,
    tokenizer, chat template); the bundle's vision graph, tiling and prompt assembly feed it the
    prompt embeddings. The launch settings are what the engine is started with.
    """

    engine: str  # one of LANGUAGE_ENGINES
    checkpoint: str  # directory relative to the bundle
    architecture: str  # the checkpoint's transformers class, e.g. Qwen2ForCausalLM
    tensor_parallel_size: int
    max_context: int  # prompt + answer, in tokens
    dtype: str  # the checkpoint's weights: bfloat16, float16 or float32
    quantization: str | None = None  # None: the weights as stored
    engine_version: str = ""  # the engine release the launch commands were written for
    # Shell commands that build and serve the language model, in order (TensorRT-LLM); empty when
    # the engine loads the checkpoint directly (vLLM).
    commands: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice(
            self.engine,
            LANGUAGE_ENGINES,
            "language engine",
            BundleError,
            fix="Hand the decoder off again with nvlm-export handoff",
        )
        if self.tensor_parallel_size < 1:
            raise BundleError(f"tensor_parallel_size {self.tensor_parallel_size} is below 1")


@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT engine built from one graph (`nvlm-export engine`): its file and what the runner
    checks before loading it (an engine runs only with the TensorRT and GPU it was built by)."""

    file: str
    tensorrt_version: str
    compute_capability: str  # "8.7"
    device: str = ""
    target: str = ""
    precision: str = ""
    strongly_typed: bool = False
    profiles: tuple[dict[str, Any], ...] = ()  # per profile, each input's min/opt/max shape
    size_bytes: int = 0
    build_seconds: float = 0.0


@dataclass(frozen=True)
class FileRecord:
    """A bundle file's size in bytes and SHA-256 (hex), as recorded when the bundle was written."""

    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    architecture: str
    source: SourceSpec
    graphs: dict[str, GraphSpec]
    embedding: EmbeddingSpec
    kv_cache: KVCacheSpec
    tokenizer: TokenizerSpec
    tiling: TilingConfig
    prompt: PromptFormat
    precision: str = "fp32"
    # TensorRT engines keyed by graph name.
    engines: dict[str, EngineRecord] = field(default_factory=dict)
    # The decoder handed off to a serving engine (vLLM, TensorRT-LLM); None without a hand-off.
    language_engine: LanguageEngineSpec | None = None
    # Every file of the bundle but manifest.json, by path relative to the bundle; `save` fills it.
    files: dict[str, FileRecord] = field(default_factory=dict)
    schema_version: str = SCHEMA_VERSION

    def graph(self, name: str) -> GraphSpec:
        if name not in self.graphs:
            raise BundleError(
                f"The bundle has no '{name}' graph",
                why=f"it lists {sorted(self.graphs)} for architecture {self.architecture}",
                fix="Re-export the bundle with this version of nvlm-export",
            )
        return self.graphs[name]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"schema_version": data.pop("schema_version"), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = MANIFEST_NAME) -> Manifest:
        version = data.get("schema_version")
        lenient = _check_schema_version(version, where)
        data = {key: value for key, value in data.items() if key not in RETIRED_KEYS}
        try:
            manifest = _build(cls, data, where, lenient)
            _check_values(manifest, where)
            return manifest
        except BundleError:
            raise
        except (TypeError, ValueError, KeyError) as error:
            raise BundleError(
                f"{where} is malformed", why=str(error), fix="Re-export the bundle"
            ) from error

    def save(self, bundle_dir: Path) -> Manifest:
        """Record every file of `bundle_dir` (size and SHA-256) and write manifest.json atomically
        (a crash never leaves a half-written manifest). Call it when every other file is written:
        files added later are not part of the bundle. Returns the manifest as written."""
        # Written by this version, so in its schema, whatever the manifest it was derived from.
        recorded = replace(self, files=record_files(bundle_dir), schema_version=SCHEMA_VERSION)
        path = Path(bundle_dir) / MANIFEST_NAME
        text = json.dumps(recorded.to_dict(), indent=2) + "\n"
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            f.write(text)
        os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600; a bundle is meant to be shared
        os.replace(f.name, path)
        return recorded


# --- file records ---------------------------------------------------------------------------------

_HASH_CHUNK = 1 << 20


def record_files(bundle_dir: str | os.PathLike[str]) -> dict[str, FileRecord]:
    """Size and SHA-256 of every regular file under `bundle_dir` except manifest.json and hidden
    files (locks, editor and temporary files), keyed by POSIX path relative to the bundle."""
    root = Path(bundle_dir)
    records = {}
    for path in sorted(_bundle_files(root)):
        records[path.relative_to(root).as_posix()] = FileRecord(
            path.stat().st_size, file_sha256(path)
        )
    return records


def _bundle_files(root: Path) -> Iterator[Path]:
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in names:
            path = Path(directory) / name
            if name.startswith(".") or (Path(directory) == root and name == MANIFEST_NAME):
                continue
            if path.is_file():
                yield path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(bundle_dir: str | os.PathLike[str], *, verify_hashes: bool = False) -> Manifest:
    """Read and validate a bundle's manifest; every failure is one BundleError line.

    Every path it names must stay inside the bundle, and every recorded file must exist with its
    recorded size; `verify_hashes` also compares each file's SHA-256 (reads the whole bundle)."""
    bundle = Path(bundle_dir)
    data = read_index(bundle, MANIFEST_NAME, "bundle", "nvlm-export export", BundleError)
    manifest = Manifest.from_dict(data, where=str(bundle / MANIFEST_NAME))
    check_bundle_files(manifest, bundle, verify_hashes=verify_hashes)
    return manifest


def read_index(
    directory: Path, name: str, kind: str, command: str, error: type[InputError]
) -> dict[str, Any]:
    """The JSON object in `directory/name`, the file that makes a directory a `kind` (a bundle,
    a calibration set; `command` writes it, last). A missing directory or file, or one that is
    not a JSON object, is one `error` line."""
    if not directory.is_dir():
        state = "is not a directory" if directory.exists() else "does not exist"
        raise error(
            f"{kind.capitalize()} '{directory}' {state}",
            fix=f"Pass the directory written by {command}",
        )
    path = directory / name
    if not path.is_file():
        raise error(
            f"'{directory}' is not a {kind}",
            why=f"it has no {name} (a run that failed or was interrupted leaves none)",
            fix=f"Write one with: {command}",
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as bad:
        raise error(f"{path} is not valid JSON", why=str(bad), fix=f"Run {command} again") from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object", fix=f"Run {command} again")
    return data


def _check_schema_version(version: Any, where: str) -> bool:
    """Return True when the manifest is a newer minor version (unknown keys then are ignored)."""
    ours = _parse_version(SCHEMA_VERSION, where)
    if version is None:
        raise BundleError(f"{where} has no schema_version", fix="Re-export the bundle")
    if not isinstance(version, str):
        raise BundleError(
            f"{where} has a schema_version that is not text ({version!r:.20})",
            why='it is a string such as "2.2"',
            fix="Re-export the bundle",
        )
    theirs = _parse_version(version, where)
    if theirs[0] > ours[0]:
        raise BundleError(
            f"{where} uses manifest schema {version}",
            why=f"this nvlm-export ({__version__}) reads schema {ours[0]}.x only",
            fix="Upgrade nvlm-export on this machine (pip install -U nvlm-export)",
        )
    if theirs[0] < ours[0]:
        raise BundleError(
            f"{where} uses the old manifest schema {version}",
            why=f"this nvlm-export reads schema {ours[0]}.x",
            fix="Re-export the bundle with this version",
        )
    return theirs[1] > ours[1]


def _parse_version(text: str, where: str) -> tuple[int, int]:
    try:
        major, minor = (int(part) for part in text.split("."))
    except ValueError:
        raise BundleError(
            f"{where} has an unreadable schema_version '{text}'", fix="Re-export the bundle"
        ) from None
    return major, minor


def record_from_json(cls: type[T], data: Any, where: str) -> T:
    """One of the manifest's records (a dataclass it holds: `PromptFormat`, `GraphSpec`, ...)
    from its JSON object, with the checks `load_manifest` makes; any failure is a BundleError."""
    try:
        return _build(cls, data, where, lenient=False)
    except (TypeError, ValueError) as error:
        raise BundleError(f"{where} is malformed", why=str(error), fix=_REEXPORT) from None


# Records whose every key must be in the manifest, whatever its minor version: their defaults are
# NVLM-D's prompt conventions, which a key missing from another family's bundle would silently give.
_EVERY_KEY = (PromptFormat, ChatTemplate)


def _build(cls: type[T], data: dict[str, Any], where: str, lenient: bool) -> T:
    if not isinstance(data, dict):
        raise BundleError(
            f"{where} must be an object for {cls.__name__}, not a {type(data).__name__}",
            fix=_REEXPORT,
        )
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown and not lenient:
        raise BundleError(
            f"{where} has unknown keys {unknown} in {cls.__name__}",
            why="they are not part of manifest schema " + SCHEMA_VERSION,
            fix="Check the file for typos or re-export the bundle",
        )
    required = {f.name for f in fields(cls) if _is_required(f)}  # type: ignore[arg-type]
    absent = sorted(required - set(data))
    if absent:
        raise BundleError(
            f"{where} has no {', '.join(repr(k) for k in absent)} in {cls.__name__}",
            why="every bundle records them",
            fix=_REEXPORT,
        )
    missing = sorted(known - set(data)) if cls in _EVERY_KEY else []
    if missing:
        raise BundleError(
            f"{where} lacks keys {missing} of {cls.__name__}",
            why="every bundle records the whole prompt format",
            fix=_REEXPORT,
        )
    hints = typing.get_type_hints(cls)
    values = {
        k: _convert(hints[k], v, f"{where}: {k}", lenient) for k, v in data.items() if k in known
    }
    for key, value in values.items():
        if not _matches(value, hints[key]):
            raise BundleError(
                f"{where}: {key} has the wrong type ({type(value).__name__}: {value!r:.60})",
                why=f"{cls.__name__}.{key} is {_type_name(hints[key])}",
                fix="Check the file or re-export the bundle",
            )
    try:
        return cls(**values)
    except BundleError:
        raise
    except InputError as error:  # a record's own range checks (TilingConfig's)
        raise BundleError(f"{where} is invalid", why=error.what, fix=_REEXPORT) from None


def _is_required(field_: Any) -> bool:
    return field_.default is MISSING and field_.default_factory is MISSING


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value (lists already tuples) fits a field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint in (int, float):  # JSON booleans are ints in Python; a count is never true/false
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(
            value, bool
        )
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_matches(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            isinstance(k, str) and _matches(v, args[1]) for k, v in value.items()
        )
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _convert(hint: Any, value: Any, here: str, lenient: bool) -> Any:
    """A field's JSON value as its type hint says: a dataclass, an optional one, or a mapping or
    list of them. Everything else passes through (lists become tuples: the manifest's
    dataclasses are frozen)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and value is not None:
        nested = [arg for arg in args if is_dataclass(arg)]
        if nested:
            return _convert(nested[0], value, here, lenient)
    if is_dataclass(hint):
        return _build(hint, value, here, lenient)  # type: ignore[arg-type]
    if origin is dict and is_dataclass(args[1]):
        if not isinstance(value, dict):
            raise BundleError(
                f"{here} must be an object, not a {type(value).__name__}", fix=_REEXPORT
            )
        return {name: _build(args[1], v, f"{here}.{name}", lenient) for name, v in value.items()}
    if origin is tuple and is_dataclass(args[0]):
        if not isinstance(value, list):
            raise BundleError(f"{here} must be a list, not a {type(value).__name__}", fix=_REEXPORT)
        return tuple(_build(args[0], v, here, lenient) for v in value)
    return tuple(value) if isinstance(value, list) else value


REQUIRED_GRAPHS = (VISION_GRAPH, DECODER_GRAPH)


def _check_values(manifest: Manifest, where: str) -> None:
    """Ranges of the fields that size work and memory, and the graphs every bundle has."""
    missing = [name for name in REQUIRED_GRAPHS if name not in manifest.graphs]
    if missing:
        raise BundleError(
            f"{where} has no {' or '.join(repr(m) for m in missing)} graph",
            why=f"every bundle has {' and '.join(REQUIRED_GRAPHS)}; "
            f"it lists {sorted(manifest.graphs)}",
            fix=_REEXPORT,
        )
    positive = {
        "embedding.vocab_size": manifest.embedding.vocab_size,
        "embedding.hidden_size": manifest.embedding.hidden_size,
        "kv_cache.num_layers": manifest.kv_cache.num_layers,
        "kv_cache.num_kv_heads": manifest.kv_cache.num_kv_heads,
        "kv_cache.head_dim": manifest.kv_cache.head_dim,
        "kv_cache.max_context": manifest.kv_cache.max_context,
    }
    for key, value in positive.items():
        if value < 1:
            raise BundleError(f"{where}: {key} is {value}", why="it must be >= 1", fix=_REEXPORT)
    if manifest.kv_cache.max_context > MAX_CONTEXT:
        raise BundleError(
            f"{where}: kv_cache.max_context is {manifest.kv_cache.max_context}",
            why=f"this runtime serves contexts of at most {MAX_CONTEXT} tokens",
            fix="Re-export the bundle with a smaller --max-context",
        )
    vocab = manifest.embedding.vocab_size
    ids = {"tokenizer.placeholder_token_id": (manifest.tokenizer.placeholder_token_id,)}
    ids["tokenizer.eos_token_ids"] = manifest.tokenizer.eos_token_ids
    for key, values in ids.items():
        if any(not 0 <= value < vocab for value in values):
            raise BundleError(
                f"{where}: {key} {list(values)} is outside the vocabulary",
                why=f"token ids run from 0 to {vocab - 1}",
                fix=_REEXPORT,
            )
    _check_names(manifest, where)
    _check_vision_shapes(manifest)
    _check_cache_tensors(manifest, where)


def _check_names(manifest: Manifest, where: str) -> None:
    """Every dtype and precision the manifest names is one this runtime knows."""
    named = [
        ("embedding.dtype", manifest.embedding.dtype, "dtype", DTYPES),
        ("kv_cache.dtype", manifest.kv_cache.dtype, "dtype", DTYPES),
        ("precision", manifest.precision, "precision", PRECISIONS),
    ]
    for name, graph in manifest.graphs.items():
        named.append((f"graphs.{name}.precision", graph.precision, "precision", PRECISIONS))
    for name, engine in manifest.engines.items():
        if engine.precision:  # empty: not recorded
            named.append((f"engines.{name}.precision", engine.precision, "precision", PRECISIONS))
    for key, value, kind, known in named:
        if value not in known:
            raise BundleError(
                f"{where}: {key} {value!r:.42} is not a known {kind}",
                why=f"this runtime knows {', '.join(known)}",
                fix=_REEXPORT,
            )


def _check_cache_tensors(manifest: Manifest, where: str) -> None:
    """The KV cache's per-layer names must be the decoder graph's own inputs and outputs, one
    pair per layer: the runtime feeds and reads the cache by these names alone."""
    kv, decoder = manifest.kv_cache, manifest.graph(DECODER_GRAPH)
    sides = (
        ("inputs", (kv.past_key, kv.past_value), decoder.inputs),
        ("outputs", (kv.present_key, kv.present_value), decoder.outputs),
    )
    for side, patterns, declared in sides:
        for pattern in patterns:
            names = {layer_tensor(pattern, layer) for layer in range(kv.num_layers)}
            if pattern.count(LAYER_FIELD) != 1 or not names <= {t.name for t in declared}:
                raise BundleError(
                    f"{where}: the KV cache tensor name {pattern!r:.60} does not name the decoder "
                    f"graph's {side}",
                    why=f"it must hold {LAYER_FIELD} once and give one of the decoder's {side} "
                    f"for each of its {kv.num_layers} layers",
                    fix=_REEXPORT,
                )


def _check_vision_shapes(manifest: Manifest) -> None:
    """The prompt's tokens per tile and the tile size must be what the vision graph computes:
    otherwise features would be spliced into the wrong number of slots."""
    vision = manifest.graph(VISION_GRAPH)
    tile_size = manifest.tiling.tile_size
    expected = {
        f"{PIXEL_VALUES} height": (vision.input(PIXEL_VALUES).shape[-2:-1], tile_size),
        f"{PIXEL_VALUES} width": (vision.input(PIXEL_VALUES).shape[-1:], tile_size),
    }
    for output in vision.outputs:
        expected[f"{output.name} tokens"] = (output.shape[1:2], manifest.prompt.tokens_per_tile)
    for what, (dims, value) in expected.items():
        if dims and isinstance(dims[0], int) and dims[0] != value:
            raise BundleError(
                "The manifest's tiling or prompt settings do not match the vision graph",
                why=f"the graph's {what} is {dims[0]}, the settings say {value}",
                fix="Re-export the bundle",
            )


def _by_name(specs: tuple[TensorSpec, ...], name: str, where: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise BundleError(f"{where} has no tensor named '{name}'", fix="Re-export the bundle")


def named_paths(manifest: Manifest) -> Iterator[tuple[str, str]]:
    """(manifest key, path) of every file the manifest names, records included."""
    for name, graph in manifest.graphs.items():
        yield f"graphs.{name}.file", graph.file
        for backend, variant in graph.variants.items():
            yield f"graphs.{name}.variants.{backend}.file", variant.file
    yield "embedding.file", manifest.embedding.file
    yield "tokenizer.file", manifest.tokenizer.file
    for index, name in enumerate(manifest.tokenizer.config_files):
        yield f"tokenizer.config_files[{index}]", name
    for name, engine in manifest.engines.items():
        yield f"engines.{name}.file", engine.file
    if manifest.language_engine is not None:
        yield "language_engine.checkpoint", f"{manifest.language_engine.checkpoint}/config.json"
    for name in manifest.files:
        yield f"files[{name!r}]", name


def inside_bundle(bundle: Path, key: str, name: object) -> Path:
    """`bundle / name`, refused unless it resolves (symlinks followed) inside the bundle."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"The manifest's {key} is not a file name: {name!r}", fix=_REEXPORT)
    root = bundle.resolve()
    resolved = (root / name).resolve()
    if not resolved.is_relative_to(root) or resolved == root:
        raise BundleError(
            f"The manifest's {key} points outside the bundle",
            why=f"'{name}' resolves to {resolved}, which is not inside {root}",
            fix="A bundle names only files inside its own directory; re-export it",
        )
    return resolved


def check_bundle_files(manifest: Manifest, bundle: Path, *, verify_hashes: bool = False) -> None:
    """Containment of every named path, then each recorded file's size (and SHA-256)."""
    for key, name in named_paths(manifest):
        inside_bundle(bundle, key, name)
        if name not in manifest.files:
            raise BundleError(
                f"The manifest's {key} names '{name}', which has no file record",
                why="every file of a bundle is recorded with its size and SHA-256",
                fix=_REEXPORT,
            )
    if not manifest.files:
        raise BundleError(f"The manifest of '{bundle}' records no files", fix=_REEXPORT)
    for name, record in manifest.files.items():
        _check_record(bundle, name, record, verify_hashes)


def _check_record(bundle: Path, name: str, record: FileRecord, verify_hashes: bool) -> None:
    path = bundle / name
    if not path.is_file():
        raise BundleError(
            f"Bundle '{bundle}' is incomplete",
            why=f"its manifest names '{name}', which is missing",
            fix="Copy the bundle again or re-export it",
        )
    size = path.stat().st_size
    if size != record.size:
        raise BundleError(
            f"Bundle file '{name}' is {size} bytes, not the {record.size} its manifest records",
            why="it was truncated, appended to or replaced after the bundle was written",
            fix="Copy the bundle again or re-export it",
        )
    if verify_hashes and file_sha256(path) != record.sha256:
        raise BundleError(
            f"Bundle file '{name}' does not match its recorded SHA-256",
            why="its bytes changed after the bundle was written (corruption or an edit)",
            fix="Copy the bundle again or re-export it",
        )


_REEXPORT = "Re-export the bundle with this version of nvlm-export"
