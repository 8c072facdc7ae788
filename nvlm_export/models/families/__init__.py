"""One module per architecture family, each declaring one `ArchitectureSpec` (see `spec.py`).

- nvlm_d: NVLM-D (InternViT-6B style, tile tags, Qwen2 decoder).
- internvl: InternVL2/2.5/3, in its remote-code and transformers-native layouts.
- nvlm_x: NVLM-X (gated cross-attention over every tile).
- nvlm_h: NVLM-H (thumbnail in the decoder, regular tiles through cross-attention).

Shared pieces: `remote_code` (the remote-code config.json and tensor names), `tiny_shapes` (the
geometry of generated test checkpoints). `models/registry.py` lists the families.
"""
