"""The language decoder as an export-friendly module, and its ONNX export.

`ExportableDecoder` wraps a transformers `Qwen2ForCausalLM` / `LlamaForCausalLM`, shares its
weights (no copies) and computes the same function, written out plainly so the traced graph holds
only standard ONNX ops that TensorRT 10.x and ONNX Runtime both run:

    h⁰      = inputs_embeds                                   (embedding lookup is in the runtime)
    cos,sin = rope(position_ids · inv_freq)
    for each layer ℓ:
        a   = RMSNorm(hˡ);  q, k, v = a·Wq + bq, a·Wk + bk, a·Wv + bv;  rotate q, k
        K,V = concat(past_K, k), concat(past_V, v)            → present.{ℓ}.key / .value
        hˡ' = hˡ + softmax(q·Kᵀ/√d + causal_mask) · V · Wo
        hˡ⁺¹= hˡ' + W_down(silu(W_gate·RMSNorm(hˡ')) ⊙ W_up·RMSNorm(hˡ'))
    logits  = lm_head(RMSNorm(h_last_position))               [batch, vocab], float32

One graph serves prefill (past length 0, many tokens) and decode (one token). docs/decoder-graph.md
documents the interface, the opset choice and the fp16 policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from nvlm_export.defaults import DEFAULT_OPSET, SUPPORTED_OPSETS
from nvlm_export.errors import ExportError
from nvlm_export.export.onnx_utils import (
    GraphIO,
    TensorIO,
    external_data_name,
    needs_external_data,
    trace_to_onnx,
)
from nvlm_export.runtime.manifest import (
    INPUTS_EMBEDS,
    LOGITS,
    PAST_KEY,
    PAST_VALUE,
    POSITION_IDS,
    PRESENT_KEY,
    PRESENT_VALUE,
    layer_tensor,
)

if TYPE_CHECKING:
    from nvlm_export.export.weights import CheckpointWeights

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
NUMPY_DTYPE = {torch.float32: "float32", torch.float16: "float16"}

ROPE_TYPES = ("default", "linear", "dynamic")


# --------------------------------------------------------------------------------------------
# Per-model facts: one declared place
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BiasLayout:
    """Which projections carry a bias; fixed by the transformers modeling class, not the config."""

    qkv: bool
    output: bool
    mlp: bool


# How each supported transformers class lays out its biases (read from its modeling file).
BIAS_LAYOUTS: dict[str, Callable[[Any], BiasLayout]] = {
    # Qwen2: q/k/v always have a bias, o_proj and the MLP never do.
    "Qwen2ForCausalLM": lambda c: BiasLayout(qkv=True, output=False, mlp=False),
    # Llama: `attention_bias` covers q/k/v AND o_proj; `mlp_bias` covers the MLP.
    "LlamaForCausalLM": lambda c: BiasLayout(
        qkv=bool(c.attention_bias), output=bool(c.attention_bias), mlp=bool(c.mlp_bias)
    ),
}


@dataclass(frozen=True)
class DecoderSpec:
    """Everything the export needs to know about one decoder, read from its transformers config."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope_factor: float
    max_position_embeddings: int
    biases: BiasLayout
    tie_word_embeddings: bool

    @classmethod
    def from_model(cls, lm: nn.Module) -> DecoderSpec:
        architecture = type(lm).__name__
        if architecture not in BIAS_LAYOUTS:
            raise ExportError(
                f"Cannot export a {architecture} decoder",
                why=f"supported language models are {sorted(BIAS_LAYOUTS)}",
            )
        config = lm.config
        _reject_unsupported(config)
        rope = _rope_parameters(config)
        return cls(
            architecture=architecture,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None)
            or config.hidden_size // config.num_attention_heads,
            vocab_size=config.vocab_size,
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=float(rope["rope_theta"]),
            rope_type=rope["rope_type"],
            rope_factor=float(rope.get("factor", 1.0)),
            max_position_embeddings=config.max_position_embeddings,
            biases=BIAS_LAYOUTS[architecture](config),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim / 2], as transformers computes them at init.

        Linear scaling divides them by the factor. Dynamic NTK equals the default below
        max_position_embeddings (its base grows only past that), see `check_max_context`.
        """
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv_freq = 1.0 / (self.rope_theta**exponents)
        if self.rope_type == "linear":
            inv_freq = inv_freq / self.rope_factor
        return inv_freq

    def check_max_context(self, max_context: int) -> None:
        if max_context < 1:
            raise ExportError(f"max_context must be positive, got {max_context}")
        if self.rope_type == "dynamic" and max_context > self.max_position_embeddings:
            raise ExportError(
                f"max_context {max_context} is longer than this model supports",
                why=(
                    "its rope_scaling is dynamic NTK, which rescales the rotary frequencies for "
                    f"sequences past max_position_embeddings={self.max_position_embeddings}; the "
                    "exported graph uses fixed frequencies, exact only up to that length"
                ),
                fix=f"Use max_context <= {self.max_position_embeddings}",
            )


def _rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 normalises legacy `rope_scaling` into `rope_parameters`; accept both."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None) or {}
    params = {**legacy, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _reject_unsupported(config: Any) -> None:
    """Fail early, naming the config field, on anything the plain module does not compute."""
    rope = _rope_parameters(config)
    if rope["rope_type"] not in ROPE_TYPES:
        _unsupported("rope_scaling.type", rope["rope_type"], f"supported: {', '.join(ROPE_TYPES)}")
    factor = float(rope.get("factor", 1.0))
    if rope["rope_type"] != "default" and not (math.isfinite(factor) and factor >= 1.0):
        _unsupported("rope_scaling.factor", factor, "it must be a finite number >= 1")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        _unsupported(
            "partial_rotary_factor", rope["partial_rotary_factor"], "only 1.0 is supported"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        _unsupported("hidden_act", config.hidden_act, "only silu (SwiGLU) is supported")
    if getattr(config, "use_sliding_window", False):
        _unsupported("use_sliding_window", True, "only full attention is supported")
    if config.num_attention_heads % config.num_key_value_heads:
        _unsupported(
            "num_key_value_heads",
            config.num_key_value_heads,
            f"it must divide num_attention_heads={config.num_attention_heads}",
        )


def _unsupported(field: str, value: Any, why: str) -> None:
    raise ExportError(
        f"Unsupported decoder config: {field}={value!r}",
        why=why,
        fix="Export a model whose config uses a supported value",
    )


# --------------------------------------------------------------------------------------------
# Building blocks (reusable by the NVLM-X/H gated cross-attention blocks)
# --------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the statistics in float32 whatever the activation dtype (fp16-safe).

    Written as `x / sqrt(mean(x²) + eps)`, not transformers' `x * rsqrt(...)`: the former is the
    Pow-ReduceMean-Add-Sqrt-Div-Mul chain ONNX Runtime's optimiser fuses into one
    SimplifiedLayerNormalization node (weight included); the rsqrt form stays six small ops.
    Same value within float32 rounding.
    """
    x32 = x.float()
    rms = torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return weight * (x32 / rms).to(x.dtype)


def rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin tables [B, 1, T, head_dim] from positions: float32, then cast.

    The half-split rotation is x·cos + (-x₂, x₁)·sin. The minus sign is folded into the sin
    table once, (-sin, sin), so every layer's q and k rotate with (x₂, x₁)·signed_sin and no
    per-layer Neg (bit-identical: negation is exact). The head axis is added here, once.
    """
    angles = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    cos, sin = angles.cos(), angles.sin()
    cos = torch.cat((cos, cos), dim=-1)  # (B, T, D)
    signed_sin = torch.cat((-sin, sin), dim=-1)  # (B, T, D)
    return cos[:, None].to(dtype), signed_sin[:, None].to(dtype)  # (B, 1, T, D)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the position angles; cos/signed_sin from `rotary_cos_sin`."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # (x₂, x₁)
    return x * cos + swapped * signed_sin


def causal_mask(
    seq: int | torch.SymInt, past: int | torch.SymInt, device: torch.device
) -> torch.Tensor:
    """Boolean (T, past + T): query t (at absolute index past + t) sees keys 0 .. past + t.

    Built from the shapes alone, so the graph needs no mask input and no maximum length.
    """
    query_index = torch.arange(seq, device=device)[:, None] + past  # (T, 1)
    key_index = torch.arange(past + seq, device=device)[None, :]  # (1, S)
    return key_index <= query_index  # (T, S)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Grouped-query attention: q (B, H, T, D), k/v (B, KV, S, D), allowed bool broadcastable to
    (T, S). Returns (B, H, T, D).

    Query heads are grouped under their KV head (B, KV, G, T, D) so K/V broadcast instead of being
    repeated in memory. Softmax runs in float32 whatever the activation dtype.
    """
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q * head_dim**-0.5  # scale before the product: keeps fp16 scores in range
    q = q.reshape(batch, kv_heads, heads // kv_heads, seq, head_dim)  # (B, KV, G, T, D)
    scores = q @ k[:, :, None].transpose(-1, -2)  # (B, KV, G, T, S)
    scores = torch.where(allowed, scores.float(), torch.finfo(torch.float32).min)
    weights = scores.softmax(dim=-1).to(v.dtype)
    out = weights @ v[:, :, None]  # (B, KV, G, T, D)
    return out.reshape(batch, heads, seq, head_dim)


def swiglu(x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
    return mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


# --------------------------------------------------------------------------------------------
# The module that gets traced
# --------------------------------------------------------------------------------------------

KVPair = tuple[torch.Tensor, torch.Tensor]  # one layer's (key, value), each (B, KV, S, D)
KVCache = list[KVPair]  # per layer
KV = ("key", "value")  # order of the per-layer cache tensors in the graph's inputs and outputs


class StepInputs(NamedTuple):
    """What every layer of one forward step shares."""

    cos: torch.Tensor  # rotary (B, T, D)
    sin: torch.Tensor
    allowed: torch.Tensor  # causal mask (T, P+T)


class ExportableDecoder(nn.Module):
    """A transformers causal LM's decoder as a graph-friendly function of embeddings and a cache.

    forward(inputs_embeds (B, T, hidden), position_ids (B, T) int64,
            *past: key₀, value₀, key₁, value₁, ... each (B, KV, P, D))
        -> (logits (B, vocab) float32 for the last position, key₀', value₀', ... (B, KV, P+T, D))

    Subclasses add inputs (e.g. NVLM-X cross K/V) by overriding `between_layers` and `graph_io`.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.spec = DecoderSpec.from_model(lm)
        _check_weights_match_spec(lm, self.spec)
        self.layers = lm.model.layers  # shared, not copied
        self.final_norm = lm.model.norm
        self.lm_head = lm.lm_head
        self.register_buffer("inv_freq", self.spec.inv_freq(), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(
        self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        past, extra = rest[: self.num_past_inputs], rest[self.num_past_inputs :]
        cache = list(zip(past[0::2], past[1::2], strict=True))
        seq, past_len = inputs_embeds.shape[1], cache[0][0].shape[2]
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq, inputs_embeds.dtype)
        step = StepInputs(cos, sin, causal_mask(seq, past_len, inputs_embeds.device))
        hidden, presents = self.run_layers(inputs_embeds, step, cache, extra)
        last = rms_norm(hidden[:, -1], self.final_norm.weight, self.spec.rms_norm_eps)  # (B, C)
        logits = self.lm_head(last).float()  # (B, vocab): never materialise (T, vocab)
        return (logits, *(t for kv in presents for t in kv))

    @property
    def num_past_inputs(self) -> int:
        return 2 * self.spec.num_layers

    def run_layers(
        self,
        hidden: torch.Tensor,
        step: StepInputs,
        cache: KVCache,
        extra: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, KVCache]:
        """The layer loop; `extra` are the graph inputs after the KV cache."""
        presents: KVCache = []
        for index, (layer, past) in enumerate(zip(self.layers, cache, strict=True)):
            hidden, present = self.decoder_layer(layer, hidden, step, past)
            presents.append(present)
            hidden = self.between_layers(index, hidden, extra)
        return hidden, presents

    def between_layers(
        self, index: int, hidden: torch.Tensor, extra: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """What runs after decoder layer `index`: nothing here. The extension point for
        subclasses that interleave blocks fed by `extra`, e.g. gated cross-attention."""
        return hidden

    def decoder_layer(
        self, layer: nn.Module, hidden: torch.Tensor, step: StepInputs, past: KVPair
    ) -> tuple[torch.Tensor, KVPair]:
        eps = self.spec.rms_norm_eps
        x = rms_norm(hidden, layer.input_layernorm.weight, eps)
        attended, present = self.self_attention(layer.self_attn, x, step, past)
        hidden = hidden + attended
        hidden = hidden + swiglu(
            rms_norm(hidden, layer.post_attention_layernorm.weight, eps), layer.mlp
        )
        return hidden, present

    def self_attention(
        self, attn: nn.Module, x: torch.Tensor, step: StepInputs, past: KVPair
    ) -> tuple[torch.Tensor, KVPair]:
        batch, seq, _ = x.shape
        head_dim = self.spec.head_dim

        def heads(projection: nn.Module) -> torch.Tensor:  # (B, T, n·D) -> (B, n, T, D)
            return projection(x).reshape(batch, seq, -1, head_dim).transpose(1, 2)

        q = apply_rotary(heads(attn.q_proj), step.cos, step.sin)  # (B, H, T, D)
        k = apply_rotary(heads(attn.k_proj), step.cos, step.sin)  # (B, KV, T, D)
        v = heads(attn.v_proj)  # (B, KV, T, D)
        k = torch.cat((past[0], k), dim=2)  # (B, KV, P+T, D)
        v = torch.cat((past[1], v), dim=2)
        out = attention(q, k, v, step.allowed)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, seq, -1)  # (B, T, H·D)
        return attn.o_proj(out), (k, v)

    # ---- graph interface -------------------------------------------------------------------

    def past_names(self) -> list[str]:
        return _layer_names(PAST_KEY, PAST_VALUE, self.spec.num_layers)

    def present_names(self) -> list[str]:
        return _layer_names(PRESENT_KEY, PRESENT_VALUE, self.spec.num_layers)

    def graph_io(self, file: str, external_data: str | None, opset: int) -> GraphIO:
        spec, dtype = self.spec, NUMPY_DTYPE[self.dtype]
        kv_shape = ("batch", spec.num_kv_heads, "past", spec.head_dim)
        present_shape = ("batch", spec.num_kv_heads, "past + seq", spec.head_dim)
        inputs = (
            TensorIO(INPUTS_EMBEDS, dtype, ("batch", "seq", spec.hidden_size)),
            TensorIO(POSITION_IDS, "int64", ("batch", "seq")),
            *(TensorIO(name, dtype, kv_shape) for name in self.past_names()),
        )
        outputs = (
            TensorIO(LOGITS, "float32", ("batch", spec.vocab_size)),
            *(TensorIO(name, dtype, present_shape) for name in self.present_names()),
        )
        return GraphIO(file, external_data, opset, inputs, outputs)

    def example_inputs(
        self, batch: int = 2, seq: int = 3, past: int = 4
    ) -> tuple[torch.Tensor, ...]:
        """Tracing inputs. Sizes are >= 2 and distinct so the exporter keeps every axis symbolic
        (torch.export specialises sizes 0 and 1); past length 0 still runs in the graph."""
        spec, dtype = self.spec, self.dtype
        embeds = torch.zeros(batch, seq, spec.hidden_size, dtype=dtype)
        positions = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq)
        # Distinct tensors: the exporter would wire aliased inputs to one graph input.
        kv_shape = (batch, spec.num_kv_heads, past, spec.head_dim)
        caches = [torch.zeros(kv_shape, dtype=dtype) for _ in range(2 * spec.num_layers)]
        return (embeds, positions, *caches)

    def dynamic_shapes(self) -> tuple[Any, ...]:
        """torch.export dynamic axes for `example_inputs`: batch, seq and past are symbolic."""
        from torch.export import Dim

        batch, seq, past = Dim("batch", min=1), Dim("seq", min=1), Dim("past", min=0)
        kv_axes = {0: batch, 2: past}
        return (
            {0: batch, 1: seq},
            {0: batch, 1: seq},
            tuple([kv_axes] * (2 * self.spec.num_layers)),  # forward's *past
        )


def _check_weights_match_spec(lm: nn.Module, spec: DecoderSpec) -> None:
    """The module reads biases and shapes from the weights; make sure they agree with the spec."""
    attn = lm.model.layers[0].self_attn
    found = BiasLayout(
        qkv=attn.q_proj.bias is not None,
        output=attn.o_proj.bias is not None,
        mlp=lm.model.layers[0].mlp.gate_proj.bias is not None,
    )
    if found != spec.biases:
        raise ExportError(
            f"The {spec.architecture} weights do not match its config",
            why=f"config implies biases {spec.biases}, the modules have {found}",
        )
    if attn.k_proj.weight.shape[0] != spec.num_kv_heads * spec.head_dim:
        raise ExportError(
            f"The {spec.architecture} k_proj has {attn.k_proj.weight.shape[0]} rows",
            why=f"the config implies {spec.num_kv_heads} KV heads x head_dim {spec.head_dim}",
        )


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LanguageExport:
    """What a family's `export_language` hook (export/architectures.py) writes: `model`'s
    language graphs (the decoder, and cross_kv for cross-attention models) into `bundle`."""

    model: nn.Module  # the whole vision-language model
    bundle: Path
    dtype: str
    opset: int
    max_context: int
    weights: CheckpointWeights | None = None  # a skeleton model's weights, streamed (None: real)


def export_decoder_onnx(
    lm: nn.Module,
    path: str | Path,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    max_context: int | None = None,
    weights: CheckpointWeights | None = None,
) -> GraphIO:
    """Trace a transformers Qwen2/Llama causal LM's decoder to `path` (ONNX) and check it.

    `lm` must already hold its weights in `dtype` (load it with torch_dtype=float16 for fp16):
    the graph shares them, and converting here would double the memory of a 72B model. Or `lm`
    is a skeleton (FakeTensor parameters in `dtype`) and `weights` streams them from the
    checkpoint (`export/weights.py`). Weights above `EXTERNAL_DATA_THRESHOLD_BYTES` go to
    `<path>.data` beside the graph.
    Returns the graph's I/O for the manifest.
    """
    if dtype not in DTYPES:
        raise ExportError(f"Unknown decoder dtype '{dtype}'", why=f"choose one of {list(DTYPES)}")
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"Opset {opset} is not supported for the decoder",
            why=(
                f"choose {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1}: TensorRT 10.x reads "
                "up to 20 and the exporter emits 18 natively"
            ),
        )
    decoder = ExportableDecoder(lm).eval()
    context = max_context or decoder.spec.max_position_embeddings
    return trace_decoder(decoder, Path(path), dtype, opset, context, weights, "language decoder")


def check_weights_dtype(module: nn.Module, dtype: str) -> None:
    """A graph shares its module's weights, so they must already be in the graph's `dtype`."""
    actual = next(module.parameters()).dtype
    if actual != DTYPES[dtype]:
        raise ExportError(
            f"The model's weights are {actual}, but a {dtype} graph was requested",
            why="the graph shares the model's weights instead of converting a copy",
            fix=f"Load the model with torch_dtype={DTYPES[dtype]}",
        )


def trace_decoder(
    decoder: ExportableDecoder,
    path: Path,
    dtype: str,
    opset: int,
    max_context: int,
    weights: CheckpointWeights | None,
    what: str,
) -> GraphIO:
    """Check an `ExportableDecoder` (or a subclass) and trace it to `path` with its own I/O,
    example inputs and dynamic axes; weights above the external-data threshold go to
    `<path>.data`."""
    decoder.spec.check_max_context(max_context)
    check_weights_dtype(decoder, dtype)
    external = needs_external_data(decoder)
    io = decoder.graph_io(path.name, external_data_name(path) if external else None, opset)
    return trace_to_onnx(
        decoder,
        decoder.example_inputs(),
        path,
        io=io,
        dynamic_shapes=decoder.dynamic_shapes(),
        what=what,
        weights=weights,
    )


def _layer_names(key: str, value: str, num_layers: int) -> list[str]:
    """Per layer, the key's then the value's name (the graph's order, see KV)."""
    return [layer_tensor(name, i) for i in range(num_layers) for name in (key, value)]
