"""Streamed export (`export/weights.py`): the graphs are traced from a weightless skeleton and their
weights written from the checkpoint tensor by tensor. The bundle must hold exactly the bytes that
tracing the loaded model writes, and a checkpoint that does not fit its config must fail before
any tracing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nvlm_export.errors import CheckpointError
from nvlm_export.export.architectures import architecture_for_layout
from nvlm_export.export.bundle import ExportSettings, export_bundle
from nvlm_export.export.decoder import LanguageExport
from nvlm_export.export.onnx_utils import initializer_differences, save_embedding_table
from nvlm_export.export.vision import VisionGraph, export_vision_onnx
from nvlm_export.models.checkpoint import SINGLE_FILE, load_checkpoint
from nvlm_export.models.tiny import make_tiny_checkpoint
from nvlm_export.runtime.manifest import load_manifest

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
NUMPY = {"fp32": "float32", "fp16": "float16"}


def export_in_memory(checkpoint: Path, out: Path, dtype: str, max_context: int) -> None:
    """The bundle's graphs and table, written from the fully loaded model (real tensors)."""
    model = load_checkpoint(checkpoint, dtype=DTYPES[dtype])
    arch = architecture_for_layout(model.config.layout)
    config = model.config
    export_vision_onnx(
        VisionGraph(model.vision, arch.vision_outputs(model)),
        out / "vision.onnx",
        tile_size=config.vision.image_size,
        tokens_per_tile=config.tokens_per_tile,
        hidden_size=config.llm_hidden_size,
        opset=18,
    )
    arch.hooks.export_language(LanguageExport(model, out, dtype, 18, max_context))
    save_embedding_table(model.embed_tokens.weight, out / "embed_tokens.npy", dtype=NUMPY[dtype])


# Layouts chosen for their key maps: padded ViT heads (nvlm-d), q/k/v stored apart and fused on
# read (internvl-hf, in fp16: bf16 -> fp16 directly), and the cross-attention graphs (nvlm-h).
@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "dtype"), [("nvlm-d", "fp32"), ("internvl-hf", "fp16"), ("nvlm-h", "fp32")]
)
def test_streamed_bundle_weights_are_bit_identical_to_the_loaded_model(
    tiny_bundle, tmp_path: Path, layout: str, dtype: str
) -> None:
    checkpoint, bundle = tiny_bundle(layout, dtype=dtype, validate=False)
    manifest = load_manifest(bundle)
    export_in_memory(checkpoint, tmp_path, dtype, manifest.kv_cache.max_context)
    for name, graph in manifest.graphs.items():
        assert initializer_differences(bundle / graph.file, tmp_path / graph.file) == [], name
    streamed = np.load(bundle / "embed_tokens.npy")
    assert streamed.dtype == np.dtype(NUMPY[dtype])
    assert streamed.tobytes() == np.load(tmp_path / "embed_tokens.npy").tobytes()


def test_checkpoint_not_matching_its_config_fails_before_tracing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "ckpt"
    make_tiny_checkpoint(broken, "internvl", seed=0)
    tensors = load_file(str(broken / SINGLE_FILE))
    tensors["mlp1.3.bias"] = tensors["mlp1.3.bias"][:-1]
    save_file(tensors, str(broken / SINGLE_FILE))

    def no_tracing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file headers alone tell; nothing should be traced")

    monkeypatch.setattr(torch.onnx, "export", no_tracing)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 'mlp1\.3\.bias' has shape"):
        export_bundle(broken, tmp_path / "bundle", ExportSettings(validate=False), quiet=True)
    assert not (tmp_path / "bundle").exists()
