"""Checkpoint -> bundle -> runtime: the bundle generates exactly what PyTorch generates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import slow
from PIL import Image

from nvlm_export.errors import BundleError, InputError, PromptError, ValidationError
from nvlm_export.export import validate
from nvlm_export.export.architectures import architecture_for_layout
from nvlm_export.export.bundle import ExportSettings, export_bundle
from nvlm_export.export.reference import TorchReference
from nvlm_export.models.checkpoint import load_checkpoint
from nvlm_export.runtime.manifest import MANIFEST_NAME, Manifest, load_manifest
from nvlm_export.runtime.pipeline import Pipeline

STEPS = 24
QUESTION = "What is shown in the picture?"
# Image sizes that tile into 1, 3 and 7 tiles with NVLM-D's 1..6 grid (thumbnail included).
SIZES = {1: (500, 400), 3: (1920, 1080), 7: (1344, 896)}


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def exported(tiny_bundle):
    """A tiny checkpoint and its bundle per layout, with a 1..6 tile budget for every layout so
    the same images give 1, 3 and 7 tiles."""
    return lambda layout: tiny_bundle(layout)


def reference_tokens(layout: str, checkpoint: Path, pipe: Pipeline, images: list) -> list[int]:
    prepared = pipe.prepare(QUESTION, images)
    eos = pipe.manifest.tokenizer.eos_token_ids
    if layout == "internvl-hf":
        return transformers_generate(checkpoint, prepared, eos)
    model = load_checkpoint(checkpoint)
    reference = TorchReference(model, architecture_for_layout(model.config.layout))
    return reference.greedy(prepared.prompt, prepared.tilings, STEPS, eos)


def transformers_generate(checkpoint: Path, prepared, eos: tuple[int, ...]) -> list[int]:
    """For the transformers-native layout the reference is transformers' own `generate`."""
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    input_ids = torch.from_numpy(prepared.prompt.input_ids)[None, :]
    tiles = [torch.from_numpy(t.pixel_values) for t in prepared.tilings]
    images = {"pixel_values": torch.cat(tiles)} if tiles else {}
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            **images,
            max_new_tokens=STEPS,
            do_sample=False,
            eos_token_id=list(eos),
            pad_token_id=eos[0],
        )
    return out[0, input_ids.shape[1] :].tolist()


# Fast lane: one layout up to 3 tiles; the rest (an export and a PyTorch reference each) is slow.
@pytest.mark.parametrize("layout", ["nvlm-d", slow("internvl"), slow("internvl-hf")])
@pytest.mark.parametrize("tiles", [0, 1, 3, slow(7)])
def test_bundle_greedy_equals_pytorch(exported, layout: str, tiles: int) -> None:
    checkpoint, bundle = exported(layout)
    pipe = Pipeline.load(bundle)
    images = [noise_image(SIZES[tiles], seed=tiles)] if tiles else []
    result = pipe.generate(QUESTION, images, max_new_tokens=STEPS).run()
    if tiles:
        assert pipe.prepare(QUESTION, images).tilings[0].num_tiles == tiles
    expected = reference_tokens(layout, checkpoint, pipe, images)
    assert list(result.token_ids) == expected
    assert len(expected) == STEPS or expected[-1] in pipe.manifest.tokenizer.eos_token_ids


def test_greedy_output_depends_on_the_image(exported) -> None:
    """Guards the parity test against a model that ignores its image."""
    _, bundle = exported("nvlm-d")
    pipe = Pipeline.load(bundle)
    a = pipe.generate(QUESTION, [noise_image((500, 400), 1)], max_new_tokens=8).run()
    b = pipe.generate(QUESTION, [noise_image((500, 400), 2)], max_new_tokens=8).run()
    assert a.token_ids != b.token_ids


def test_several_images_in_one_prompt(exported) -> None:
    checkpoint, bundle = exported("nvlm-d")
    pipe = Pipeline.load(bundle)
    images = [noise_image((500, 400), 1), noise_image((1920, 1080), 2)]
    question = "<image> and <image>: what differs?"
    ours = pipe.generate(question, images, max_new_tokens=12).run().token_ids
    model = load_checkpoint(checkpoint)
    prepared = pipe.prepare(question, images)
    reference = TorchReference(model, architecture_for_layout("nvlm-d"))
    eos = pipe.manifest.tokenizer.eos_token_ids
    assert list(ours) == reference.greedy(prepared.prompt, prepared.tilings, 12, eos)


def test_manifest_describes_the_graphs(exported) -> None:
    _, bundle = exported("nvlm-d")
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert manifest["architecture"] == "nvlm-d"
    assert set(manifest["graphs"]) == {"vision", "decoder"}
    vision = manifest["graphs"]["vision"]
    assert vision["inputs"][0]["shape"] == ["tiles", 3, 448, 448]
    assert vision["outputs"][0]["shape"][:2] == ["tiles", 256]
    assert manifest["kv_cache"]["max_context"] > 0
    assert manifest["tiling"]["max_tiles"] == 6
    assert manifest["prompt"]["image_layout"] == "tile_tags"


def test_prompt_that_overflows_the_context_is_refused_before_any_work(exported) -> None:
    _, bundle = exported("nvlm-d")
    pipe = Pipeline.load(bundle)
    capacity = pipe.manifest.kv_cache.max_context
    many = [noise_image((1344, 896), i) for i in range(capacity // (7 * 256) + 1)]
    with pytest.raises(PromptError, match="context holds"):
        pipe.generate(QUESTION, many)
    assert pipe.runners["vision"].calls == 0


def test_existing_bundle_needs_overwrite(exported, tmp_path: Path) -> None:
    checkpoint, bundle = exported("nvlm-d")
    with pytest.raises(InputError, match="--overwrite"):
        export_bundle(checkpoint, bundle, ExportSettings(validate=False), quiet=True)


@pytest.mark.slow
def test_failed_validation_leaves_no_bundle(exported, tmp_path: Path, monkeypatch) -> None:
    checkpoint, _ = exported("nvlm-d")
    monkeypatch.setitem(validate.TOLERANCES, "fp32", (-1.0, 0.0))  # nothing can pass
    out = tmp_path / "bundle"
    with pytest.raises(ValidationError, match="does not match"):
        export_bundle(checkpoint, out, ExportSettings(), quiet=True)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_validation_holds_one_graph_of_the_bundle_at_a_time(
    exported, tmp_path: Path, monkeypatch
) -> None:
    """Peak memory of validation is one graph's weights, not the bundle's (docs/memory.md)."""
    from nvlm_export.runtime.backends.onnxruntime import OnnxRuntimeRunner

    checkpoint, _ = exported("nvlm-d")
    live: set[str] = set()
    most: list[set[str]] = []
    activate, deactivate = OnnxRuntimeRunner._activate_impl, OnnxRuntimeRunner.deactivate

    def on_activate(runner) -> None:
        activate(runner)
        live.add(runner.spec.name)
        most.append(set(live))

    def on_deactivate(runner) -> None:
        live.discard(runner.spec.name)
        deactivate(runner)

    monkeypatch.setattr(OnnxRuntimeRunner, "_activate_impl", on_activate)
    monkeypatch.setattr(OnnxRuntimeRunner, "deactivate", on_deactivate)
    report = export_bundle(checkpoint, tmp_path / "b", ExportSettings(), quiet=True)
    assert report.validation is not None and report.validation.passed
    assert most == [{"vision"}, {"decoder"}]
    assert not live


@pytest.mark.slow
def test_fp16_export_validates(exported, tmp_path: Path) -> None:
    checkpoint, _ = exported("nvlm-d")
    report = export_bundle(checkpoint, tmp_path / "b16", ExportSettings(dtype="fp16"), quiet=True)
    assert report.validation is not None and report.validation.passed
    pipe = Pipeline.load(tmp_path / "b16")
    assert pipe.manifest.graph("decoder").input("inputs_embeds").dtype == "float16"
    assert len(pipe.generate(QUESTION, max_new_tokens=4).run().token_ids) >= 1


# --- the CLI: one clear line and a non-zero exit for every bad input -------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("nvlm-export")
    return subprocess.run([str(exe), *args], capture_output=True, text=True)


def assert_one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert text in lines[0]


def copy_bundle(bundle: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(bundle, target)
    return target


def test_cli_run_streams_text_and_json(exported) -> None:
    _, bundle = exported("nvlm-d")
    result = cli("run", str(bundle), "-p", "Hi", "-n", "5", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["token_ids"]) == 5 and report["finish_reason"] == "length"


def test_cli_bad_bundle_path(tmp_path: Path) -> None:
    assert_one_line_error(cli("run", str(tmp_path / "nope"), "-p", "x"), "does not exist")


def test_cli_corrupt_onnx(exported, tmp_path: Path) -> None:
    bundle = copy_bundle(exported("nvlm-d")[1], tmp_path / "b")
    # The file ONNX Runtime loads: the fused-attention variant where the bundle declares one.
    decoder = load_manifest(bundle).graphs["decoder"].file_for("onnxruntime")
    (bundle / decoder).write_bytes(b"\x00garbage")
    _rerecord(bundle)  # as a careless writer would: sizes and hashes match the garbage
    assert_one_line_error(cli("run", str(bundle), "-p", "x"), "cannot load the decoder graph")


def _rerecord(bundle: Path) -> None:
    """Record the bundle's files as they are now, as a writer of a bad bundle would."""
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    Manifest.from_dict(data).save(bundle)


def test_cli_changed_weights_are_caught_naming_the_file(exported, tmp_path: Path) -> None:
    bundle = copy_bundle(exported("nvlm-d")[1], tmp_path / "b")
    with open(bundle / "embed_tokens.npy", "ab") as f:
        f.write(b"\0")  # appended bytes: every load checks sizes
    assert_one_line_error(cli("run", str(bundle), "-p", "x"), "'embed_tokens.npy' is")
    bundle = copy_bundle(exported("nvlm-d")[1], tmp_path / "c")
    data = bytearray((bundle / "decoder.onnx").read_bytes())
    data[-1] ^= 0xFF  # a flipped byte: same size, caught by the hashes lint checks
    (bundle / "decoder.onnx").write_bytes(bytes(data))
    assert_one_line_error(
        cli("lint", str(bundle)), "'decoder.onnx' does not match its recorded SHA-256"
    )


def test_cli_unknown_schema(exported, tmp_path: Path) -> None:
    bundle = copy_bundle(exported("nvlm-d")[1], tmp_path / "b")
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["schema_version"] = "9.0"
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert_one_line_error(cli("run", str(bundle), "-p", "x"), "Upgrade nvlm-export")


def test_cli_too_many_images(exported, tmp_path: Path) -> None:
    _, bundle = exported("nvlm-d")
    path = tmp_path / "big.png"
    noise_image((1344, 896), 0).save(path)
    args = ["run", str(bundle), "-p", "x"] + ["--image", str(path)] * 3
    assert_one_line_error(cli(*args), "context holds")


def test_cli_image_count_mismatch(exported, tmp_path: Path) -> None:
    _, bundle = exported("nvlm-d")
    path = tmp_path / "a.png"
    noise_image((500, 400), 0).save(path)
    result = cli("run", str(bundle), "-p", "<image> and <image>", "--image", str(path))
    assert_one_line_error(result, "placeholder")


def test_cli_overlong_prompt(exported) -> None:
    _, bundle = exported("nvlm-d")
    assert_one_line_error(cli("run", str(bundle), "-p", "word " * 5000), "context holds")


def test_pipeline_refuses_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError):
        Pipeline.load(tmp_path)


@pytest.mark.slow
def test_verify_passes_and_reports_each_stage(exported) -> None:
    checkpoint, bundle = exported("internvl")
    result = cli("verify", str(checkpoint), str(bundle), "--steps", "8", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    names = [c["name"] for c in report["comparisons"]]
    assert names[0] == "tiling[0]" and "first-step logits" in names
    assert report["tokens"]["identical"] and report["passed"]
