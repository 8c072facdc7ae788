"""InternViT (both styles), the real-channel QK-norm, dummy heads and pixel shuffle."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from transformers import InternVLVisionConfig, InternVLVisionModel

from nvlm_export.models.config import VisionConfig
from nvlm_export.models.families.internvl import HF_KEYS as INTERNVL_HF_KEYS
from nvlm_export.models.tiny import randomize
from nvlm_export.models.vision import InternViT, RealChannelRMSNorm, pixel_shuffle

torch.set_num_threads(1)

VIT_6B_STYLE = VisionConfig(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    norm_type="rms_norm",
    qk_normalization=True,
    qkv_bias=False,
)


def reference_pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL's pixel_shuffle (ps_version v2), written as the reference writes it."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor**2)))
    return x.permute(0, 2, 1, 3).contiguous()


def test_pixel_shuffle_matches_reference_view_permute() -> None:
    x = torch.randn(3, 32, 32, 8)
    assert torch.equal(pixel_shuffle(x, 0.5), reference_pixel_shuffle(x))


def test_pixel_shuffle_token_is_concat_of_its_2x2_block() -> None:
    x = torch.randn(2, 32, 32, 5)
    tokens = pixel_shuffle(x, 0.5).reshape(2, 256, 20)
    for i, j in [(0, 0), (0, 15), (7, 3), (15, 15), (9, 12)]:
        block = [x[:, 2 * i, 2 * j], x[:, 2 * i, 2 * j + 1], x[:, 2 * i + 1, 2 * j]]
        block.append(x[:, 2 * i + 1, 2 * j + 1])
        assert torch.equal(tokens[:, i * 16 + j], torch.cat(block, dim=-1))


def test_pixel_shuffle_is_not_a_plain_reshape() -> None:
    """Guard: the test above must be able to fail for a naive implementation."""
    x = torch.randn(1, 32, 32, 5)
    assert not torch.equal(pixel_shuffle(x, 0.5), x.reshape(1, 16, 16, 20))


def test_qk_norm_mean_square_uses_real_channels_only() -> None:
    real, padded, eps = 12, 20, 1e-6
    norm = RealChannelRMSNorm(padded, real, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(padded))
    x = torch.randn(4, 7, padded)
    rms = torch.sqrt(sum(x[..., c] ** 2 for c in range(real)) / real + eps)  # plain formula
    expected = norm.weight * x / rms.unsqueeze(-1)
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)
    ordinary = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight
    assert not torch.allclose(norm(x), ordinary, atol=1e-3)


def _vit(config: VisionConfig, seed: int) -> InternViT:
    model = InternViT(config).eval()
    randomize(model, seed)
    return model


def test_zero_dummy_heads_change_nothing() -> None:
    """NVLM-D pads 25 heads with zero heads; with the real-channel RMS that is exact."""
    plain = _vit(VIT_6B_STYLE, seed=1)
    padded = InternViT(replace(VIT_6B_STYLE, num_dummy_heads=7)).eval()
    real = VIT_6B_STYLE.hidden_size
    width = VIT_6B_STYLE.attention_dim
    with torch.no_grad():
        for name, target in padded.state_dict(keep_vars=True).items():
            source = plain.state_dict()[name]
            target.zero_()
            if name.endswith("attn.qkv.weight"):  # q, k, v blocks each gain zero rows
                for part in range(3):
                    rows = slice(
                        part * (target.shape[0] // 3), part * (target.shape[0] // 3) + real
                    )
                    target[rows] = source[part * width : part * width + real]
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                target[:real] = source
            elif name.endswith("attn.proj.weight"):
                target[:, :real] = source
            else:
                target.copy_(source)
    pixels = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        torch.testing.assert_close(padded(pixels), plain(pixels), rtol=1e-5, atol=1e-5)


def test_nonzero_dummy_heads_are_computed() -> None:
    padded = _vit(replace(VIT_6B_STYLE, num_dummy_heads=7), seed=2)
    pixels = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        before = padded(pixels)
        padded.layers[0].attn.proj.weight[:, -16:].mul_(2.0)  # the last dummy head's output
        assert not torch.allclose(padded(pixels), before)


def _hf_vision_model(config: VisionConfig) -> InternVLVisionModel:
    hf_config = InternVLVisionConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        norm_type=config.norm_type,
        use_qk_norm=config.qk_normalization,
        attention_bias=config.qkv_bias,
        layer_norm_eps=config.eps,
    )
    hf_config._attn_implementation = "eager"
    return InternVLVisionModel(hf_config).eval()


def _copy_into_hf(ours: InternViT, hf: InternVLVisionModel) -> None:
    """Copy our weights through the internvl-hf key table (prefix model.vision_tower.)."""
    hf_params = hf.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            for rule in INTERNVL_HF_KEYS:
                names = rule.stored_names("vision.vit." + key)
                if names:
                    break
            for name, part in zip(names, value.chunk(len(names)), strict=True):
                hf_params[re.sub(r"^model\.vision_tower\.", "", name)].copy_(part)


@pytest.mark.parametrize("side", [448, 224])
def test_6b_style_vit_matches_transformers_internvl_vision(side: int) -> None:
    """Without dummy heads our 6B style (RMSNorm, QK-norm) equals transformers' InternViT; at
    224 px both resize the 32x32 position table bicubically."""
    ours = _vit(VIT_6B_STYLE, seed=3)
    hf = _hf_vision_model(VIT_6B_STYLE)
    _copy_into_hf(ours, hf)
    pixels = torch.randn(2, 3, side, side)
    with torch.no_grad():
        expected = hf(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(ours(pixels), expected, rtol=1e-5, atol=1e-5)
    assert expected.shape == (2, (side // 14) ** 2 + 1, 32)
