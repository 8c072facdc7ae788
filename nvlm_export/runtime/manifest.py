"""The bundle manifest: the one contract between the exporter and the runtime.

A bundle is a directory with `manifest.json` and the files it names. The runtime learns everything
from the manifest (graphs and their I/O, KV-cache layout, tiling, prompt format, token ids); it
never guesses from file names. The schema is versioned `MAJOR.MINOR`:

- a runtime refuses a manifest whose MAJOR is newer than its own (the meaning of fields changed);
- within a major version, a newer MINOR may only add optional keys, which an older runtime ignores;
- for a MINOR it knows, unknown keys are an error (they are typos or corruption, not extensions).

`docs/bundle.md` documents every field; keep it in step with this module.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from nvlm_export import __version__
from nvlm_export.errors import BundleError

SCHEMA_VERSION = "1.1"  # 1.1: the optional `language_engine` hand-off section
MANIFEST_NAME = "manifest.json"

DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")

Dim = int | str  # a fixed size, or the name of a dynamic axis ("tiles", "seq", "past")

T = TypeVar("T")

# --- graph interface names: the exporter writes graphs with these, the runtime feeds them -------
VISION_GRAPH = "vision"
DECODER_GRAPH = "decoder"
CROSS_KV_GRAPH = "cross_kv"  # NVLM-X/H: image tokens -> every cross-attention block's key/value
PIXEL_VALUES = "pixel_values"  # vision input, float [tiles, 3, S, S]
IMAGE_FEATURES = "image_features"  # vision output spliced into the decoder sequence [tiles, 256, D]
CROSS_FEATURES = "cross_features"  # vision output for the cross key/value sequence [tiles, 256, D]
CROSS_EMBEDS = "cross_embeds"  # cross_kv input [1, K, D]; its outputs are decoder inputs by name
CROSS_ATTENTION_MASK = "cross_attention_mask"  # decoder input bool [1, seq, K]


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
class GraphSpec:
    """One ONNX graph (and, once built, its TensorRT engines) of a bundle."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"
    # Extra facts of quantized graphs: method, calibration provenance, excluded nodes.
    quantization: dict[str, Any] | None = None

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
    past_key: str = "past_key_values.{layer}.key"
    past_value: str = "past_key_values.{layer}.value"
    present_key: str = "present.{layer}.key"
    present_value: str = "present.{layer}.value"


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
        if self.engine not in LANGUAGE_ENGINES:
            raise BundleError(
                f"Unknown language engine '{self.engine}'",
                fix=f"Hand off to one of: {', '.join(LANGUAGE_ENGINES)}",
            )
        if self.tensor_parallel_size < 1:
            raise BundleError(f"tensor_parallel_size {self.tensor_parallel_size} is below 1")


@dataclass(frozen=True)
class Manifest:
    architecture: str
    source: SourceSpec
    graphs: dict[str, GraphSpec]
    embedding: EmbeddingSpec
    kv_cache: KVCacheSpec
    tokenizer: TokenizerSpec
    tiling: dict[str, Any]
    prompt: dict[str, Any]
    precision: str = "fp32"
    # Architecture-specific facts (for NVLM-X/H: the cross-attention layout), read by the
    # architecture's runtime strategy only.
    extras: dict[str, Any] = field(default_factory=dict)
    # TensorRT engines keyed by graph name, each with the TensorRT version and compute capability.
    engines: dict[str, Any] = field(default_factory=dict)
    # The decoder handed off to a serving engine (vLLM, TensorRT-LLM); None without a hand-off.
    language_engine: LanguageEngineSpec | None = None
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
        try:
            return _build(cls, data, where, lenient)
        except BundleError:
            raise
        except (TypeError, ValueError, KeyError) as error:
            raise BundleError(
                f"{where} is malformed", why=str(error), fix="Re-export the bundle"
            ) from error

    def save(self, bundle_dir: Path) -> Path:
        """Write manifest.json atomically (a crash never leaves a half-written manifest)."""
        path = Path(bundle_dir) / MANIFEST_NAME
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            f.write(text)
        os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600; a bundle is meant to be shared
        os.replace(f.name, path)
        return path


def load_manifest(bundle_dir: str | os.PathLike[str]) -> Manifest:
    """Read and validate a bundle's manifest; every failure is one BundleError line."""
    bundle = Path(bundle_dir)
    if not bundle.exists():
        raise BundleError(
            f"Bundle '{bundle}' does not exist",
            fix="Pass the directory written by nvlm-export export",
        )
    if not bundle.is_dir():
        raise BundleError(
            f"Bundle '{bundle}' is not a directory",
            fix="Pass the directory written by nvlm-export export, not a file in it",
        )
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(
            f"'{bundle}' is not a bundle",
            why=f"it has no {MANIFEST_NAME} (an export that failed or was interrupted leaves none)",
            fix="Export it again with nvlm-export export",
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(
            f"{path} is not valid JSON", why=str(error), fix="Re-export the bundle"
        ) from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object", fix="Re-export the bundle")
    manifest = Manifest.from_dict(data, where=str(path))
    _check_files_exist(manifest, bundle)
    return manifest


def _check_schema_version(version: Any, where: str) -> bool:
    """Return True when the manifest is a newer minor version (unknown keys then are ignored)."""
    ours = _parse_version(SCHEMA_VERSION, where)
    if not isinstance(version, str):
        raise BundleError(f"{where} has no schema_version", fix="Re-export the bundle")
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


def _build(cls: type[T], data: dict[str, Any], where: str, lenient: bool) -> T:
    if not isinstance(data, dict):
        raise BundleError(f"{where}: expected an object for {cls.__name__}, got {data!r}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown and not lenient:
        raise BundleError(
            f"{where} has unknown keys {unknown} in {cls.__name__}",
            why="they are not part of manifest schema " + SCHEMA_VERSION,
            fix="Check the file for typos or re-export the bundle",
        )
    values = {k: _convert(cls, k, v, where, lenient) for k, v in data.items() if k in known}
    return cls(**values)


# How the nested fields of each dataclass are built from JSON: a dataclass, or a mapping / list of
# them. Everything else passes through (lists become tuples, the manifest's dataclasses are frozen).
_NESTED: dict[tuple[type, str], tuple[str, type]] = {
    (Manifest, "source"): ("one", SourceSpec),
    (Manifest, "embedding"): ("one", EmbeddingSpec),
    (Manifest, "kv_cache"): ("one", KVCacheSpec),
    (Manifest, "tokenizer"): ("one", TokenizerSpec),
    (Manifest, "graphs"): ("mapping", GraphSpec),
    (Manifest, "language_engine"): ("optional", LanguageEngineSpec),
    (GraphSpec, "inputs"): ("list", TensorSpec),
    (GraphSpec, "outputs"): ("list", TensorSpec),
}


def _convert(cls: type, key: str, value: Any, where: str, lenient: bool) -> Any:
    kind, nested = _NESTED.get((cls, key), ("plain", object))
    here = f"{where}: {key}"
    if kind == "one" or (kind == "optional" and value is not None):
        return _build(nested, value, here, lenient)
    if kind == "mapping":
        return {name: _build(nested, v, f"{here}.{name}", lenient) for name, v in value.items()}
    if kind == "list":
        return tuple(_build(nested, v, here, lenient) for v in value)
    return tuple(value) if isinstance(value, list) else value


def _by_name(specs: tuple[TensorSpec, ...], name: str, where: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise BundleError(f"{where} has no tensor named '{name}'", fix="Re-export the bundle")


def _check_files_exist(manifest: Manifest, bundle: Path) -> None:
    files = [g.file for g in manifest.graphs.values()]
    files += [manifest.embedding.file, manifest.tokenizer.file, *manifest.tokenizer.config_files]
    if manifest.language_engine is not None:
        files.append(f"{manifest.language_engine.checkpoint}/config.json")
    for name in files:
        if not (bundle / name).is_file():
            raise BundleError(
                f"Bundle '{bundle}' is incomplete",
                why=f"its manifest names '{name}', which is missing",
                fix="Re-export the bundle",
            )
