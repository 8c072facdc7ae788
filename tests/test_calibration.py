"""Calibration sets: recorded from the real runtime, deterministic, streamed, tied to a bundle."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import quiet
from helpers.tiny import TinyBundle
from PIL import Image

from nvlm_export.calibration import CalibrationOptions, CalibrationSet, collect_calibration
from nvlm_export.calibration.builtin import builtin_image
from nvlm_export.calibration.collect import builtin_requests
from nvlm_export.errors import BundleError, InputError
from nvlm_export.export.quantize import QuantizeSettings, quantize_bundle
from nvlm_export.runtime.manifest import DECODER_GRAPH, VISION_GRAPH, load_manifest
from nvlm_export.runtime.pipeline import Pipeline

FAST = CalibrationOptions(max_samples=2, seed=0, decode_steps=2)


@pytest.fixture(scope="module")
def bundle(tiny_bundle: TinyBundle) -> Path:
    return tiny_bundle("nvlm-d")[1]


def write_images(folder: Path, count: int, *, size: tuple[int, int] = (500, 400)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"img{index}.png"
        builtin_image(index, seed=7).resize(size).save(path)
        paths.append(path)
    return paths


def collect(bundle: Path, out: Path, options: CalibrationOptions = FAST) -> CalibrationSet:
    return collect_calibration(bundle, out, options, warn=quiet, progress=False)


def test_records_every_graph_call_of_real_requests(bundle: Path, tmp_path: Path) -> None:
    calib = collect(bundle, tmp_path / "calib")
    info = calib.info
    assert info.requests == 2 and info.source == "builtin"
    # Every tile of both images went through the vision graph (the runtime may encode an image
    # in several calls); a prefill plus up to 2 decode steps per request.
    pipe = Pipeline.load(bundle)
    images = [request.image for request in builtin_requests(2, FAST.seed)]
    tiles = sum(t.num_tiles for t in pipe.prepare("x", images).tilings)
    recorded = sum(s["pixel_values"].shape[0] for s in calib.samples(VISION_GRAPH))
    assert recorded == tiles
    # The prefill may come in chunks (the runtime bounds prefill activations); then one-token
    # decode steps continue from the whole prompt.
    decoder = list(calib.samples(DECODER_GRAPH))
    first_step = next(i for i, d in enumerate(decoder) if d["inputs_embeds"].shape[1] == 1)
    chunks, step = decoder[:first_step], decoder[first_step]
    prompt_length = sum(c["inputs_embeds"].shape[1] for c in chunks)
    assert prompt_length > 256  # the prompt holds a tile's image tokens
    assert chunks[0]["past_key_values.0.key"].shape[2] == 0
    assert step["past_key_values.0.key"].shape[2] == prompt_length
    decode_steps = [d for d in decoder if d["inputs_embeds"].shape[1] == 1]
    assert 1 <= len(decode_steps) <= 2 * FAST.decode_steps
    # Image features were spliced in: some prompt rows are not rows of the embedding table.
    table = np.load(bundle / "embed_tokens.npy")
    rows = chunks[0]["inputs_embeds"][0]
    assert not all(np.isclose(table, row).all(axis=1).any() for row in rows[:400])
    pixel = next(calib.samples(VISION_GRAPH))["pixel_values"]
    assert pixel.shape[1:] == (3, 448, 448) and pixel.dtype == np.float32


def test_same_seed_same_set_and_samples_stream_from_disk(bundle: Path, tmp_path: Path) -> None:
    first = collect(bundle, tmp_path / "a")
    second = collect(bundle, tmp_path / "b")
    other = collect(
        bundle, tmp_path / "c", CalibrationOptions(max_samples=2, seed=1, decode_steps=2)
    )
    assert first.info.images == second.info.images != other.info.images
    for a, b in zip(first.samples(VISION_GRAPH), second.samples(VISION_GRAPH), strict=True):
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    first_pixels = next(first.samples(VISION_GRAPH))["pixel_values"]
    other_pixels = next(other.samples(VISION_GRAPH))["pixel_values"]
    assert first_pixels.shape != other_pixels.shape or not np.array_equal(
        first_pixels, other_pixels
    )
    # One file per sample, read lazily: memory holds one sample at a time.
    files = sorted((tmp_path / "a" / DECODER_GRAPH).glob("*.npz"))
    assert len(files) == first.count(DECODER_GRAPH)
    assert first.info.graphs[DECODER_GRAPH].bytes == sum(f.stat().st_size for f in files)
    samples = first.samples(DECODER_GRAPH)
    assert iter(samples) is samples


def test_unreadable_images_are_skipped_and_counted(bundle: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    options = CalibrationOptions(images=str(tmp_path / "imgs"), max_samples=8, decode_steps=0)
    warnings: list[str] = []
    calib = collect_calibration(
        bundle, tmp_path / "calib", options, warn=warnings.append, progress=False
    )
    assert calib.info.requests == 2
    assert [Path(s["image"]).name for s in calib.info.skipped] == ["broken.jpg"]
    assert any("broken.jpg" in w for w in warnings)


def test_empty_or_all_bad_folder_is_an_error(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="matches no image files"):
        collect(bundle, tmp_path / "out", CalibrationOptions(images=str(tmp_path / "empty")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match="No usable calibration images"):
        collect(bundle, tmp_path / "out", CalibrationOptions(images=str(tmp_path / "bad")))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging directory or lock left


def test_five_images_keep_one_held_out_for_accuracy(bundle: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 5)
    options = CalibrationOptions(images=str(tmp_path / "imgs"), max_samples=8, decode_steps=0)
    info = collect(bundle, tmp_path / "calib", options).info
    assert len(info.held_out) == 1 and info.requests == 4
    assert not set(info.held_out) & set(info.images)


def test_quantize_refuses_a_calibration_set_of_another_bundle(
    bundle: Path, tiny_bundle: TinyBundle, tmp_path: Path
) -> None:
    _, other = tiny_bundle("internvl")
    collect(other, tmp_path / "calib", CalibrationOptions(max_samples=1, decode_steps=0))
    with pytest.raises(BundleError, match="recorded on another bundle"):
        quantize_bundle(
            bundle, tmp_path / "q", QuantizeSettings("int8"), tmp_path / "calib", quiet=True
        )
    assert not (tmp_path / "q").exists()


def bundle_as_written_before_extras_retired(bundle: Path, out: Path) -> Path:
    """A copy of `bundle` whose manifest.json has the `extras` key every 2.x writer put there
    until it was retired (docs/bundle.md); the typed manifest reads it and drops it."""
    shutil.copytree(bundle, out)
    data = json.loads((out / "manifest.json").read_text())
    with_extras = {}
    for key, value in data.items():
        with_extras[key] = value
        if key == "precision":
            with_extras["extras"] = {}
    (out / "manifest.json").write_text(json.dumps(with_extras, indent=2) + "\n")
    return out


def fingerprint_of(data: dict) -> str:
    data = {key: value for key, value in data.items() if key != "engines"}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint_recorded_by_earlier_versions(bundle: Path) -> str:
    """What `calibrate` recorded before the typed manifest: Manifest.to_dict() was then the
    manifest as written, so its fingerprint was that of the file's content without `engines`."""
    return fingerprint_of(json.loads((bundle / "manifest.json").read_text()))


def with_recorded_fingerprint(calib: Path, fingerprint: str) -> CalibrationSet:
    info = json.loads((calib / "calibration.json").read_text())
    info["bundle_fingerprint"] = fingerprint
    (calib / "calibration.json").write_text(json.dumps(info, indent=2) + "\n")
    return CalibrationSet.open(calib)


def test_a_set_recorded_before_the_typed_manifest_still_matches_its_bundle(
    bundle: Path, tmp_path: Path
) -> None:
    """Reading a manifest into the typed Manifest drops or normalises keys (here `extras`); a set
    recorded on the same bundle by an earlier version must not be refused for that."""
    old = bundle_as_written_before_extras_retired(bundle, tmp_path / "bundle")
    collect(old, tmp_path / "calib", CalibrationOptions(max_samples=1, decode_steps=0))
    calib = with_recorded_fingerprint(
        tmp_path / "calib", fingerprint_recorded_by_earlier_versions(old)
    )
    calib.check_matches(load_manifest(old), old)  # no BundleError


def test_a_set_recorded_since_the_typed_manifest_still_matches_its_bundle(
    bundle: Path, tmp_path: Path
) -> None:
    """Sets recorded from the typed manifest's introduction on hashed its to_dict()."""
    old = bundle_as_written_before_extras_retired(bundle, tmp_path / "bundle")
    collect(old, tmp_path / "calib", CalibrationOptions(max_samples=1, decode_steps=0))
    typed = fingerprint_of(load_manifest(old).to_dict())
    assert typed != fingerprint_recorded_by_earlier_versions(old)  # what the test is about
    calib = with_recorded_fingerprint(tmp_path / "calib", typed)
    calib.check_matches(load_manifest(old), old)  # no BundleError


def test_a_set_is_refused_once_its_bundle_manifest_changed(bundle: Path, tmp_path: Path) -> None:
    old = bundle_as_written_before_extras_retired(bundle, tmp_path / "bundle")
    collect(old, tmp_path / "calib", CalibrationOptions(max_samples=1, decode_steps=0))
    calib = with_recorded_fingerprint(
        tmp_path / "calib", fingerprint_recorded_by_earlier_versions(old)
    )
    data = json.loads((old / "manifest.json").read_text())
    data["tiling"]["max_tiles"] -= 1
    (old / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
    with pytest.raises(BundleError, match="recorded on another bundle"):
        calib.check_matches(load_manifest(old), old)


def test_not_a_calibration_set(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a calibration set"):
        CalibrationSet.open(tmp_path)


def test_builtin_images_are_deterministic() -> None:
    a, b = builtin_image(3, seed=5), builtin_image(3, seed=5)
    assert isinstance(a, Image.Image) and a.size == (1344, 896)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(builtin_image(3, seed=6)))


def test_a_negative_seed_is_refused_when_the_options_are_made() -> None:
    """Not after loading the bundle, when numpy's generator refuses it with a ValueError."""
    with pytest.raises(InputError, match="Seed -1 is invalid"):
        CalibrationOptions(seed=-1)
