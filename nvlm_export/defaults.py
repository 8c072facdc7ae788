"""Defaults shared by the CLI, calibration and the export side, in a module that imports nothing:
the CLI reads them at startup, and importing `export.accuracy` or `calibration` there would load
the runtime for every command."""

ACCURACY_REQUESTS = 4  # held-out requests the quantize/build accuracy check runs
ACCURACY_STEPS = 16  # greedy tokens each of them decodes
CALIBRATION_REQUESTS = 32  # requests (image + prompt) calibrate and build record by default
CALIBRATION_DECODE_STEPS = 4  # decode steps recorded per calibration request
# Tokens per decoder call when the runtime prefills a prompt (bench/analysis.md measured the
# sizes), and when the PyTorch reference (export validation, verify) does. Each layer's attention
# scores are then [heads, 512, T], under 0.2 GiB for the bench checkpoint's validation prompt.
PREFILL_CHUNK_TOKENS = 512
REFERENCE_CHUNK_TOKENS = PREFILL_CHUNK_TOKENS

# KV-cache capacity of a bundle exported without --max-context. Edge devices rarely afford more;
# models allow up to max_position_embeddings.
DEFAULT_MAX_CONTEXT = 4096


def default_max_context(llm_config: dict) -> int:
    """DEFAULT_MAX_CONTEXT, or the decoder's own limit where that is smaller."""
    return min(DEFAULT_MAX_CONTEXT, int(llm_config.get("max_position_embeddings", 32768)))


# Generation and reuse defaults of the runtime, shown by `run` and `chat` (nvlm_export/runtime).
MAX_NEW_TOKENS = 128  # GenerateOptions.max_new_tokens, `run --max-new-tokens`
REUSE_CACHE_MIB = 256  # each reuse cache's budget (image features, prompt keys/values)

# ONNX opsets the exporter writes float graphs in: TensorRT 10.0-10.14 read up to 20, and torch's
# dynamo exporter emits 18 natively (others go through the ONNX version converter).
DEFAULT_OPSET = 18
SUPPORTED_OPSETS = range(18, 21)
# The opset each quantized precision's Q/DQ needs: float8 types (19), INT4 tensors and blocked
# DequantizeLinear (21). The quantizer raises a graph's opset to it (export/qdq.py).
MIN_OPSET_BY_PRECISION = {"fp8": 19, "int4": 21}
