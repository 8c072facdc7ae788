"""Calibration sets for explicit INT8 / FP8 quantization (see docs/calibration.md).

info = collect_calibration(bundle, Path("calib"), CalibrationOptions(images="photos/"))
calib = CalibrationSet.open("calib")
for feeds in calib.samples("decoder"): ...
"""

from nvlm_export.calibration.collect import CalibrationOptions, collect_calibration
from nvlm_export.calibration.dataset import CalibrationInfo, CalibrationSet, bundle_fingerprint

__all__ = [
    "CalibrationInfo",
    "CalibrationOptions",
    "CalibrationSet",
    "bundle_fingerprint",
    "collect_calibration",
]
