"""The language-engine hand-off: our vision side feeds a decoder served by vLLM or TensorRT-LLM.

    bundle (vision graph, tiling, prompt, embedding table)  +  llm/ (Hugging Face decoder)
        └── our pipeline: tiles, vision features, spliced prompt embeddings ──▶ engine ──▶ tokens

- `decoder_checkpoint` writes `llm/`: the decoder of an NVLM-D / InternVL checkpoint as a plain
  Qwen2 / Llama checkpoint, streamed tensor by tensor (export side: torch, safetensors);
- `tensorrt_llm` writes the TensorRT-LLM conversion, build and serve commands;
- `vllm_engine` drives vLLM with our prompt embeddings (needs the `[vllm]` extra; it imports
  PyTorch through vLLM, which is why it lives here and not in the torch-free `runtime`).

`docs/scale-out.md` explains the whole path.
"""
