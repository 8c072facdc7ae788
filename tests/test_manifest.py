"""The bundle manifest is the only contract between exporter and runtime: strict and versioned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvlm_export.errors import BundleError
from nvlm_export.runtime.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    EmbeddingSpec,
    GraphSpec,
    KVCacheSpec,
    Manifest,
    SourceSpec,
    TensorSpec,
    TokenizerSpec,
    load_manifest,
)


def _manifest() -> Manifest:
    decoder = GraphSpec(
        file="decoder.onnx",
        inputs=(
            TensorSpec("inputs_embeds", "float32", (1, "seq", 64)),
            TensorSpec("position_ids", "int64", (1, "seq")),
        ),
        outputs=(TensorSpec("logits", "float32", (1, 512)),),
    )
    return Manifest(
        architecture="nvlm-d",
        source=SourceSpec(checkpoint="/ckpt", layout="nvlm-d", settings={"dtype": "fp32"}),
        graphs={"decoder": decoder},
        embedding=EmbeddingSpec(file="embed_tokens.npy", vocab_size=512, hidden_size=64),
        kv_cache=KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, max_context=4096),
        tokenizer=TokenizerSpec(file="tokenizer.json", eos_token_ids=(3,), placeholder_token_id=5),
        tiling={"tile_size": 448, "min_tiles": 1, "max_tiles": 6, "use_thumbnail": True},
        prompt={"name": "nvlm-d"},
    )


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    manifest = _manifest()
    for name in ("decoder.onnx", "embed_tokens.npy", "tokenizer.json"):
        (tmp_path / name).write_bytes(b"x")
    manifest.save(tmp_path)
    return tmp_path


def _rewrite(bundle: Path, **changes: object) -> None:
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_round_trip_is_exact(bundle: Path) -> None:
    assert load_manifest(bundle) == _manifest()


def test_graph_specs_answer_by_name(bundle: Path) -> None:
    decoder = load_manifest(bundle).graph("decoder")
    assert decoder.input("position_ids").dtype == "int64"
    assert decoder.input("inputs_embeds").shape == (1, "seq", 64)
    with pytest.raises(BundleError, match="no 'vision' graph"):
        load_manifest(bundle).graph("vision")


def test_newer_major_schema_is_refused_with_upgrade_hint(bundle: Path) -> None:
    major = int(SCHEMA_VERSION.split(".")[0])
    _rewrite(bundle, schema_version=f"{major + 1}.0")
    with pytest.raises(BundleError, match="Upgrade nvlm-export"):
        load_manifest(bundle)


def test_newer_minor_schema_ignores_added_keys(bundle: Path) -> None:
    major, minor = (int(p) for p in SCHEMA_VERSION.split("."))
    _rewrite(bundle, schema_version=f"{major}.{minor + 1}", added_later={"x": 1})
    assert load_manifest(bundle).architecture == "nvlm-d"


def test_unknown_key_in_known_schema_is_an_error(bundle: Path) -> None:
    _rewrite(bundle, architecure="typo")
    with pytest.raises(BundleError, match="unknown keys \\['architecure'\\]"):
        load_manifest(bundle)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda b: (b / MANIFEST_NAME).unlink(), "is not a bundle"),
        (lambda b: (b / MANIFEST_NAME).write_text("{not json"), "is not valid JSON"),
        (lambda b: (b / "decoder.onnx").unlink(), "names 'decoder.onnx', which is missing"),
        (lambda b: _rewrite(b, schema_version="one"), "unreadable schema_version"),
    ],
)
def test_broken_bundles_give_one_clear_error(bundle: Path, setup, message: str) -> None:
    setup(bundle)
    with pytest.raises(BundleError, match=message) as info:
        load_manifest(bundle)
    assert "\n" not in str(info.value)


def test_missing_bundle_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_manifest(tmp_path / "nope")
