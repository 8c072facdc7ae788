"""Defaults shared by the CLI, calibration and the export side, in a module that imports nothing:
the CLI reads them at startup, and importing `export.accuracy` or `calibration` there would load
the runtime for every command."""

ACCURACY_REQUESTS = 4  # held-out requests the quantize/build accuracy check runs
ACCURACY_STEPS = 16  # greedy tokens each of them decodes
CALIBRATION_REQUESTS = 32  # requests (image + prompt) calibrate and build record by default
CALIBRATION_DECODE_STEPS = 4  # decode steps recorded per calibration request
# Tokens per decoder call when the PyTorch reference (export validation, verify) prefills a
# sequence: as the runtime's prefill chunk. Each layer's attention scores are then
# [heads, 512, T], under 0.2 GiB for the bench checkpoint's validation prompt.
REFERENCE_CHUNK_TOKENS = 512
