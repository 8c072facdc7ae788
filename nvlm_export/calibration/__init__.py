"""Calibration sets for explicit INT8 / FP8 quantization."""
