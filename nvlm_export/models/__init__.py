"""PyTorch reference definitions of the NVLM and InternVL architectures (export side only).

Kept import-free so the torch-free modules (`registry`, `families`, `config`, `config_io`,
`tokenizer`) load without PyTorch:
- registry: every architecture family and checkpoint layout by name (`families/`: one module each).
- config: `ModelConfig` / `VisionConfig` / `ProjectorConfig`; config_io: reading and writing
  config.json in any layout.
- vision: InternViT (6B and 300M styles), `RealChannelRMSNorm`, `pixel_shuffle`.
- projector: `MlpProjector` (NVLM-D / InternVL), `LinearProjector` (NVLM-X / NVLM-H tiles).
- language: transformers decoders built from `llm_config`.
- model: `VisionTower`, `VisionLanguageBase`, `VisionLanguageModel`, `build_model`.
- checkpoint: `load_checkpoint`, `save_checkpoint`, through each layout's key rules.
- tiny: random `tiny` / `bench` / `3b` checkpoints (`make_tiny_checkpoint`, written shard by shard).
"""
