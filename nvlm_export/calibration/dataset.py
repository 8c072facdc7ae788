"""The on-disk calibration set: one `.npz` file per recorded graph call, plus `calibration.json`.

    CALIB/
      calibration.json        # format version, bundle (path + manifest fingerprint), seed, images,
                              # sample counts and bytes per graph, held-out images, and the tile
                              # budget each request used to fit the bundle's context
      vision/000000.npz       # the feeds of one vision call (pixel_values of one image)
      decoder/000000.npz      # one decoder call: a prefill, or a decode step with its KV cache
      cross_kv/000000.npz     # NVLM-X/H: one request's cross_embeds

Samples are written as they are produced and read back one at a time, so neither recording nor
quantizing holds more than one sample in memory. A set belongs to one bundle: `quantize` compares
the fingerprint of the bundle's manifest with the one recorded here and refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nvlm_export.errors import BundleError, InputError
from nvlm_export.output import OutputKind
from nvlm_export.runtime.manifest import MANIFEST_NAME, Manifest, read_index

CALIBRATION_MANIFEST = "calibration.json"
CALIBRATION_SET = OutputKind("calibration set", CALIBRATION_MANIFEST)
FORMAT_VERSION = 1


def bundle_fingerprint(bundle: str | os.PathLike[str]) -> str:
    """SHA-256 of the bundle's manifest.json as written, without what leaves its graphs as they
    are: `engines` (TensorRT engines built from them) and a hand-off (`language_engine` and the
    files of its checkpoint; a hand-off re-saves an older schema's manifest in the current one,
    which then no longer matches sets recorded on it). The file, not the typed `Manifest`:
    reading one normalises it (retired keys dropped, new fields filled with defaults) differently
    from version to version, and a set must keep matching the bundle it was recorded on."""
    return _fingerprint(json.loads((Path(bundle) / MANIFEST_NAME).read_text()))


def _fingerprint(manifest_data: Mapping[str, Any]) -> str:
    data = {key: value for key, value in manifest_data.items() if key != "engines"}
    engine = data.get("language_engine")
    if isinstance(engine, dict):  # as the bundle was before the hand-off
        data["language_engine"] = None
        inside = f"{str(engine.get('checkpoint')).rstrip('/')}/"
        if isinstance(data.get("files"), dict):
            data["files"] = {p: r for p, r in data["files"].items() if not p.startswith(inside)}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class GraphSamples:
    """How many samples of one graph the set holds, and their size on disk."""

    count: int = 0
    bytes: int = 0


@dataclass
class RequestTiling:
    """How one request was tiled: the tile budget (`max_tiles`) that let its prompt and decode
    steps fit the bundle's context, the tiles encoded (thumbnails included) and the prompt's
    length."""

    request: str
    max_tiles: int
    tiles: int
    prompt_tokens: int


@dataclass
class CalibrationInfo:
    """Everything `calibration.json` records (provenance and contents)."""

    bundle: str
    bundle_fingerprint: str
    seed: int
    decode_steps: int
    max_samples: int
    source: str  # "builtin" or the --images argument
    images: list[str] = field(default_factory=list)  # used for calibration, in order
    held_out: list[str] = field(default_factory=list)  # kept for the accuracy report
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable: {image, reason}
    requests: int = 0
    graphs: dict[str, GraphSamples] = field(default_factory=dict)
    # The bundle's context and tile budget, and how each request was tiled to fit that context
    # (a request's max_tiles below bundle_max_tiles means its images were capped).
    max_context: int = 0
    bundle_max_tiles: int = 0
    tiling: list[RequestTiling] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationInfo:
        values = dict(data)
        values["graphs"] = {k: GraphSamples(**v) for k, v in values.get("graphs", {}).items()}
        values["tiling"] = [RequestTiling(**t) for t in values.get("tiling", [])]
        return cls(**values)


class CalibrationWriter:
    """Streams samples into a directory (a staging directory; the caller moves it into place)."""

    def __init__(self, directory: Path, info: CalibrationInfo) -> None:
        self.directory = Path(directory)
        self.info = info

    def add(self, graph: str, feeds: Mapping[str, np.ndarray]) -> None:
        samples = self.info.graphs.setdefault(graph, GraphSamples())
        path = self.directory / graph / f"{samples.count:06d}.npz"
        path.parent.mkdir(exist_ok=True)
        # Key order is kept by npz, so a sample reads back exactly as it was fed.
        np.savez(path, **{name: np.asarray(value) for name, value in feeds.items()})
        samples.count += 1
        samples.bytes += path.stat().st_size

    def finish(self) -> Path:
        path = self.directory / CALIBRATION_MANIFEST
        path.write_text(json.dumps(self.info.to_dict(), indent=2) + "\n")
        return path


class CalibrationSet:
    """A calibration set on disk, read lazily."""

    def __init__(self, directory: Path, info: CalibrationInfo) -> None:
        self.directory = directory
        self.info = info

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> CalibrationSet:
        root = Path(directory)
        path = root / CALIBRATION_MANIFEST
        command = "nvlm-export calibrate BUNDLE -o CALIB"
        data = read_index(root, CALIBRATION_MANIFEST, "calibration set", command, InputError)
        try:
            info = CalibrationInfo.from_dict(data)
        except (TypeError, KeyError, AttributeError) as error:
            raise InputError(
                f"{path} is malformed", why=str(error), fix="Run nvlm-export calibrate again"
            ) from None
        if info.format_version != FORMAT_VERSION:
            raise InputError(
                f"{path} has calibration format {info.format_version}",
                why=f"this nvlm-export reads format {FORMAT_VERSION}",
                fix="Run nvlm-export calibrate again",
            )
        return cls(root, info)

    def check_matches(self, manifest: Manifest, bundle: Path) -> None:
        """Refuse a set recorded on another bundle: its samples have another graph's inputs.
        `manifest` is `bundle`'s, as loaded: sets recorded from the typed manifest's introduction
        until the fingerprint read the file carry the fingerprint of its `to_dict()`."""
        recorded = self.info.bundle_fingerprint
        if recorded not in (bundle_fingerprint(bundle), _fingerprint(manifest.to_dict())):
            raise BundleError(
                f"Calibration set '{self.directory}' was recorded on another bundle",
                why=f"it belongs to '{self.info.bundle}' and the manifest of '{bundle}' differs",
                fix=f"Run nvlm-export calibrate {bundle} -o NEW_CALIB and pass that",
            )

    def count(self, graph: str) -> int:
        samples = self.info.graphs.get(graph)
        return samples.count if samples else 0

    def samples(self, graph: str) -> Iterator[dict[str, np.ndarray]]:
        """The recorded feeds of `graph`, one call at a time."""
        for index in range(self.count(graph)):
            with np.load(self.directory / graph / f"{index:06d}.npz") as data:
                yield {name: data[name] for name in data.files}
