"""TensorRT-LLM launch commands for a handed-off decoder (TensorRT-LLM cannot run here).

Three steps, as TensorRT-LLM's checkpoint workflow documents them for Qwen2 / Llama models:

1. `convert_checkpoint.py` (from the model's example directory of the TensorRT-LLM source tree)
   turns the Hugging Face checkpoint in `llm/` into a TensorRT-LLM checkpoint split for TP ranks;
2. `trtllm-build` builds one engine per rank; `--max_prompt_embedding_table_size` reserves room
   for image features, which TensorRT-LLM takes as a prompt-embedding table (its way of feeding
   multimodal embeddings; our vision engine produces the rows);
3. `trtllm-serve` serves the engines (TensorRT backend), tokenizer from `llm/`.

`DOCUMENTED_FLAGS` lists, per command, the options of the TensorRT-LLM release named in
`TENSORRT_LLM_VERSION`, read from its source (examples/models/core/{qwen,llama}/
convert_checkpoint.py, tensorrt_llm/commands/build.py and serve.py) and its command reference
(https://nvidia.github.io/TensorRT-LLM/commands/trtllm-build.html, .../trtllm-serve.html;
trtllm-serve's `--backend tensorrt` serves built engines, its default `pytorch` a Hugging Face
checkpoint); the tests check every written command against it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from nvlm_export.runtime.manifest import LanguageEngineSpec

TENSORRT_LLM_VERSION = "1.0.0"

# The example directory whose convert_checkpoint.py handles each decoder class.
CONVERTERS = {
    "Qwen2ForCausalLM": "examples/models/core/qwen/convert_checkpoint.py",
    "LlamaForCausalLM": "examples/models/core/llama/convert_checkpoint.py",
}
DTYPE_NAMES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}

DOCUMENTED_FLAGS: dict[str, frozenset[str]] = {
    "convert_checkpoint.py": frozenset(
        {"--model_dir", "--output_dir", "--dtype", "--tp_size", "--pp_size", "--workers"}
    ),
    "trtllm-build": frozenset(
        {
            "--checkpoint_dir",
            "--output_dir",
            "--max_batch_size",
            "--max_input_len",
            "--max_seq_len",
            "--max_num_tokens",
            "--max_prompt_embedding_table_size",
            "--gemm_plugin",
            "--workers",
        }
    ),
    "trtllm-serve": frozenset(
        {"--tokenizer", "--backend", "--tp_size", "--max_batch_size", "--max_seq_len", "--port"}
    ),
}


@dataclass(frozen=True)
class TensorRTLLMPlan:
    """The inputs of the three commands: the hand-off's record (its checkpoint, llm/, is the
    Hugging Face decoder) and the engine's sizes. Paths are relative to the bundle directory."""

    spec: LanguageEngineSpec
    max_batch_size: int
    max_image_tokens: int  # one request's image tokens: max tiles x tokens per tile
    work_dir: str = "trtllm"

    @property
    def converted_dir(self) -> str:
        return f"{self.work_dir}/checkpoint_tp{self.spec.tensor_parallel_size}"

    @property
    def engine_dir(self) -> str:
        return f"{self.work_dir}/engine_tp{self.spec.tensor_parallel_size}"


def tensorrt_llm_commands(plan: TensorRTLLMPlan) -> tuple[str, ...]:
    """convert, build and serve, as shell command lines to run from the bundle directory."""
    if plan.spec.architecture not in CONVERTERS:
        raise ValueError(f"TensorRT-LLM has no converter here for {plan.spec.architecture}")
    convert = [
        "python3",
        f"$TENSORRT_LLM_SRC/{CONVERTERS[plan.spec.architecture]}",
        *("--model_dir", plan.spec.checkpoint),
        *("--output_dir", plan.converted_dir),
        *("--dtype", DTYPE_NAMES[plan.spec.dtype]),
        *("--tp_size", str(plan.spec.tensor_parallel_size)),
    ]
    build = [
        "trtllm-build",
        *("--checkpoint_dir", plan.converted_dir),
        *("--output_dir", plan.engine_dir),
        *("--gemm_plugin", "auto"),
        *("--max_batch_size", str(plan.max_batch_size)),
        *("--max_input_len", str(plan.spec.max_context - 1)),
        *("--max_seq_len", str(plan.spec.max_context)),
        # Image features enter as prompt-table rows: room for every request of a full batch.
        *("--max_prompt_embedding_table_size", str(plan.max_batch_size * plan.max_image_tokens)),
        *("--workers", str(plan.spec.tensor_parallel_size)),
    ]
    serve = [
        "trtllm-serve",
        plan.engine_dir,
        *("--tokenizer", plan.spec.checkpoint),
        *("--backend", "tensorrt"),
        *("--tp_size", str(plan.spec.tensor_parallel_size)),
        *("--max_batch_size", str(plan.max_batch_size)),
        *("--max_seq_len", str(plan.spec.max_context)),
    ]
    return tuple(_shell(words) for words in (convert, build, serve))


def _shell(words: list[str]) -> str:
    # $TENSORRT_LLM_SRC stays unquoted so the shell expands it.
    return " ".join(w if w.startswith("$") else shlex.quote(w) for w in words)
