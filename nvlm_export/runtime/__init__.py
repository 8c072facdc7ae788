"""The thin runtime: tiling, prompt assembly, vision encoding and KV-cached generation.

Imports numpy, pillow, tokenizers, onnxruntime and (lazily) tensorrt only — never torch or
transformers — so it installs on a Jetson without them. `tests/test_runtime_imports.py` enforces it.
"""
