"""PyTorch reference definitions of the NVLM and InternVL architectures (export side only).

Kept import-free so the torch-free modules (`config`, `tokenizer`) load without PyTorch:
- config: `ModelConfig` / `VisionConfig` / `ProjectorConfig`, the `LAYOUTS` registry, parsing.
- vision: InternViT (6B and 300M styles), `RealChannelRMSNorm`, `pixel_shuffle`.
- projector: `MlpProjector` (NVLM-D / InternVL), `LinearProjector` (NVLM-X / NVLM-H tiles).
- language: transformers decoders built from `llm_config`.
- model: `VisionTower`, `VisionLanguageModel`, `build_model`.
- checkpoint: `load_checkpoint`, `save_checkpoint`, per-layout key tables.
- tiny: random `tiny` / `bench` / `3b` checkpoints (`make_tiny_checkpoint`, written shard by shard).
"""
