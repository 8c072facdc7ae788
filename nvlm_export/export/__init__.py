"""Export side: trace the vision encoder and language decoder to ONNX and write bundles."""
