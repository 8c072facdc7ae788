"""The bundle manifest is the only contract between exporter and runtime: strict and versioned."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from nvlm_export.errors import BundleError
from nvlm_export.models.families.nvlm_d import PROMPT_FORMAT as NVLM_D
from nvlm_export.runtime.manifest import (
    MANIFEST_NAME,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
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
from nvlm_export.runtime.tiling import TilingConfig


def _manifest() -> Manifest:
    vision = GraphSpec(
        file="vision.onnx",
        inputs=(TensorSpec("pixel_values", "float32", ("tiles", 3, 448, 448)),),
        outputs=(TensorSpec("image_features", "float32", ("tiles", 256, 64)),),
    )

    def cache(pattern: str) -> tuple[TensorSpec, ...]:
        shape = (1, 2, "past", 16)
        return tuple(TensorSpec(pattern.format(layer=i), "float32", shape) for i in range(2))

    decoder = GraphSpec(
        file="decoder.onnx",
        inputs=(
            TensorSpec("inputs_embeds", "float32", (1, "seq", 64)),
            TensorSpec("position_ids", "int64", (1, "seq")),
            *cache(PAST_KEY),
            *cache(PAST_VALUE),
        ),
        outputs=(
            TensorSpec("logits", "float32", (1, 512)),
            *cache(PRESENT_KEY),
            *cache(PRESENT_VALUE),
        ),
    )
    return Manifest(
        architecture="nvlm-d",
        source=SourceSpec(checkpoint="/ckpt", layout="nvlm-d", settings={"dtype": "fp32"}),
        graphs={"vision": vision, "decoder": decoder},
        embedding=EmbeddingSpec(file="embed_tokens.npy", vocab_size=512, hidden_size=64),
        kv_cache=KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, max_context=4096),
        tokenizer=TokenizerSpec(file="tokenizer.json", eos_token_ids=(3,), placeholder_token_id=5),
        tiling=TilingConfig(max_tiles=6),
        prompt=NVLM_D,
    )


BUNDLE_FILES = ("vision.onnx", "decoder.onnx", "embed_tokens.npy", "tokenizer.json")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    manifest = _manifest()
    for name in BUNDLE_FILES:
        (tmp_path / name).write_bytes(b"x")
    manifest.save(tmp_path)
    return tmp_path


def _rewrite(bundle: Path, **changes: object) -> None:
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_round_trip_is_exact(bundle: Path) -> None:
    loaded = load_manifest(bundle)
    assert replace(loaded, files={}) == _manifest()
    assert loaded == _manifest().save(bundle)


def test_a_manifest_saved_again_is_in_the_writers_schema(bundle: Path) -> None:
    """Quantize and build rewrite a manifest they loaded: the file they write holds this version's
    keys, so it must say this version's schema, which an older runtime reads leniently (ignoring
    the keys added since) instead of refusing them as typos."""
    _rewrite(bundle, schema_version="2.1")
    assert load_manifest(bundle).schema_version == "2.1"
    load_manifest(bundle).save(bundle)
    assert json.loads((bundle / MANIFEST_NAME).read_text())["schema_version"] == SCHEMA_VERSION


def test_graph_specs_answer_by_name(bundle: Path) -> None:
    decoder = load_manifest(bundle).graph("decoder")
    assert decoder.input("position_ids").dtype == "int64"
    assert decoder.input("inputs_embeds").shape == (1, "seq", 64)
    with pytest.raises(BundleError, match="no 'cross_kv' graph"):
        load_manifest(bundle).graph("cross_kv")


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


def _drop(bundle: Path, key: str) -> None:
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    del data[key]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda b: (b / MANIFEST_NAME).unlink(), "is not a bundle"),
        (lambda b: (b / MANIFEST_NAME).write_text("{not json"), "is not valid JSON"),
        (lambda b: (b / "decoder.onnx").unlink(), "names 'decoder.onnx', which is missing"),
        (lambda b: _rewrite(b, schema_version="one"), "unreadable schema_version"),
        (lambda b: _rewrite(b, schema_version=99), "schema_version that is not text"),
        (lambda b: _drop(b, "graphs"), "has no 'graphs' in Manifest"),
        (lambda b: _drop(b, "kv_cache"), "has no 'kv_cache' in Manifest"),
    ],
)
def test_broken_bundles_give_one_clear_error(bundle: Path, setup, message: str) -> None:
    setup(bundle)
    with pytest.raises(BundleError, match=message) as info:
        load_manifest(bundle)
    assert "\n" not in str(info.value)


def test_tiling_prompt_and_engines_are_typed_and_checked_on_load(bundle: Path) -> None:
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    assert load_manifest(bundle).prompt == NVLM_D
    engine = {"file": "decoder.onnx", "tensorrt_version": "10.3.0", "compute_capability": "8.7"}
    _rewrite(bundle, engines={"decoder": engine})
    assert load_manifest(bundle).engines["decoder"].compute_capability == "8.7"
    for key, value, message in [
        ("engines", {"decoder": {"file": "decoder.onnx"}}, "has no 'compute_capability'"),
        ("tiling", {**data["tiling"], "max_tiles": 0}, "tiling is invalid.*max_tiles"),
        ("prompt", {**data["prompt"], "image_layout": "spiral"}, "Unknown image layout"),
        ("prompt", {**data["prompt"], "tokens_per_tile": 64}, "image_features tokens is 256"),
    ]:
        _rewrite(bundle, **{key: value})
        with pytest.raises(BundleError, match=message):
            load_manifest(bundle)
        _rewrite(bundle, **{key: data[key]})


@pytest.mark.parametrize(
    ("path", "key"),
    [
        (("precision",), "precision"),
        (("graphs", "decoder", "precision"), "graphs.decoder.precision"),
        (("engines",), "engines.decoder.precision"),
    ],
)
def test_an_unknown_precision_is_refused_on_load_in_one_line(
    bundle: Path, path: tuple[str, ...], key: str
) -> None:
    """A copied or hand-edited bundle may name a precision no part of nvlm-export implements;
    quantize, engine planning and the profiler would each misread it later."""
    value: object = "int3"
    if path == ("engines",):
        engine = {"file": "decoder.onnx", "tensorrt_version": "10.3", "compute_capability": "8.7"}
        value = {"decoder": {**engine, "precision": "int3"}}
    _rewrite_nested(bundle, path, value)
    with pytest.raises(BundleError) as refused:
        load_manifest(bundle)
    line = str(refused.value)
    assert f"{key} 'int3' is not a known precision" in line and "fp32, fp16, int8" in line
    assert "\n" not in line


@pytest.mark.parametrize("value", ["int8\x1b[2J\x1b]0;pwned\x07", "int8\nfp32", None, ["int8"], 8])
def test_a_hostile_graph_precision_is_refused_in_one_escaped_line(
    bundle: Path, value: object
) -> None:
    """A graph's precision decides which kernels the runtime asks for (exact int8 GEMMs for INT8
    graphs): a copied bundle naming anything else, a null or a list, is refused before any graph
    is loaded, with the value escaped and cut, never echoed raw to a terminal."""
    _rewrite_nested(bundle, ("graphs", "decoder", "precision"), value)
    with pytest.raises(BundleError) as refused:
        load_manifest(bundle)
    line = str(refused.value)
    known = "is not a known precision" if isinstance(value, str) else "has the wrong type"
    assert "graphs.decoder" in line and "precision" in line and known in line
    assert "\n" not in line and "\x1b" not in line and "\x07" not in line


@pytest.mark.parametrize(
    ("field", "pattern"),
    [
        ("past_key", "past_key_values.{0}.key"),  # str.format would raise IndexError
        ("past_key", "past_key_values.{layer.__class__}.key"),  # ... or read attributes
        ("past_key", "past_key_values.0.key"),  # every layer fed the same tensor
        ("past_value", "past_key_values.{layer}.{layer}"),
        ("present_key", "present.{layer}.key\x1b[2J"),
        ("present_value", "past_key_values.{layer}.value"),  # an input, not an output
    ],
)
def test_kv_cache_names_that_are_not_the_decoder_graphs_are_refused_on_load(
    bundle: Path, field: str, pattern: str
) -> None:
    """The runtime feeds and reads the cache by the manifest's per-layer names alone: a copied
    bundle's names must be the decoder graph's own, one per layer, or it is refused in one line
    before any request (instead of a traceback at the first one)."""
    _rewrite_nested(bundle, ("kv_cache", field), pattern)
    with pytest.raises(BundleError) as refused:
        load_manifest(bundle)
    line = str(refused.value)
    assert "KV cache tensor name" in line and "\n" not in line and "\x1b" not in line


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_a_variant_whose_kv_in_place_is_not_a_boolean_is_refused(
    bundle: Path, value: object
) -> None:
    """Whether the runtime binds the decoder's outputs to its own cache buffers comes from the
    bundle: a copied bundle saying anything but true or false is refused on load."""
    variant = {"file": "decoder.onnx", "kv_in_place": value}
    _rewrite_nested(bundle, ("graphs", "decoder", "variants"), {"onnxruntime": variant})
    with pytest.raises(BundleError) as refused:
        load_manifest(bundle)
    line = str(refused.value)
    assert "kv_in_place" in line and "has the wrong type" in line and "\n" not in line


def test_a_variant_written_before_kv_in_place_runs_with_caches_replaced_each_step(
    bundle: Path,
) -> None:
    """Schema 2.1 variants computed the cache length from the past's shape: never in place."""
    _rewrite(bundle, schema_version="2.1")
    variant = {"file": "decoder.onnx", "fused_ops": ["com.microsoft.GroupQueryAttention"]}
    _rewrite_nested(bundle, ("graphs", "decoder", "variants"), {"onnxruntime": variant})
    assert not load_manifest(bundle).graph("decoder").variants["onnxruntime"].kv_in_place


@pytest.mark.parametrize(
    ("path", "key"), [(("prompt",), "eos_token"), (("prompt", "chat"), "turn_prefix")]
)
def test_a_prompt_format_key_missing_from_the_manifest_is_refused(
    bundle: Path, path: tuple[str, ...], key: str
) -> None:
    """The prompt format's defaults are NVLM-D's conventions: a bundle of another family whose
    manifest lost a key would otherwise prompt (or stop) like NVLM-D without a word."""
    manifest = bundle / MANIFEST_NAME
    data = json.loads(manifest.read_text())
    node = data
    for step in path:
        node = node[step]
    del node[key]
    manifest.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=f"lacks keys \\['{key}'\\]") as refused:
        load_manifest(bundle)
    assert "\n" not in str(refused.value) and "Re-export" in str(refused.value)


def test_bundles_written_with_the_retired_extras_key_still_load(bundle: Path) -> None:
    _rewrite(bundle, extras={"cross_attention": {"blocks": 2, "every": 1}})
    assert load_manifest(bundle).prompt == NVLM_D


def test_a_prompt_format_the_runtime_would_refuse_cannot_be_built() -> None:
    with pytest.raises(BundleError, match="Unknown image layout"):
        replace(NVLM_D, image_layout="spiral")
    with pytest.raises(BundleError, match="tokens_per_tile 0"):
        replace(NVLM_D, tokens_per_tile=0)


def test_missing_bundle_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_manifest(tmp_path / "nope")


# --- containment (issue #16, finding 4) ----------------------------------------------------------


def _rewrite_nested(bundle: Path, path: tuple[str | int, ...], value: object) -> None:
    manifest = bundle / MANIFEST_NAME
    data = json.loads(manifest.read_text())
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    manifest.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("path", "key"),
    [
        (("graphs", "decoder", "file"), "graphs.decoder.file"),
        (("embedding", "file"), "embedding.file"),
        (("tokenizer", "file"), "tokenizer.file"),
        (("tokenizer", "config_files"), "tokenizer.config_files[0]"),
        (("engines",), "engines.decoder.file"),
        (("graphs", "decoder", "variants"), "graphs.decoder.variants.onnxruntime.file"),
    ],
)
@pytest.mark.parametrize("outside", ["../outside.bin", "/etc/passwd"])
def test_paths_outside_the_bundle_are_refused_naming_the_key(
    tmp_path: Path, path: tuple[str, ...], key: str, outside: str
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in BUNDLE_FILES:
        (bundle / name).write_bytes(b"x")
    _manifest().save(bundle)
    (tmp_path / "outside.bin").write_bytes(b"x")
    value: object = outside
    if path[-1] == "config_files":
        value = [outside]
    elif path == ("engines",):
        value = {
            "decoder": {"file": outside, "tensorrt_version": "10.3", "compute_capability": "8.7"}
        }
    elif path[-1] == "variants":
        value = {"onnxruntime": {"file": outside}}
    _rewrite_nested(bundle, path, value)
    with pytest.raises(BundleError, match=f"{re.escape(key)} points outside the bundle"):
        load_manifest(bundle)


def test_a_symlink_out_of_the_bundle_is_refused(bundle: Path, tmp_path_factory) -> None:
    secret = tmp_path_factory.mktemp("elsewhere") / "secret.onnx"
    secret.write_bytes(b"x")
    (bundle / "decoder.onnx").unlink()
    (bundle / "decoder.onnx").symlink_to(secret)
    with pytest.raises(
        BundleError, match=re.escape("graphs.decoder.file points outside the bundle")
    ):
        load_manifest(bundle)


def test_a_symlink_within_the_bundle_is_fine(bundle: Path) -> None:
    (bundle / "weights").mkdir()
    (bundle / "decoder.onnx").rename(bundle / "weights" / "decoder.onnx")
    (bundle / "decoder.onnx").symlink_to(Path("weights") / "decoder.onnx")
    _manifest().save(bundle)
    assert "weights/decoder.onnx" in load_manifest(bundle).files


# --- integrity (issue #16, finding 5) ------------------------------------------------------------


def test_every_file_is_recorded_with_size_and_sha256(bundle: Path) -> None:
    (bundle / "decoder.onnx.data").write_bytes(b"weights")  # external data: named by no key
    files = _manifest().save(bundle).files
    assert set(files) == {*BUNDLE_FILES, "decoder.onnx.data"}
    assert files["decoder.onnx.data"].size == 7
    assert files["decoder.onnx.data"].sha256 == hashlib.sha256(b"weights").hexdigest()


def test_appended_bytes_are_caught_on_every_load(bundle: Path) -> None:
    with open(bundle / "embed_tokens.npy", "ab") as f:
        f.write(b"more")
    with pytest.raises(BundleError, match=re.escape("'embed_tokens.npy' is 5 bytes, not the 1")):
        load_manifest(bundle)


def test_flipped_bytes_are_caught_when_hashes_are_verified(bundle: Path) -> None:
    (bundle / "vision.onnx").write_bytes(b"y")  # same size, other bytes
    load_manifest(bundle)  # sizes only: cheap, passes
    with pytest.raises(
        BundleError, match=re.escape("'vision.onnx' does not match its recorded SHA-256")
    ):
        load_manifest(bundle, verify_hashes=True)


def test_a_named_file_without_record_is_refused(bundle: Path) -> None:
    (bundle / "other.npy").write_bytes(b"x")
    _rewrite_nested(bundle, ("embedding", "file"), "other.npy")
    with pytest.raises(
        BundleError, match=re.escape("embedding.file names 'other.npy', which has no file")
    ):
        load_manifest(bundle)


def test_a_schema_1_manifest_without_records_asks_for_a_re_export(bundle: Path) -> None:
    _rewrite(bundle, schema_version="1.0")
    with pytest.raises(BundleError, match=re.escape("old manifest schema 1.0")):
        load_manifest(bundle)


# --- crafted manifests (issue #16, finding 7b) ---------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("graphs",), {"decoder": None}, "graphs.decoder must be an object for GraphSpec"),
        (("graphs",), [], "graphs must be an object, not a list"),
        (("tokenizer", "eos_token_ids"), "3", "eos_token_ids has the wrong type"),
        (("tokenizer", "eos_token_ids"), [3, True], "eos_token_ids has the wrong type"),
        (("tokenizer", "eos_token_ids"), [9999], "outside the vocabulary"),
        (("tokenizer", "placeholder_token_id"), -1, "outside the vocabulary"),
        (("kv_cache", "max_context"), 0, "max_context is 0"),
        (("kv_cache", "num_layers"), "2", "num_layers has the wrong type"),
        (("embedding", "vocab_size"), 2.5, "vocab_size has the wrong type"),
        (("architecture",), None, "architecture has the wrong type"),
        (("graphs", "decoder", "inputs"), {"a": 1}, "inputs must be a list"),
        (("files",), [], "files must be an object"),
        (("files", "vision.onnx", "size"), "1", "size has the wrong type"),
        # A backend's graph variant is read like the graph it stands for.
        (("graphs", "decoder", "variants"), [], "variants must be an object, not a list"),
        (("graphs", "decoder", "variants"), {"onnxruntime": None}, "must be an object"),
        (("graphs", "decoder", "variants", "onnxruntime"), {"file": 3}, "file has the wrong type"),
        (
            ("graphs", "decoder", "variants", "onnxruntime"),
            {"file": "decoder.onnx", "fused_ops": "abc"},
            "fused_ops has the wrong type",
        ),
        (
            ("graphs", "decoder", "variants", "onnxruntime"),
            {"file": "unrecorded.ort.onnx"},
            "'unrecorded.ort.onnx', which has no file record",
        ),
        (("graphs", "decoder", "variants", "onnxruntime"), {"file": ""}, "is not a file name"),
    ],
)
def test_crafted_fields_give_one_bundle_error(
    bundle: Path, path: tuple[str, ...], value: object, message: str
) -> None:
    _rewrite_nested(bundle, path, value)
    with pytest.raises(BundleError, match=re.escape(message)) as info:
        load_manifest(bundle)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("prompt", "<|im_end|>" * 100, "prompt must be an object for PromptFormat, not a str"),
        ("tiling", [448, 1, 6], "tiling must be an object for TilingConfig, not a list"),
    ],
)
def test_a_record_that_is_not_an_object_says_what_to_do(
    bundle: Path, key: str, value: object, message: str
) -> None:
    """One short line with the fix, not the crafted value echoed back."""
    _rewrite(bundle, **{key: value})
    with pytest.raises(BundleError, match=re.escape(message)) as refused:
        load_manifest(bundle)
    assert "Re-export the bundle" in str(refused.value) and "<|im_end|>" not in str(refused.value)


@pytest.mark.parametrize(
    ("path", "what"),
    [(("prompt", "image_layout"), "Unknown image layout"), (("precision",), "precision")],
)
def test_a_crafted_name_is_not_echoed_across_lines(
    bundle: Path, path: tuple[str, ...], what: str
) -> None:
    """A manifest value the error names stays one short line, whatever it holds."""
    _rewrite_nested(bundle, path, "spiral\nERROR forged log line\n" * 500)
    with pytest.raises(BundleError, match=what) as refused:
        load_manifest(bundle)
    line = str(refused.value)
    assert "\n" not in line and len(line) < 400


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("graphs", "decoder", "inputs", 0, "dtype"), "float32\nERROR forged\x1b[2J"),
        (("schema_version",), "2.x\nERROR forged"),
        (("graphs", "decoder", "file"), "decoder\nERROR forged.onnx"),
    ],
)
def test_every_refusal_of_a_crafted_manifest_is_one_printable_line(
    bundle: Path, path: tuple[str | int, ...], value: str
) -> None:
    """Line breaks and terminal escapes a crafted value carries are shown escaped."""
    _rewrite_nested(bundle, path, value)
    with pytest.raises(BundleError) as refused:
        load_manifest(bundle)
    line = str(refused.value)
    assert line.isprintable() and "ERROR forged" in line


def test_a_bundle_without_a_vision_graph_is_refused(bundle: Path) -> None:
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    del data["graphs"]["vision"]
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="has no 'vision' graph"):
        load_manifest(bundle)
