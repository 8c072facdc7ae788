"""The memory plan: peak RSS, disk and output size of every build stage, predicted from config.json.

    config.json ──meta-device model (shapes, no weights)──▶ Inventory ──stage formulas──▶ StagePlan

The inventory counts, per bundle graph, the weights it will hold (which graph holds which
parameter is the architecture's `graph_parameters` table, `export/architectures.py`), plus the
few sizes the formulas need: the largest single tensor, the largest layer, the KV cache per token.
Each stage's prediction is then a short sum of named terms, one function per stage below, with the
reasoning in its docstring. The constants are measured (docs/memory.md has the table they come
from and `bench/memory.py` re-measures them): they are what this toolchain holds, not guesses.

Two kinds of stage:
- stages that only move weights (export without validation, weight-only INT4 without its
  accuracy check, the dry-run itself) stream one tensor at a time: their peak is a fixed overhead
  plus a few copies of the largest tensor, independent of depth;
- stages that run the model (export validation, calibration, the accuracy check, INT8/FP8
  quantization, which calibrates) hold the weights of the graphs they run once, plus activations.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvlm_export.defaults import REFERENCE_CHUNK_TOKENS, default_max_context
from nvlm_export.models.config import AttentionHeads
from nvlm_export.models.families.spec import EMBEDDING_TABLE as EMBEDDING
from nvlm_export.runtime.caches import DEFAULT_FEATURE_CACHE_BYTES, DEFAULT_PREFIX_CACHE_BYTES
from nvlm_export.runtime.manifest import DECODER_GRAPH, QUANTIZED_PRECISIONS, VISION_GRAPH

GiB = 1024**3

# The Python process with torch, onnx and onnxruntime imported, the traced graph structure and
# the row-block buffers: what a stage costs before it holds a whole weight (measured: export of
# a tiny checkpoint 0.46 GiB, of the bench checkpoint 0.74 GiB; calibrate 0.5 and quantize 1.1
# with onnxruntime.quantization imported, on tiny checkpoints).
BASE_OVERHEAD = int(0.7 * GiB)
QUANTIZE_OVERHEAD = int(1.1 * GiB)
# INT4 without the accuracy check imports neither torch nor onnxruntime's session machinery and
# holds only the largest weight's INT4 result (values, packed bytes, their serialised copy):
# fitted on the bench and 3b checkpoints at 450bf28, 0.43 and 0.81 GiB measured (docs/memory.md).
INT4_OVERHEAD = int(0.15 * GiB)
INT4_RESULT_BYTES = 2.25
# The dry-run imports torch and builds a meta-device model: 0.36 GiB measured for the bench, 3b
# and NVLM-D-72B configs alike.
DRY_RUN = int(0.4 * GiB)
# A graph below the external-data threshold is serialized inline as one protobuf: the model
# proto, its serialized bytes and the tensors being copied in are alive together (measured on
# the bench checkpoint's 1.2 GB fp32 vision graph: 2.8x its bytes).
INLINE_COPIES = 2.8
# Activation working set of one ViT tile, in fp32 values per ViT width: (1025 positions) x
# (4 * intermediate + qkv) transients; we keep a round factor. The runtime encodes one tile per
# vision call (Pipeline's DEFAULT_VISION_TILES_PER_CALL).
VISION_ACTIVATION_VALUES_PER_TILE = 1025 * 12
# Bytes per weight of each encoding (scales included: INT4 blocks of 128 share one fp32 scale).
WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5 + 4 / 128}
# Bytes per weight ONNX Runtime's CPU kernels hold once a graph is loaded and has run (measured
# on the bench bundles, one graph per session): fp16 MatMuls have no CPU kernel, so ORT casts to
# fp32 and folds the Casts of the weights into fp32 copies (fp16 vision 1.31 GiB resident for
# 0.57 GiB of weights); INT8 weights are pre-packed for the integer GEMMs, beside what the
# graph keeps: 1.2x the stored bytes with the VNNI/AMX kernels (decoder 0.55 GiB for 0.46),
# 1.7x with the exact kernels x86 CPUs without VNNI get (decoder 0.77 for 0.46, vision 0.44 for
# 0.29; docs/quantization.md), so the larger; INT4 `MatMulNBits` pre-packs its blocks for the
# int8-compute kernels: 1.5x after loading (decoder 0.36 GiB for 0.245), 2x fits the bench INT4
# bundle's serving peak (docs/memory.md, "Serving a bundle"); FP8 has no CPU kernel either, its
# weights are dequantized to fp32 when the graph runs, beside the FP8 bytes (measured: the FP8
# accuracy check peaks at 5.3 GiB on the bench checkpoint where the INT8 one peaks at 3.7).
CPU_RUN_BYTES = {
    "fp32": 4.0,
    "fp16": 4.0,
    "int8": 1.7,
    "fp8": 4.0 + 1.0,
    "int4": 2.0 * WEIGHT_BYTES["int4"],
}
# The runtime process before it holds a weight: numpy, ONNX Runtime and tokenizers imported,
# the bundle's tokenizer, ONNX Runtime's sessions and thread pools (measured: `nvlm-export run`
# on the demo INT8 bundle, whose weights are a few MB, peaks at 0.14 GiB).
RUNTIME_OVERHEAD = int(0.15 * GiB)
# The runtime's reuse caches (image features, prefilled keys/values) fill up to their default
# budgets over a session (runtime/caches.py).
REUSE_CACHE_BYTES = DEFAULT_FEATURE_CACHE_BYTES + DEFAULT_PREFIX_CACHE_BYTES
# OpenVINO, running a decoder's prompt beside ONNX Runtime's decoder, loads its libraries and
# holds the graph file mapped and its weights repacked for its kernels: fitted on the bench
# INT8 and INT4 bundles' peaks with and without `prefill=openvino` (docs/memory.md "Serving a
# bundle"; AMX, the larger of the two CPUs measured: +1.36 and +0.91 GiB).
OPENVINO_OVERHEAD = int(0.4 * GiB)
OPENVINO_DECODER_COPIES = 2.1
# HF eager attention (the PyTorch reference) holds about three [heads, chunk, T] score tensors of
# one layer at a time (scores, scores plus the causal mask, the softmax in fp32), 4 bytes each:
# the reference prefills the prompt in chunks (nvlm_export/defaults.py REFERENCE_CHUNK_TOKENS).
REFERENCE_SCORE_BYTES = 3 * 4
# The prompt around the image tokens, for sizing calibration and the accuracy check.
PROMPT_TOKENS = 64

STAGES = (
    "export fp32",
    "export fp32 + validation",
    "export fp16",
    "export fp16 + validation",
    "calibrate",
    "calibrate vision",
    "quantize int8",
    "quantize int8 + accuracy check",
    "quantize fp8",
    "quantize fp8 + accuracy check",
    "quantize int4",
    "quantize int4 + int8 vision",
    "quantize int4 + accuracy check",
    "dry-run",
)

# The bundles a build can leave, as the serving prediction names them -> (their precision,
# whether the graphs that need activation ranges got them): every precision, and an INT4 bundle
# whose vision graph stayed in fp32 (the weight-only build).
WEIGHT_ONLY_INT4 = "int4 weight-only"
SERVED: dict[str, tuple[str, bool]] = {
    **{precision: (precision, True) for precision in ("fp32", "fp16", *QUANTIZED_PRECISIONS)},
    WEIGHT_ONLY_INT4: ("int4", False),
}


@dataclass(frozen=True)
class Inventory:
    """What the formulas need to know about one model, in parameter counts."""

    graph_parameters: dict[str, int]  # bundle graph (or "embedding" table) -> parameters
    gemm_parameters: dict[str, int]  # graph -> parameters in 2-D weights (the quantizable GEMMs)
    lm_head_parameters: int
    largest_tensor: int
    largest_transposed: int  # the largest GEMM weight other than the vocabulary-sized ones
    largest_layer: int
    vision_width: int
    llm_width: int
    llm_heads: int
    kv_values_per_token: int  # keys + values over all decoder layers, per token
    tokens_per_tile: int
    tile_size: int  # pixels per side
    max_tiles: int
    max_context: int
    validation_tiles: int  # tiles of export validation's image (the example image)
    source_bytes: int  # the checkpoint's weights on disk (its dtype)

    @property
    def source_itemsize(self) -> float:
        """Bytes per stored weight (2 for a bf16 checkpoint)."""
        return self.source_bytes / self.run_parameters() if self.source_bytes else 2.0

    @property
    def graphs(self) -> list[str]:
        return [g for g in self.graph_parameters if g != EMBEDDING]

    def run_parameters(self) -> int:
        """Weights the runtime holds to answer a request: every graph plus the embedding table."""
        return sum(self.graph_parameters.values())


def weight_only(validate: bool, accuracy_check: bool) -> bool:
    """Whether an INT4 build is weight-only: with neither validation nor the accuracy check no
    stage runs the model, so the vision graph is not calibrated either and stays in float."""
    return not validate and not accuracy_check


@dataclass(frozen=True)
class StagePlan:
    stage: str
    peak_bytes: int
    output_bytes: int
    runs_model: bool


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    inventory: Inventory
    stages: dict[str, StagePlan]
    available_bytes: int | None
    accuracy_check: str  # where the accuracy check can run (one sentence)
    notes: list[str] = field(default_factory=list)
    # bundle kind (a SERVED key) -> peak RSS serving it on ONNX Runtime, and what its prompt on
    # OpenVINO adds
    serving: dict[str, int] = field(default_factory=dict)
    openvino_prompt: dict[str, int] = field(default_factory=dict)

    def build_stages(
        self, precision: str, accuracy_check: bool = True, validate: bool = True
    ) -> list[StagePlan]:
        """The stages `build --precision P` runs, in order (`--no-validate` and
        `--no-accuracy-check` leave out the stages that run the model to check it)."""
        validation = " + validation" if validate else ""
        if precision == "fp16":
            return [self.stages[f"export fp16{validation}"]]
        names = [f"export fp32{validation}"]
        if precision != "int4":
            names.append("calibrate")
            names.append(f"quantize {precision}" + (" + accuracy check" if accuracy_check else ""))
        elif weight_only(validate, accuracy_check):
            names.append("quantize int4")
        else:  # INT4 builds calibrate and quantize the vision graph only (INT8), as build does
            names.append("calibrate vision")
            names.append(
                "quantize int4 + accuracy check"
                if accuracy_check
                else "quantize int4 + int8 vision"
            )
        return [self.stages[n] for n in names]

    @staticmethod
    def served(precision: str, validate: bool = True, accuracy_check: bool = True) -> str:
        """The kind of bundle `build --precision P` (with those checks) leaves to serve."""
        weight_only_int4 = precision == "int4" and weight_only(validate, accuracy_check)
        return WEIGHT_ONLY_INT4 if weight_only_int4 else precision

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "available_bytes": self.available_bytes,
            "accuracy_check": self.accuracy_check,
            "stages": {
                name: {
                    "peak_bytes": s.peak_bytes,
                    "output_bytes": s.output_bytes,
                    "runs_model": s.runs_model,
                }
                for name, s in self.stages.items()
            },
            "notes": self.notes,
            "serving": {
                kind: {"peak_bytes": peak, "openvino_prompt_bytes": self.openvino_prompt[kind]}
                for kind, peak in self.serving.items()
            },
            "reuse_cache_bytes": REUSE_CACHE_BYTES,
        }


# --- inventory -----------------------------------------------------------------------------------


def inventory(
    checkpoint: Path, max_tiles: int | None = None, max_context: int | None = None
) -> Inventory:
    """Count the weights of `checkpoint` per bundle graph, from its config.json alone."""
    import torch

    from nvlm_export.export.architectures import architecture_for_layout
    from nvlm_export.models.config_io import read_config
    from nvlm_export.models.model import build_model

    config = read_config(checkpoint)
    arch = architecture_for_layout(config.layout)
    with torch.device("meta"):
        model = build_model(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    graph_parameters: dict[str, int] = defaultdict(int)
    gemm_parameters: dict[str, int] = defaultdict(int)
    layers: dict[str, int] = defaultdict(int)
    llm = config.llm_config
    vocabulary_sized = int(llm["vocab_size"]) * int(llm["hidden_size"])
    largest_transposed = 0
    for name, shape in shapes.items():
        graph = arch.graph_of(name)
        graph_parameters[graph] += math.prod(shape)
        if graph != EMBEDDING and len(shape) == 2 and name.endswith(".weight"):
            gemm_parameters[graph] += math.prod(shape)
            if math.prod(shape) != vocabulary_sized:
                largest_transposed = max(largest_transposed, math.prod(shape))
        layer = re.match(r"(.*layers\.\d+)\.", name)
        if layer:
            layers[layer.group(1)] += math.prod(shape)
    attention = AttentionHeads.of(llm)
    context = max_context or default_max_context(llm)
    return Inventory(
        graph_parameters=dict(graph_parameters),
        gemm_parameters=dict(gemm_parameters),
        lm_head_parameters=vocabulary_sized,
        largest_tensor=max(math.prod(s) for s in shapes.values()),
        largest_transposed=largest_transposed,
        largest_layer=max(layers.values(), default=0),
        vision_width=config.vision.hidden_size,
        llm_width=int(llm["hidden_size"]),
        llm_heads=int(llm["num_attention_heads"]),
        kv_values_per_token=2
        * int(llm["num_hidden_layers"])
        * attention.kv_heads
        * attention.head_dim,
        tokens_per_tile=config.tokens_per_tile,
        tile_size=config.vision.image_size,
        max_tiles=max_tiles or config.max_dynamic_patch,
        max_context=context,
        validation_tiles=_validation_tiles(config, max_tiles),
        source_bytes=_weights_on_disk(Path(checkpoint)),
    )


def _validation_tiles(config: Any, max_tiles: int | None) -> int:
    """How many tiles export validation's example image becomes (from its size alone)."""
    from PIL import Image

    from nvlm_export.assets import example_image_path
    from nvlm_export.runtime.tiling import choose_grid, tile_count

    tiling = config.tiling(max_tiles)
    with Image.open(example_image_path()) as image:
        return tile_count(choose_grid(image.width, image.height, tiling), tiling)


def _weights_on_disk(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))


# --- the stages ----------------------------------------------------------------------------------


def bundle_bytes(inv: Inventory, dtype: str) -> int:
    """An exported bundle: every graph's weights and the embedding table in `dtype`."""
    return int(inv.run_parameters() * WEIGHT_BYTES[dtype])


def streamed_export(inv: Inventory, dtype: str) -> int:
    """Export without validation: trace a weightless skeleton, copy tensors one at a time.

    Each initializer goes from the safetensors shard into the external-data file in row blocks
    of at most 64 MiB (included in the overhead); a weight the graph stores transposed (the
    MatMul weights of the layers; not the vocabulary-sized head and embedding, which are written
    as stored) is held whole, once in the checkpoint's dtype and once in the export dtype, so
    the largest such weight decides. A graph small enough to be
    written inline (below onnx_utils' external-data threshold) is instead serialized in one
    piece, which holds INLINE_COPIES times its bytes. Graphs are written one after the other:
    the larger of the two terms is the peak. Nothing here depends on depth.
    """
    from nvlm_export.export.onnx_utils import EXTERNAL_DATA_THRESHOLD_BYTES

    in_flight = inv.largest_transposed * (inv.source_itemsize + WEIGHT_BYTES[dtype])
    # The threshold is applied to the exported module, and the decoder's module also owns the
    # embedding table (which is written beside the graph, not into it).
    embedding = inv.graph_parameters.get(EMBEDDING, 0)
    inline = [
        params * WEIGHT_BYTES[dtype]
        for graph, params in inv.graph_parameters.items()
        if graph != EMBEDDING
        and (params + (embedding if graph == DECODER_GRAPH else 0)) * WEIGHT_BYTES[dtype]
        <= EXTERNAL_DATA_THRESHOLD_BYTES
    ]
    return int(BASE_OVERHEAD + max([in_flight, *(INLINE_COPIES * b for b in inline)]))


def running(inv: Inventory, graphs: list[str], precision: str = "fp32") -> int:
    """The runtime running `graphs` of a `precision` bundle on ONNX Runtime: each graph's weights
    as its CPU kernels hold them (`CPU_RUN_BYTES`), once, plus one tile's ViT activations and a
    full-context KV cache. The embedding table is memory-mapped (only the rows looked up are
    read), so it is not counted.
    """
    weights = held_weights(inv, graphs, precision)
    return int(BASE_OVERHEAD + weights + _activations(inv, graphs, precision))


def held_weights(
    inv: Inventory, graphs: list[str], precision: str, calibrated: bool = True
) -> float:
    """The weights of `graphs` of a `precision` bundle as ONNX Runtime's CPU kernels hold them
    (`CPU_RUN_BYTES`)."""
    return sum(graph_bytes(inv, g, precision, CPU_RUN_BYTES, calibrated) for g in graphs)


def serving(inv: Inventory, precision: str, calibrated: bool = True) -> int:
    """The runtime serving a `precision` bundle (`run`, `chat`, the C API) on ONNX Runtime's CPU
    provider: every graph's weights as its kernels hold them, and the larger of two moments that
    never overlap: loading, when ONNX Runtime holds the LM head (the largest weight) as read
    beside its pre-packed copy, and a request, with one tile's activations and a full-context
    KV cache. The reuse caches come on top as they fill, up to their budgets
    (`REUSE_CACHE_BYTES`); a prompt on OpenVINO adds `openvino_prompt`."""
    weights = held_weights(inv, inv.graphs, precision, calibrated)
    loading = inv.lm_head_parameters * CPU_RUN_BYTES[lm_head_precision(precision)]
    request = _activations(inv, inv.graphs, precision)
    return int(RUNTIME_OVERHEAD + weights + max(loading, request))


def lm_head_precision(precision: str) -> str:
    """The LM head's precision in a `precision` bundle built with the defaults (float unless
    the precision quantizes it by default)."""
    from nvlm_export.export.quantize import PRECISION_PLAN, QUANTIZE_LM_HEAD_BY_DEFAULT

    if QUANTIZE_LM_HEAD_BY_DEFAULT.get(precision):
        return PRECISION_PLAN[precision][DECODER_GRAPH]
    return "fp16" if precision == "fp16" else "fp32"


def openvino_prompt(inv: Inventory, precision: str, calibrated: bool = True) -> int:
    """What a decoder's prompt on OpenVINO adds (`--backend auto` with an INT4 decoder on CPUs
    with AMX or AVX-512 BF16, or `prefill=openvino`): OpenVINO's libraries and plugin, and the
    decoder held beside ONNX Runtime's copy, its file mapped and its weights repacked."""
    stored = graph_bytes(inv, DECODER_GRAPH, precision, calibrated=calibrated)
    return int(OPENVINO_OVERHEAD + OPENVINO_DECODER_COPIES * stored)


def _activations(inv: Inventory, graphs: list[str], precision: str) -> float:
    vision = VISION_ACTIVATION_VALUES_PER_TILE * inv.vision_width * WEIGHT_BYTES["fp32"]
    kv_bytes = WEIGHT_BYTES["fp16" if precision == "fp16" else "fp32"]
    kv_cache = inv.kv_values_per_token * inv.max_context * kv_bytes
    return (vision if VISION_GRAPH in graphs else 0) + (kv_cache if DECODER_GRAPH in graphs else 0)


def graph_bytes(
    inv: Inventory,
    graph: str,
    precision: str,
    per_weight: dict[str, float] = WEIGHT_BYTES,
    calibrated: bool = True,
) -> float:
    """One graph of a `precision` bundle: its GEMM weights in the precision the graph takes
    (`PRECISION_PLAN`; a float bundle: all of it), the rest fp32, at `per_weight` bytes each.
    Without `calibrated`, graphs that need activation ranges stay in fp32 (INT4's vision graph
    when quantize gets no calibration set)."""
    from nvlm_export.export.quantize import (
        CALIBRATED_PRECISIONS,
        PRECISION_PLAN,
        QUANTIZE_LM_HEAD_BY_DEFAULT,
    )

    params = inv.graph_parameters[graph]
    if precision not in PRECISION_PLAN:  # fp32 or fp16: every weight in that dtype
        return params * per_weight[precision]
    target = PRECISION_PLAN[precision].get(graph)
    if target is None or (target in CALIBRATED_PRECISIONS and not calibrated):
        return params * per_weight["fp32"]
    gemm = inv.gemm_parameters.get(graph, 0)
    keep_head = not QUANTIZE_LM_HEAD_BY_DEFAULT[precision]
    head = inv.lm_head_parameters if keep_head and graph == DECODER_GRAPH else 0
    return (gemm - head) * per_weight[target] + (params - gemm + head) * per_weight["fp32"]


def reference_run(inv: Inventory, dtype: str) -> int:
    """The PyTorch reference of export validation: every weight in `dtype` (the head and the
    embedding table included), the eager attention scores of one layer for one chunk of the
    validation prompt against all of it (`REFERENCE_SCORE_BYTES`), and its KV cache in `dtype`."""
    tokens = inv.validation_tiles * inv.tokens_per_tile + PROMPT_TOKENS
    chunk = min(tokens, REFERENCE_CHUNK_TOKENS)
    scores = REFERENCE_SCORE_BYTES * inv.llm_heads * chunk * tokens
    cache = inv.kv_values_per_token * tokens * WEIGHT_BYTES[dtype]
    return int(BASE_OVERHEAD + inv.run_parameters() * WEIGHT_BYTES[dtype] + scores + cache)


def validated_export(inv: Inventory, dtype: str) -> int:
    """Export with validation: the bundle's graphs run one at a time (export/validate.py: the
    vision graph, unloaded, then the decoder's side), then the PyTorch reference; one model is
    resident at a time, so the largest of these phases is the peak."""
    vision = [g for g in inv.graphs if g == VISION_GRAPH]
    language = [g for g in inv.graphs if g != VISION_GRAPH]
    bundle = max(running(inv, vision, dtype), running(inv, language, dtype))
    return max(streamed_export(inv, dtype), bundle, reference_run(inv, dtype))


def calibrate(inv: Inventory) -> int:
    """Calibration runs every graph of the fp32 bundle at once (Pipeline.load); the feeds are
    streamed to disk."""
    return running(inv, inv.graphs)


def calibrate_vision(inv: Inventory) -> int:
    """Vision-only calibration (INT4 builds) loads and runs the fp32 vision graph alone."""
    return running(inv, [VISION_GRAPH])


def quantized_bytes(inv: Inventory, precision: str, calibrated: bool = True) -> int:
    """The quantized bundle on disk: every graph (`graph_bytes`) and the fp32 embedding table."""
    embedding = inv.graph_parameters.get(EMBEDDING, 0) * WEIGHT_BYTES["fp32"]
    graphs = sum(graph_bytes(inv, g, precision, calibrated=calibrated) for g in inv.graphs)
    return int(embedding + graphs)


def quantize_int4(inv: Inventory) -> int:
    """INT4 weight-only quantization without the accuracy check: nothing runs the model.

    Each weight is read a 64 MiB block of rows at a time and quantized; only its INT4 result is
    held whole (for a stored [N, K] head unpacked, one byte a value, then packed and serialised),
    so the largest tensor costs INT4_RESULT_BYTES per value, not its fp32 bytes. Nothing else
    grows with the model: the written tensors leave memory at once.
    """
    return int(INT4_OVERHEAD + INT4_RESULT_BYTES * inv.largest_tensor)


def quantize(inv: Inventory, precision: str, calibrated: bool = True) -> int:
    """Weight quantization without the accuracy check.

    INT4 weights: `quantize_int4`. INT8 and FP8 weights are quantized one initializer at a time
    (read, scaled, rounded: about three fp32 copies of the largest tensor in flight). Graphs
    quantized to INT8 or FP8 (every graph of such a bundle; an INT4 bundle's vision graph, when
    `calibrated`) first fit activation ranges on the calibration set with one ONNX Runtime
    session per graph (running amax, nothing stored): that graph's fp32 weights once (ONNX
    Runtime's pre-packed MatMul weights replace the originals: measured, quantize int8 without
    the check peaks at 2.73 GiB on the bench checkpoint, 1.84 GiB of it the decoder's weights)
    and one sample's activations, in a process with onnx and ONNX Runtime's graph tools loaded
    (QUANTIZE_OVERHEAD). The larger phase is the peak.
    """
    from nvlm_export.export.quantize import CALIBRATED_PRECISIONS, PRECISION_PLAN

    if precision == "int4":
        streamed = quantize_int4(inv)
    else:
        streamed = int(BASE_OVERHEAD + 3 * inv.largest_tensor * WEIGHT_BYTES["fp32"])
    plan = PRECISION_PLAN[precision]
    ranged = [g for g in inv.graphs if calibrated and plan.get(g) in CALIBRATED_PRECISIONS]
    if not ranged:
        return streamed
    ranges = max(inv.graph_parameters[graph] * WEIGHT_BYTES["fp32"] for graph in ranged)
    return max(streamed, int(QUANTIZE_OVERHEAD + ranges))


def accuracy_check(inv: Inventory, precision: str, calibrated: bool = True) -> int:
    """The accuracy check decodes held-out requests with the fp32 and the quantized bundle.

    They run one after the other (export/accuracy.py): the fp32 bundle answers every request and
    is unloaded before the quantized one is loaded, so the larger of the two runs decides. For
    INT8 and INT4 that is the fp32 run (their weights stay quantized on the CPU); FP8 weights are
    dequantized to fp32 when they run (`CPU_RUN_BYTES`), so its quantized run is the larger.
    """
    reference = running(inv, inv.graphs)
    weights = held_weights(inv, inv.graphs, precision, calibrated)
    quantized = BASE_OVERHEAD + weights + _activations(inv, inv.graphs, "fp32")
    return int(max(reference, quantized))


def calibration_bytes(
    inv: Inventory, requests: int = 16, decode_steps: int = 4, vision_only: bool = False
) -> int:
    """The calibration set on disk: every graph call's feeds, in fp32.

    Per request: the tiles and a thumbnail (3 x tile_size²), the prompt's embeddings, and per
    decode step the whole KV cache of the prompt so far (that is what the decoder is fed);
    `vision_only`: the tiles.
    """
    tokens = (inv.max_tiles + 1) * inv.tokens_per_tile + PROMPT_TOKENS
    tiles = (inv.max_tiles + 1) * 3 * inv.tile_size**2
    if vision_only:
        return int(requests * tiles * WEIGHT_BYTES["fp32"])
    embeds = tokens * inv.llm_width
    kv = decode_steps * inv.kv_values_per_token * tokens
    return int(requests * (tiles + embeds + kv) * WEIGHT_BYTES["fp32"])


def plan(
    checkpoint: Path,
    max_tiles: int | None = None,
    max_context: int | None = None,
    available_bytes: int | None = None,
) -> MemoryPlan:
    """Predict every stage of `checkpoint`'s build (see the module docstring)."""
    inv = inventory(checkpoint, max_tiles, max_context)
    fp32, fp16 = bundle_bytes(inv, "fp32"), bundle_bytes(inv, "fp16")
    stages = [
        StagePlan("export fp32", streamed_export(inv, "fp32"), fp32, False),
        StagePlan("export fp32 + validation", validated_export(inv, "fp32"), fp32, True),
        StagePlan("export fp16", streamed_export(inv, "fp16"), fp16, False),
        StagePlan("export fp16 + validation", validated_export(inv, "fp16"), fp16, True),
        StagePlan("calibrate", calibrate(inv), calibration_bytes(inv), True),
        StagePlan(
            "calibrate vision",
            calibrate_vision(inv),
            calibration_bytes(inv, vision_only=True),
            True,
        ),
    ]
    for precision in QUANTIZED_PRECISIONS:
        out = quantized_bytes(inv, precision)
        name = f"quantize {precision}"
        if precision == "int4":  # without a calibration set: weight-only, vision left in fp32
            weight_only = quantized_bytes(inv, precision, calibrated=False)
            stages.append(StagePlan(name, quantize(inv, precision, False), weight_only, False))
            name = "quantize int4 + int8 vision"
        peak = quantize(inv, precision)
        stages.append(StagePlan(name, peak, out, True))
        check = max(peak, accuracy_check(inv, precision))
        stages.append(StagePlan(f"quantize {precision} + accuracy check", check, out, True))
    stages.append(StagePlan("dry-run", DRY_RUN, 0, False))
    by_name = {s.stage: s for s in stages}
    weight_only = max(by_name["export fp32"].peak_bytes, by_name["quantize int4"].peak_bytes)
    return MemoryPlan(
        model=str(checkpoint),
        inventory=inv,
        stages=by_name,
        available_bytes=available_bytes,
        accuracy_check=where_accuracy_runs(inv, by_name, available_bytes),
        notes=[
            f"INT4 weight-only path (export without validation, quantize int4 without the "
            f"accuracy check: build -p int4 --no-validate --no-accuracy-check): peak "
            f"{gib(weight_only)}, disk "
            f"{gib(by_name['export fp32'].output_bytes + by_name['quantize int4'].output_bytes)}."
        ],
        serving={kind: serving(inv, *built) for kind, built in SERVED.items()},
        openvino_prompt={kind: openvino_prompt(inv, *built) for kind, built in SERVED.items()},
    )


def where_accuracy_runs(inv: Inventory, stages: dict[str, StagePlan], available: int | None) -> str:
    """Where the INT4 accuracy check fits: here, on a larger machine, or layer by layer."""
    check = stages["quantize int4 + accuracy check"].peak_bytes
    if available is None or check <= available:
        return f"here (the INT4 check needs {gib(check)})"
    layer = inv.largest_layer * WEIGHT_BYTES["fp32"] + BASE_OVERHEAD
    return (
        f"not here: the INT4 check needs {gib(check)} with the fp32 bundle resident (the two "
        f"bundles run one after the other); run quantize where that fits, or skip the check "
        f"with a warning (--no-accuracy-check); layer by "
        f"layer (one block of each resident, not implemented yet) it would need about "
        f"{gib(int(layer + inv.largest_tensor * 4))}"
    )


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (memory a new process can use without swapping)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else None
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else None


def gib(nbytes: int | float) -> str:
    return f"{nbytes / GiB:.1f} GiB"


def check_fits(plan: MemoryPlan, stages: list[StagePlan], command: str) -> None:
    """Refuse (one line) a build whose predicted peak exceeds the memory available here."""
    from nvlm_export.errors import InputError

    if plan.available_bytes is None or not stages:
        return
    worst = max(stages, key=lambda s: s.peak_bytes)
    if worst.peak_bytes <= plan.available_bytes:
        return
    raise InputError(
        f"This build needs about {gib(worst.peak_bytes)} of memory ({worst.stage}) but "
        f"{gib(plan.available_bytes)} is available",
        why="the memory plan predicts the peak of every stage from config.json",
        fix=f"See `{command} --dry-run`, free memory or use a larger machine, or pass --force",
    )
