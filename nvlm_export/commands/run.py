"""`nvlm-export run`: answer a question about images with an exported bundle."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from nvlm_export.commands import generation as gen
from nvlm_export.commands import options as opts
from nvlm_export.defaults import MAX_NEW_TOKENS

LLM_ENGINES = ("bundle", "vllm")


def load_pipeline(
    bundle: Path, llm_engine: str, tensor_parallel_size: int | None, **backend_options: Any
) -> Any:
    """The bundle's own decoder graph (`bundle`), or its hand-off served by vLLM (`vllm`); both
    give the same `generate` interface."""
    from nvlm_export.errors import InputError, check_choice

    if llm_engine == "vllm":
        from nvlm_export.handoff.vllm_engine import VLLMPipeline

        return VLLMPipeline.load(
            bundle, tensor_parallel_size=tensor_parallel_size, **backend_options
        )
    check_choice(llm_engine, LLM_ENGINES, "language engine")
    if tensor_parallel_size is not None:
        raise InputError(
            "--tensor-parallel-size needs --llm-engine vllm",
            why="the bundle's own decoder runs on one device",
        )
    from nvlm_export.runtime.pipeline import Pipeline

    return Pipeline.load(bundle, **backend_options)


def run(
    bundle: opts.BundleDir,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            "-p",
            help="The question (or raw prompt). Its text is data: special-token strings in it "
            "stay plain text.",
        ),
    ] = None,
    turns: Annotated[
        Path | None,
        typer.Option(
            help="A conversation instead of --prompt: a JSONL file, one turn per line, "
            '{"prompt": "...", "images": ["a.png"]} (images optional). Later turns reuse the '
            "earlier ones' work.",
        ),
    ] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option(
            "--image", "-i", help="An image; repeat for several. Each fills one <image> in order."
        ),
    ] = None,
    max_new_tokens: gen.MaxNewTokens = MAX_NEW_TOKENS,
    max_tiles: opts.TileBudget = None,
    temperature: gen.Temperature = 0.0,
    top_k: gen.TopK = 0,
    top_p: gen.TopP = 1.0,
    seed: gen.Seed = None,
    stop: gen.Stop = None,
    system: opts.SystemMessage = None,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw",
            help="The prompt is fully formed and trusted: no chat template is applied and its "
            "special tokens (<|im_start|>, ...) are honoured. Never pass untrusted text with "
            "--raw.",
        ),
    ] = False,
    backend: opts.Backend = "auto",
    threads: opts.Threads = None,
    spin: opts.Spin = True,
    llm_engine: opts.LlmEngine = "bundle",
    tensor_parallel_size: opts.TensorParallelSize = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print text, token ids and timings as JSON at the end.")
    ] = False,
) -> None:
    """Answer a question about one or more images with an exported bundle, streaming the tokens.

    Examples:

      nvlm-export run bundle/ --image photo.jpg --prompt "What is in the picture?"

      nvlm-export run bundle/ -i a.png -i b.png -p "<image> vs <image>: what changed?" --json

      nvlm-export run bundle/ -i photo.jpg -p "Describe it." --llm-engine vllm --tp 2

      nvlm-export run bundle/ --turns conversation.jsonl --json

      nvlm-export run bundle/ -i photo.jpg -p "Describe it." --backend openvino
    """
    from nvlm_export.errors import InputError

    if (prompt is None) == (turns is None):
        raise InputError("Give either --prompt or --turns", fix="Pass exactly one of them")
    if turns is not None and (raw or image or llm_engine != "bundle"):
        raise InputError(
            "--turns cannot be combined with --raw, --image or --llm-engine vllm",
            fix="Name each turn's images in the JSONL file",
        )
    options = gen.generate_options(max_new_tokens, temperature, top_k, top_p, seed, stop)
    pipeline = load_pipeline(
        bundle,
        llm_engine,
        tensor_parallel_size,
        backend=backend,
        **opts.runner_options(backend, threads, spin),
    )
    backends = str(pipeline.backends)
    if turns is not None:
        conversation = pipeline.chat(system=system, max_tiles=max_tiles)
        for number, turn in enumerate(_read_turns(turns), start=1):
            stream = conversation.ask(turn["prompt"], turn.get("images", []), options)
            _print_answer(stream, as_json, backends, indent=None, turn=number)
        return
    assert prompt is not None
    stream = pipeline.generate(
        prompt,
        list(image or []),
        options,
        max_tiles=max_tiles,
        system=system,
        raw=raw,
    )
    _print_answer(stream, as_json, backends, indent=2)


def _print_answer(
    stream: Any, as_json: bool, backends: str, *, indent: int | None, turn: int = 0
) -> None:
    """Stream the answer's text, or print it with its ids and timings as JSON at the end."""
    for event in stream:
        if not as_json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    result = stream.result
    assert result is not None
    if not as_json:
        sys.stdout.write("\n")
        return
    timings = result.timings
    report = {
        **({"turn": turn} if turn else {}),
        "text": result.text,
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason,
        "backends": backends,  # each graph's backend, as --backend takes it
        "prompt_tokens": stream.prepared.prompt.num_tokens,
        "tiles_per_image": [t.num_tiles for t in stream.prepared.tilings],
        # Reuse across requests (docs/conversations.md); the vLLM engine keeps no such caches.
        "reused_prompt_tokens": getattr(stream, "reused_tokens", 0),
        "caches": getattr(stream, "cache_stats", {}),
        "timings": {
            "stages_seconds": stream.stage_seconds,
            "time_to_first_token_seconds": timings.time_to_first_token,
            "decode_tokens_per_second": timings.decode_tokens_per_second,
        },
    }
    typer.echo(json.dumps(report, indent=indent))


def _read_turns(path: Path) -> list[dict[str, Any]]:
    """The turns of a JSONL conversation file, checked before any model runs."""
    from nvlm_export.errors import InputError

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"Cannot read the turns file {path}", why=str(error)) from None
    turns = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            turn = json.loads(line)
        except json.JSONDecodeError as error:
            turn, why = None, error.msg
        else:
            why = 'it must be an object with a "prompt" string and an optional "images" list'
        valid = (
            isinstance(turn, dict)
            and isinstance(turn.get("prompt"), str)
            and set(turn) <= {"prompt", "images"}
            and isinstance(turn.get("images", []), list)
            and all(isinstance(i, str) for i in turn.get("images", []))
        )
        if not valid:
            raise InputError(
                f"Line {number} of {path} is not a turn",
                why=why,
                fix='Write one {"prompt": "...", "images": ["a.png"]} object per line',
            )
        turns.append(turn)
    if not turns:
        raise InputError(f"The turns file {path} holds no turn", fix="Write one turn per line")
    return turns
