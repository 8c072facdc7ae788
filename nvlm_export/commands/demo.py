"""`nvlm-export demo-eval`: held-out accuracy of the built-in demo model, or of its bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from nvlm_export.commands import options as opts
from nvlm_export.errors import InputError, require_export_extra


def evaluate_demo(
    target: Annotated[
        Path | None,
        typer.Argument(
            help="A bundle exported from the demo model (any precision), or a demo checkpoint "
            "directory (PyTorch; needs the export extra). Default: the shipped checkpoint."
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", "-n", help="Held-out images to ask about.", min=1)
    ] = 100,
    threads: opts.Threads = None,
    backend: opts.Backend = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as JSON.")] = False,
) -> None:
    """Score the demo model on held-out synthetic questions: exact match per question type.

    Every image is asked about the colour and shape of each object, the object count, which
    object is leftmost / rightmost and the digit written in it. Reading is scored again on the
    multi-tile images with max_tiles=1, to show what the high-resolution tiles add.

    Examples:

      nvlm-export demo-eval                      # the shipped PyTorch checkpoint

      nvlm-export export "$(python -m nvlm_export.demo checkpoint)" -o demo-bundle/
      nvlm-export demo-eval demo-bundle/ --samples 200 --json
      nvlm-export demo-eval demo-bundle/ --backend vision=openvino   # a backend's answers
    """
    from nvlm_export.demo import default_checkpoint
    from nvlm_export.demo.dataset import held_out
    from nvlm_export.demo.evaluate import BundleAnswerer, TorchAnswerer, evaluate
    from nvlm_export.runtime.manifest import MANIFEST_NAME

    target = target or default_checkpoint()
    ran_on = {}  # for a bundle, what "auto" chose: the answers are those of these backends
    if (target / MANIFEST_NAME).is_file():
        options = opts.runner_options(backend, threads, spin=True)
        answerer = BundleAnswerer(target, backend, **options)
        ran_on["backends"] = str(answerer.pipeline.backends)
    elif (target / "config.json").is_file():
        require_export_extra()
        answerer = TorchAnswerer.from_checkpoint(target)
    else:
        raise InputError(
            f"{target} is neither a bundle nor a checkpoint",
            why=f"it has no {MANIFEST_NAME} and no config.json",
            fix="Pass a bundle directory or the demo checkpoint directory",
        )
    report = evaluate(answerer, held_out(samples))
    if as_json:
        summary = {"target": str(target), "samples": samples, **ran_on, **report.to_dict()}
        typer.echo(json.dumps(summary))
        return
    on = f" on {ran_on['backends']}" if ran_on else ""
    typer.echo(f"{target}: {samples} held-out images{on}")
    for line in report.lines():
        typer.echo(line)
