"""`nvlm-export chat`: an interactive conversation about images in the terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from nvlm_export.commands import generation as gen
from nvlm_export.commands import options as opts
from nvlm_export.defaults import REUSE_CACHE_MIB

if TYPE_CHECKING:
    from nvlm_export.runtime.generation import GenerateOptions

COMMANDS_HELP = "/image PATH adds an image to your next question, /reset starts over, /quit ends."


def chat(
    bundle: opts.BundleDir,
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", "-i", help="An image for the first question; repeatable."),
    ] = None,
    max_new_tokens: gen.MaxNewTokens = 256,
    temperature: gen.Temperature = 0.0,
    top_k: gen.TopK = 0,
    top_p: gen.TopP = 1.0,
    seed: gen.Seed = None,
    stop: gen.Stop = None,
    max_tiles: opts.TileBudget = None,
    system: opts.SystemMessage = None,
    backend: opts.Backend = "auto",
    threads: opts.Threads = None,
    spin: opts.Spin = True,
    cache_mib: Annotated[
        int,
        typer.Option(
            help="Budget of each reuse cache (image features, prompt keys/values), MiB; 0 = off."
        ),
    ] = REUSE_CACHE_MIB,
) -> None:
    """Chat about images: answers stream as they are generated, each followed by its time to
    first token and tokens/s. Follow-up questions reuse the earlier turns' work, so they answer
    quickly. Type /image PATH to add an image to your next question, /reset to start a new
    conversation and /quit (or end of input) to leave. Reads questions from stdin, one per line,
    so it can be scripted: a line that fails is reported and the chat goes on, and a script
    (stdin not a terminal) with failed lines exits 1 at its end.

    Examples:

      nvlm-export chat bundle/ --image photo.jpg

      printf 'What colour is it?\\nAnd its shape?\\n' | nvlm-export chat bundle/ -i photo.jpg
    """
    from nvlm_export.errors import NvlmError
    from nvlm_export.runtime.pipeline import Pipeline

    options = gen.generate_options(max_new_tokens, temperature, top_k, top_p, seed, stop)
    budget = cache_mib * 2**20
    pipeline = Pipeline.load(
        bundle,
        backend=backend,
        feature_cache_bytes=budget,
        prefix_cache_bytes=budget,
        **opts.runner_options(backend, threads, spin),
    )
    conversation = pipeline.chat(system=system, max_tiles=max_tiles)
    pending: list[Any] = [pipeline.load_image(path) for path in image or []]
    interactive = sys.stdin.isatty()
    _note(f"Chatting with {bundle}. {COMMANDS_HELP}")
    failed = 0
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            break
        text = line.strip()
        try:
            if text.startswith("/"):
                pending = _command(text, conversation, pipeline, pending)
            elif text:
                _answer(conversation, text, pending, options)
                pending = []
        except NvlmError as error:
            _note(f"error: {error.one_line()}")
            failed += 1
    if failed and not interactive:  # a script's caller learns that some of it failed
        _note(f"{failed} line{'s' if failed > 1 else ''} of the script failed")
        raise typer.Exit(1)


def _command(text: str, conversation: Any, pipeline: Any, pending: list[Any]) -> list[Any]:
    """Run a /command; returns the images waiting for the next question."""
    name, _, argument = text.partition(" ")
    if name == "/reset":
        conversation.reset()
        _note("(new conversation)")
        return []
    if name == "/image":
        if not argument.strip():
            _note("/image needs a PATH: /image photo.jpg")
            return pending
        pending = [*pending, pipeline.load_image(Path(argument.strip()).expanduser())]
        _note(f"(image {argument.strip()} joins your next question)")
        return pending
    _note(f"Unknown command {text!r}. {COMMANDS_HELP}")
    return pending


def _answer(conversation: Any, text: str, images: list[Any], options: GenerateOptions) -> None:
    stream = conversation.ask(text, images, options)
    for event in stream:
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    result = stream.result
    timings = result.timings
    new = stream.prepared.prompt.num_tokens - stream.reused_tokens
    _note(
        f"[time to first token {timings.time_to_first_token:.2f} s, "
        f"{timings.decode_tokens_per_second:.1f} tokens/s, {new} new prompt tokens]"
    )


def _note(text: str) -> None:
    """Status lines go to stderr, so stdout holds only the answers."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
