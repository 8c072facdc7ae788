"""PyTorch reference definitions of the NVLM and InternVL architectures (export side only)."""
