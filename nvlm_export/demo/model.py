"""The demo model's shape, and the two ways it exists: training form and NVLM-D form.

It is an NVLM-D model at real geometry (448 tiles, patch 14, pixel shuffle 0.5, 256 tokens per
tile, the 6B-style InternViT with RMSNorm and QK-norm, a bias-free projector with the LLM's
intermediate width, a Qwen2 decoder with the "llama" model_type quirk), only small.

The NVLM-D layout stores 7 dummy ViT heads. The demo keeps them at zero, like NVLM-D-72B's padding:
a zero head has zero values, so it adds exactly nothing. Training therefore runs the model without
them (`training_config`) and `with_dummy_heads` pads the trained weights with zeros into the
stored layout (`demo_config`); the two compute the same function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F

from nvlm_export.models.config import NVLM_D_DUMMY_HEADS, ModelConfig, VisionConfig
from nvlm_export.models.families.spec import TinyShape
from nvlm_export.models.model import VisionLanguageModel, build_model
from nvlm_export.models.registry import layout_spec
from nvlm_export.models.tiny import llm_config, tiny_config
from nvlm_export.models.vision import InternVitAttention

LAYOUT = "nvlm-d"

DEMO_VIT = VisionConfig(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    intermediate_size=192,
    norm_type="rms_norm",
    qk_normalization=True,
    qkv_bias=False,
    num_dummy_heads=NVLM_D_DUMMY_HEADS,
)
DEMO_LLM = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": None,  # from the tokenizer, rounded up to a multiple of 64
}
# On disk: bf16 like NVLM-D-72B, in shards of < 2 MB so every package file stays small.
DEMO_SHAPE = TinyShape(
    vision=DEMO_VIT,
    llm=DEMO_LLM,
    dtype="bfloat16",
    max_shard_bytes=1536 * 1024,
    template="chatml",
    max_dynamic_patch=6,
    llm_model_type="llama",
)


def demo_config(vocab_size: int, image_token_id: int, eos_id: int) -> ModelConfig:
    """The shipped model's config (NVLM-D layout, 7 dummy heads): the tiny NVLM-D config with
    the demo's dimensions."""
    base = tiny_config("tiny", LAYOUT, vocab_size, image_token_id, eos_id)
    llm = llm_config(DEMO_SHAPE, base.llm_config["vocab_size"], eos_id)
    projector = layout_spec(LAYOUT).projector_config(DEMO_VIT, llm, base.downsample_ratio)
    return replace(
        base,
        vision=DEMO_VIT,
        llm_config=llm,
        projector=projector,
        template=DEMO_SHAPE.template,
        max_dynamic_patch=DEMO_SHAPE.max_dynamic_patch,
    )


def training_config(config: ModelConfig) -> ModelConfig:
    """The same model without the (all-zero) dummy heads."""
    return config.with_dummy_heads(0)


# QK-norm scales q and k to unit RMS, so with weights 1 an attention logit is at most
# sqrt(head_dim) (5.7 for 32-wide heads): too flat to single out a few neighbours among 1025
# tokens. Starting the norm weights at QK_NORM_INIT raises that ceiling by QK_NORM_INIT**2.
QK_NORM_INIT = 2.0


def init_for_training(model: VisionLanguageModel, seed: int) -> None:
    """Position embeddings start as a fixed 2-D sin-cos table over the patch grid (MAE-style; the
    class position zero), still learnt afterwards: random ones give a ViT trained from scratch on
    little data no notion of which patches are neighbours, and the shapes' outlines span several
    patches. The class embedding starts small and random; the QK-norm weights at QK_NORM_INIT."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = model.vision.vit.embeddings
    with torch.no_grad():
        table = sincos_positions_2d(embeddings.position_embedding.shape[-1], embeddings.grid_size)
        embeddings.position_embedding.copy_(table[None])
        cls = embeddings.class_embedding
        cls.copy_(torch.randn(cls.shape, generator=generator) * 0.02)
        for layer in model.vision.vit.layers:
            layer.attn.q_norm.weight.fill_(QK_NORM_INIT)
            layer.attn.k_norm.weight.fill_(QK_NORM_INIT)


def sincos_positions_2d(channels: int, grid: int) -> torch.Tensor:
    """(1 + grid*grid, channels): row 0 (the class position) zero, then per patch (row-major)
    [sin(y w), cos(y w), sin(x w), cos(x w)] with channels/4 frequencies w = 10000^(-i/(C/4))."""
    quarter = channels // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (C/4,)
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles_y = y.reshape(-1, 1) * omega  # (G*G, C/4)
    angles_x = x.reshape(-1, 1) * omega
    table = torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)
    table = torch.cat([torch.zeros(1, channels, dtype=table.dtype), table])  # (1 + G*G, C)
    return table.float()


def with_dummy_heads(trained: VisionLanguageModel, num_dummy_heads: int) -> VisionLanguageModel:
    """`trained` (no dummy heads) as the stored layout: every dummy head's weights zero.

    qkv gains zero rows for each dummy head in each of q, k, v; proj gains zero input columns; the
    QK-norm weights of the dummy channels are 1 (their input is always zero, so any value works).
    """
    config = trained.config.with_dummy_heads(num_dummy_heads)
    padded = build_model(config)
    target = dict(padded.named_parameters())
    with torch.no_grad():
        for name, value in trained.state_dict().items():
            if name not in target:
                continue  # tied aliases and buffers
            target[name].copy_(_pad(name, value, target[name].shape))
    return padded


def load_for_training(stored: VisionLanguageModel) -> VisionLanguageModel:
    """The inverse of `with_dummy_heads`: a stored demo model in training form, to go on training.

    Refuses a model whose dummy heads are not zero (dropping them would change the function).
    """
    trained = build_model(training_config(stored.config))
    target = dict(trained.named_parameters())
    with torch.no_grad():
        for name, value in stored.state_dict().items():
            if name in target:
                kept = _unpad(name, value, target[name].shape)
                target[name].copy_(kept.to(target[name].dtype))
    return trained


def _unpad(name: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if value.shape == shape:
        return value
    if name.endswith("attn.qkv.weight"):
        rows = shape[0] // 3
        parts = value.chunk(3, dim=0)
        dropped = torch.cat([p[rows:] for p in parts])
        kept = torch.cat([p[:rows] for p in parts], dim=0)
    elif name.endswith(("q_norm.weight", "k_norm.weight")):
        return value[: shape[0]]  # the dummy channels' norm weights multiply zeros
    elif name.endswith("attn.proj.weight"):
        dropped, kept = value[:, shape[1] :], value[:, : shape[1]]
    else:
        raise ValueError(f"cannot unpad {name} from {tuple(value.shape)} to {tuple(shape)}")
    if torch.count_nonzero(dropped):
        raise ValueError(f"{name}: the dummy heads are not zero")
    return kept


def _pad(name: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if value.shape == shape:
        return value
    if name.endswith("attn.qkv.weight"):  # (3 * real, C) -> (3 * padded, C)
        rows = shape[0] // 3
        parts = [F.pad(p, (0, 0, 0, rows - p.shape[0])) for p in value.chunk(3, dim=0)]
        return torch.cat(parts, dim=0)
    if name.endswith(("q_norm.weight", "k_norm.weight")):  # (real,) -> (padded,)
        return F.pad(value, (0, shape[0] - value.shape[0]), value=1.0)
    if name.endswith("attn.proj.weight"):  # (C, real) -> (C, padded)
        return F.pad(value, (0, shape[1] - value.shape[1]))
    raise ValueError(f"cannot pad {name} from {tuple(value.shape)} to {tuple(shape)}")


def _sdpa_attention(self: InternVitAttention, x: torch.Tensor) -> torch.Tensor:
    """InternVitAttention.forward with the fused kernel: the same function, faster backward."""
    n, t, _ = x.shape
    q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (N, T, heads*head_dim)
    q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (y.view(n, t, self.heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (N, heads, T, head_dim)
    return self.proj(out.transpose(1, 2).reshape(n, t, -1))


@contextlib.contextmanager
def fused_attention(model: VisionLanguageModel) -> Iterator[None]:
    """Train with PyTorch's fused attention in the ViT and the decoder (the same maths as the
    eager code the exporter traces; `tests/test_demo.py` checks they agree)."""
    decoder_config = model.language_model.config
    previous = decoder_config._attn_implementation
    original = InternVitAttention.forward
    InternVitAttention.forward = _sdpa_attention  # type: ignore[method-assign]
    decoder_config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        InternVitAttention.forward = original  # type: ignore[method-assign]
        decoder_config._attn_implementation = previous
