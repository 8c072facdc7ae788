"""`nvlm-export profile`: where the time and memory of a request go, per stage and tile count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from nvlm_export.commands import options as opts
from nvlm_export.errors import InputError
from nvlm_export.output import make_directory

Workload = opts.in_panel("Workload")
Runtime = opts.in_panel(opts.RUNTIME)


def profile(
    bundle: opts.BundleDir,
    image: Annotated[
        list[Path] | None,
        Workload(
            "--image",
            "-i",
            help="Profile this image (repeatable); default: synthetic images per --tiles.",
        ),
    ] = None,
    tiles: Annotated[
        str, Workload(help="Tile counts to profile with synthetic images, comma-separated.")
    ] = "1,3,7",
    prompt_tokens: Annotated[int, Workload(help="Text tokens in the question.")] = 32,
    new_tokens: Annotated[
        int, Workload(help="Tokens to generate per request (end-of-turn is ignored).")
    ] = 32,
    runs: Annotated[int, typer.Option(help="Measured requests per case; medians are quoted.")] = 3,
    vision_batch: Annotated[
        int,
        Runtime(
            help="On multi-tile cases, also time the image's tiles in vision calls of this many "
            "tiles against one tile per call (the runtime's default, for memory); 0: off.",
        ),
    ] = 4,
    prefill_chunks: Annotated[
        str,
        Runtime(
            help="Prefill chunk sizes in tokens to time against each other, alternated, with "
            "each one's memory peak (0: the whole prompt in one call), e.g. 512,1024; on the "
            "cases whose prompt is longer than the smallest. Default: not timed.",
        ),
    ] = "",
    warmup: Annotated[int, typer.Option(help="Unmeasured requests per case first.")] = 1,
    backend: opts.Backend = "auto",
    threads: opts.Threads = None,
    spin: opts.Spin = True,
    graph_variants: Annotated[
        bool,
        Runtime(
            "--graph-variants/--standard-graphs",
            help="Run the graph variants the bundle declares for the backend (ONNX Runtime: "
            "fused attention); --standard-graphs runs the standard-op graphs TensorRT builds.",
        ),
    ] = True,
    bandwidth_gbs: Annotated[
        float | None,
        typer.Option(
            "--bandwidth-gbs",
            min=0.001,
            help="Measured memory bandwidth in GB/s: adds the bandwidth-bound decode tokens/s.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write profile.json, profile.csv and profile.png here."
        ),
    ] = None,
    llm_engine: opts.LlmEngine = "bundle",
    concurrency: Annotated[
        int,
        Workload(help="vLLM: concurrent requests per case (aggregate tokens/s, TTFT per request)."),
    ] = 8,
    tensor_parallel_size: opts.TensorParallelSize = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Profile a bundle: per-stage latency (tiling, vision per tile, splice, prefill, TTFT, decode
    ms/token p50/p90/p99, end to end), peak memory of this process, the analytic decode cost
    (bytes and FLOPs per token) and, on Jetson, power from tegrastats.

    Examples:

      nvlm-export profile bundle/ --tiles 1,3,7 --runs 5 -o profile/

      nvlm-export profile bundle/ -i photo.jpg --prompt-tokens 64 --new-tokens 128 --json

      nvlm-export profile bundle/ --llm-engine vllm --concurrency 8 --tiles 1 --json
    """
    from nvlm_export.profiling.profiler import ProfileSettings, profile_bundle
    from nvlm_export.profiling.report import print_report, write_outputs

    settings = ProfileSettings(
        tiles=_whole_numbers(tiles, "--tiles", low=1),
        images=tuple(image or ()),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        runs=runs,
        warmup=warmup,
        bandwidth_gbs=bandwidth_gbs,
        vision_batch=vision_batch,
        prefill_chunks=_whole_numbers(prefill_chunks, "--prefill-chunks", low=0),
    )
    options = opts.runner_options(backend, threads, spin)
    if not graph_variants:
        options["graph_variants"] = False
    stderr = Console(stderr=True)
    if output is not None:
        make_directory(output, "the report")
    if llm_engine != "bundle":
        engine = (llm_engine, concurrency, tensor_parallel_size)
        _profile_concurrent(bundle, settings, *engine, as_json)
        return
    report = profile_bundle(
        bundle,
        settings,
        backend=backend,
        progress=lambda text: stderr.print(f"[dim]{text}[/]", highlight=False),
        **options,
    ).to_dict()
    written = write_outputs(report, output) if output is not None else {}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    print_report(report, Console())
    for path in written.values():
        stderr.print(f"wrote {path}", highlight=False)


def _profile_concurrent(
    bundle: Path,
    settings: Any,
    llm_engine: str,
    concurrency: int,
    tensor_parallel_size: int | None,
    as_json: bool,
) -> None:
    """The "N concurrent requests" case through a serving engine (nvlm_export/handoff)."""
    from nvlm_export.commands.run import load_pipeline
    from nvlm_export.handoff.concurrency import ConcurrencySettings, profile_concurrency

    if concurrency < 1:
        raise InputError(f"--concurrency {concurrency} is below 1", fix="Use 1 or more")
    engine = load_pipeline(bundle, llm_engine, tensor_parallel_size)
    case_settings = ConcurrencySettings(
        tiles=settings.tiles,
        concurrency=concurrency,
        prompt_tokens=settings.prompt_tokens,
        new_tokens=settings.new_tokens,
        runs=settings.runs,
        warmup=settings.warmup,
    )
    stderr = Console(stderr=True)
    report = profile_concurrency(
        engine, case_settings, progress=lambda text: stderr.print(f"[dim]{text}[/]")
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=f"{concurrency} concurrent requests through {llm_engine}")
    for column in ("tiles", "aggregate tok/s", "decode tok/s", "TTFT p50 s", "TTFT max s"):
        table.add_column(column)
    for case in report["cases"]:
        ttft = sorted(case["time_to_first_token_seconds"])
        table.add_row(
            str(case["tiles"]),
            f"{case['aggregate_tokens_per_second']:.1f}",
            f"{case['aggregate_decode_tokens_per_second']:.1f}",
            f"{ttft[len(ttft) // 2]:.2f}",
            f"{ttft[-1]:.2f}",
        )
    Console().print(table)


def _whole_numbers(text: str, option: str, *, low: int) -> tuple[int, ...]:
    """A comma-separated list of whole numbers >= `low`."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(
            f"{option} '{text}' is not a list of whole numbers", fix=f"Write e.g. {option} 1,3,7"
        ) from None
    if any(count < low for count in counts):
        raise InputError(f"{option} '{text}' has a number below {low}", fix=f"Use numbers >= {low}")
    return counts
