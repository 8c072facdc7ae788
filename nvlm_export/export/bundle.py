"""`export_bundle`: a checkpoint directory in, a validated bundle directory out.

    config.json ──▶ model skeleton ──trace──▶ vision.onnx, decoder.onnx (+ cross_kv.onnx)
    safetensors ──one tensor at a time──▶ their weights, embed_tokens.npy
    checkpoint files ──▶ tokenizer/, manifest.json (last)
    bundle ──ONNX Runtime, then PyTorch, on a real tiled image + prompt──▶ validation report

Everything is written into a staging directory beside the output (nvlm_export/output.py: one per
output name, locked); the manifest is written last, after validation passed, and the directory is
then moved into place, so a failed or interrupted export never leaves a directory that looks like
a bundle.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nvlm_export.defaults import default_max_context
from nvlm_export.errors import InputError, ValidationError
from nvlm_export.export.architectures import ArchitectureExport, architecture_for_layout
from nvlm_export.export.decoder import DEFAULT_OPSET, DTYPES, NUMPY_DTYPE, LanguageExport
from nvlm_export.export.fused_attention import add_onnxruntime_variants
from nvlm_export.export.onnx_utils import GraphIO, write_embedding_table
from nvlm_export.export.validate import ValidationReport, validate_bundle
from nvlm_export.export.vision import VisionGraph, export_vision_onnx
from nvlm_export.export.weights import CheckpointWeights, model_skeleton
from nvlm_export.models.checkpoint import (
    check_stored_tensors,
    checkpoint_file,
    load_checkpoint,
    open_checkpoint,
)
from nvlm_export.models.config_io import read_config
from nvlm_export.output import BUNDLE, publish_bundle, staged_output
from nvlm_export.progress import Stages
from nvlm_export.runtime.manifest import (
    PAST_KEY,
    VISION_GRAPH,
    EmbeddingSpec,
    GraphSpec,
    KVCacheSpec,
    Manifest,
    SourceSpec,
    TensorSpec,
    TokenizerSpec,
    layer_tensor,
)

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class ExportSettings:
    dtype: str = "fp32"
    max_tiles: int | None = None  # default: the checkpoint's max_dynamic_patch
    max_context: int | None = None  # default: defaults.default_max_context
    opset: int = DEFAULT_OPSET
    validate: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InputError(f"Unknown dtype '{self.dtype}'", fix="Choose fp32 or fp16")


@dataclass
class ExportReport:
    bundle: Path
    manifest: Manifest
    validation: ValidationReport | None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def bundle_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.bundle.rglob("*") if p.is_file())


def export_bundle(
    checkpoint: Path, out: Path, settings: ExportSettings = ExportSettings(), *, quiet: bool = False
) -> ExportReport:
    """Export `checkpoint` to a bundle at `out`; raise (leaving nothing at `out`) on failure.

    The graphs are traced from a skeleton of the model (no weights in memory) and their weights
    streamed from the checkpoint (`export/weights.py`); only validation loads the model.
    """
    dtype = DTYPES[settings.dtype]
    read_config(checkpoint)  # not a checkpoint: said before anything else is looked for
    output = staged_output(out, BUNDLE, overwrite=settings.overwrite, sources=[checkpoint])
    with output as staged, Stages(f"Exporting {checkpoint} → {out}", quiet=quiet) as stages:
        tokenizer_sources(Path(checkpoint))  # a missing or linked-out tokenizer fails before work
        with stages.stage("read checkpoint (config and tensor headers)"):
            config, stored = open_checkpoint(checkpoint)
            arch = architecture_for_layout(config.layout)
            model = model_skeleton(config, dtype)
            check_stored_tensors(model, stored, config.layout)
            weights = CheckpointWeights(model, stored, config.layout, dtype)
        stages.note(f"architecture {arch.name}, layout {config.layout}, {settings.dtype}")
        manifest = _write_bundle(model, weights, arch, checkpoint, staged.path, settings, stages)
        with stages.stage("ONNX Runtime variants (fused attention)"):
            manifest = add_onnxruntime_variants(staged.path, manifest)
        validation = None
        if settings.validate:
            with stages.stage("validate against PyTorch (ONNX Runtime)"):
                validation = validate_bundle(
                    staged.path,
                    lambda: load_checkpoint(checkpoint, dtype=dtype),
                    arch,
                    manifest=manifest,
                )
            for line in validation.summary_lines():
                stages.note(line)
            if not validation.passed:
                raise ValidationError(
                    "The exported bundle does not match the PyTorch model",
                    why=validation.failure_reason(),
                    fix="Re-run with --verbose and report it, or pass --no-validate to keep it",
                )
        manifest = publish_bundle(staged, manifest)
    return ExportReport(out, manifest, validation, dict(stages.seconds))


def _write_bundle(
    model: torch.nn.Module,
    weights: CheckpointWeights,
    arch: ArchitectureExport,
    checkpoint: Path,
    bundle: Path,
    settings: ExportSettings,
    stages: Stages,
) -> Manifest:
    config = model.config
    max_context = settings.max_context or default_max_context(config.llm_config)
    with stages.stage("vision graph"):
        vision = export_vision_onnx(
            VisionGraph(model.vision, arch.vision_outputs(model)),
            bundle / "vision.onnx",
            tile_size=config.vision.image_size,
            tokens_per_tile=config.tokens_per_tile,
            hidden_size=config.llm_hidden_size,
            opset=settings.opset,
            weights=weights,
        )
    with stages.stage("language graphs"):
        request = LanguageExport(
            model, bundle, settings.dtype, settings.opset, max_context, weights
        )
        language = arch.hooks.export_language(request)
    with stages.stage("embedding table and tokenizer"):
        embed = model.embed_tokens.weight
        key, shape = weights.key_of(embed), tuple(embed.shape)
        vocab, hidden = write_embedding_table(
            weights.row_blocks(key, shape),
            shape,
            bundle / "embed_tokens.npy",
            dtype=NUMPY_DTYPE[DTYPES[settings.dtype]],
        )
        tokenizer_files = _copy_tokenizer(checkpoint, bundle)
    graphs = {VISION_GRAPH: vision, **language}
    manifest = Manifest(
        architecture=arch.name,
        source=SourceSpec(
            checkpoint=str(Path(checkpoint).resolve()),
            layout=config.layout,
            settings={**asdict(settings), "max_context": max_context},
        ),
        graphs={name: graph_spec(io, settings.dtype) for name, io in graphs.items()},
        embedding=EmbeddingSpec(
            "embed_tokens.npy", vocab, hidden, NUMPY_DTYPE[DTYPES[settings.dtype]]
        ),
        kv_cache=_kv_cache_spec(language["decoder"], max_context),
        tokenizer=_tokenizer_spec(model, arch, bundle, tokenizer_files),
        tiling=config.tiling(settings.max_tiles),
        prompt=replace(arch.prompt_format, tokens_per_tile=config.tokens_per_tile),
        precision=settings.dtype,
    )
    return manifest  # saved by publish_bundle, after validation


def graph_spec(io: GraphIO, precision: str) -> GraphSpec:
    """A traced graph's interface as a manifest entry."""

    def tensors(items: tuple[Any, ...]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, t.dtype, t.shape) for t in items)

    return GraphSpec(io.file, tensors(io.inputs), tensors(io.outputs), precision=precision)


def _kv_cache_spec(decoder: GraphIO, max_context: int) -> KVCacheSpec:
    """Cache layout read off the decoder's past inputs: (batch, kv_heads, past, head_dim)."""
    inputs = {t.name: t for t in decoder.inputs}
    first = inputs[layer_tensor(PAST_KEY, 0)]
    _, kv_heads, _, head_dim = first.shape
    return KVCacheSpec(
        num_layers=sum(layer_tensor(PAST_KEY, i) in inputs for i in range(len(inputs))),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        max_context=max_context,
        dtype=first.dtype,
    )


def _tokenizer_spec(
    model: torch.nn.Module, arch: ArchitectureExport, bundle: Path, files: list[str]
) -> TokenizerSpec:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / files[0]))
    eos = [tokenizer.token_to_id(arch.prompt_format.eos_token)]
    configured = model.config.llm_config.get("eos_token_id")
    eos += configured if isinstance(configured, list) else [configured]
    eos_ids = tuple(dict.fromkeys(int(t) for t in eos if t is not None))
    return TokenizerSpec(
        file=files[0],
        eos_token_ids=eos_ids,
        placeholder_token_id=int(model.config.image_token_id),
        config_files=tuple(files[1:]),
    )


def _copy_tokenizer(checkpoint: Path, bundle: Path) -> list[str]:
    """Copy the checkpoint's tokenizer files into the bundle; returns their bundle paths."""
    (bundle / TOKENIZER_DIR).mkdir()
    copied = []
    for name, source in tokenizer_sources(checkpoint).items():
        shutil.copyfile(source, bundle / TOKENIZER_DIR / name)
        copied.append(f"{TOKENIZER_DIR}/{name}")
    return copied


def tokenizer_sources(checkpoint: Path) -> dict[str, Path]:
    """The checkpoint's tokenizer files, each inside the checkpoint; tokenizer.json is required
    (the runtime reads it). Cheap, so an export calls it before any work too."""
    if not (checkpoint / "tokenizer.json").is_file():
        raise InputError(
            f"{checkpoint} has no tokenizer.json",
            why="the runtime tokenizes with the `tokenizers` library, which reads tokenizer.json",
            fix="Save the tokenizer with transformers' save_pretrained (fast tokenizer) first",
        )
    found = {name: checkpoint_file(checkpoint, name) for name in TOKENIZER_FILES}
    return {name: path for name, path in found.items() if path is not None}
