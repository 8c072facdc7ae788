"""nvlm-export: deploy NVIDIA NVLM and InternVL vision-language models to edge and data-center GPUs.

Kept import-light on purpose: `import nvlm_export.runtime` must work on a Jetson without PyTorch.
"""

__version__ = "0.1.0"
