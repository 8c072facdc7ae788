"""Defaults shared by the CLI, calibration and the export side, in a module that imports nothing:
the CLI reads them at startup, and importing `export.accuracy` or `calibration` there would load
the runtime for every command."""

ACCURACY_REQUESTS = 4  # held-out requests the quantize/build accuracy check runs
ACCURACY_STEPS = 16  # greedy tokens each of them decodes
CALIBRATION_REQUESTS = 32  # requests (image + prompt) calibrate and build record by default
CALIBRATION_DECODE_STEPS = 4  # decode steps recorded per calibration request
