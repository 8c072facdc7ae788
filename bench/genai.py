"""ONNX Runtime GenAI on the bench checkpoint's language model: build once, then time decoding.

The bench checkpoint's decoder is a transformers Qwen2ForCausalLM; it is saved as a plain Hugging
Face Qwen2 checkpoint and handed to GenAI's model builder (`onnxruntime_genai.models.builder`),
which writes its own decoder graph (fused GroupQueryAttention, in-place KV cache) — local, offline.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_hf_qwen2(checkpoint: Path, out: Path) -> Path:
    """The checkpoint's language model as a Hugging Face Qwen2 directory (fp32 weights)."""
    if (out / "config.json").is_file():
        return out
    import torch

    from nvlm_export.models.checkpoint import checkpoint_file, load_checkpoint
    from nvlm_export.output import CHECKPOINT, staged_output

    lm = load_checkpoint(checkpoint, dtype=torch.float32).decoder
    lm.config.model_type = "qwen2"  # NVLM-D's "llama" quirk would send GenAI to its Llama path
    with staged_output(out, CHECKPOINT, overwrite=False, sources=[checkpoint]) as staged:
        lm.save_pretrained(staged.path, safe_serialization=True)
        for name in TOKENIZER_FILES:
            source = checkpoint_file(checkpoint, name)
            if source is not None:
                shutil.copyfile(source, staged.path / name)
        staged.publish()  # safetensors writes 0600; publish gives the usual permissions
    return out


def build_genai_model(hf_dir: Path, out: Path, precision: str, threads: int) -> Path:
    """Run GenAI's builder for the CPU provider at `precision` (fp32 or int4)."""
    if (out / "genai_config.json").is_file():
        return out
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir)]
    command += ["-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "cache")]
    subprocess.run(command, check=True)
    _set_threads(out, threads)
    return out


def _set_threads(model_dir: Path, threads: int) -> None:
    import json

    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=2))


class GenAIDecoder:
    """A loaded GenAI model; `decode_seconds` times greedy steps after a prompt of token ids."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(model_dir))

    def decode_seconds(self, prompt_ids: np.ndarray, new_tokens: int) -> tuple[float, list[float]]:
        """(prefill seconds, per-token decode seconds) for greedy decoding."""
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(
            do_sample=False, max_length=len(prompt_ids) + new_tokens + 1, min_length=0
        )
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt_ids.astype(np.int32))
        generator.get_next_tokens()
        prefill = time.perf_counter() - start
        steps = []
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            generator.generate_next_token()
            generator.get_next_tokens()
            steps.append(time.perf_counter() - start)
        return prefill, steps
