"""The profile chart: stage breakdown per case, and latency against tile count.

Drawn with matplotlib when it is installed; otherwise with Pillow (a core dependency), so the
PNG exists on a runtime-only install too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

# Stages in request order, with their colours in both renderers.
SEGMENTS = (
    ("prepare", "#9e9e9e"),
    ("vision", "#1f77b4"),
    ("splice", "#17becf"),
    ("prefill", "#ff7f0e"),
    ("decode", "#2ca02c"),
)
LINES = (("ttft_ms", "TTFT", "#d62728"), ("e2e_ms", "end to end", "#000000"))


def stage_breakdown(case: dict[str, Any]) -> dict[str, float]:
    """Median milliseconds per stage of one case; decode = e2e minus everything before it."""
    stages = {name: case["stages_ms"][name]["median"] for name, _ in SEGMENTS[:-1]}
    stages["decode"] = max(case["e2e_ms"]["median"] - case["ttft_ms"]["median"], 0.0)
    return stages


def save_chart(report: dict[str, Any], path: Path) -> Path:
    try:
        import matplotlib  # noqa: F401 - optional
    except ImportError:
        return _save_with_pillow(report, path)
    return _save_with_matplotlib(report, path)


def _save_with_matplotlib(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    cases = report["cases"]
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(11, 4.5))
    bottoms = [0.0] * len(cases)
    labels = [c["label"] for c in cases]
    for name, colour in SEGMENTS:
        heights = [stage_breakdown(c)[name] for c in cases]
        bars.bar(labels, heights, bottom=bottoms, color=colour, label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    bars.set_ylabel("ms (median)")
    bars.set_title("Stage breakdown per request")
    bars.legend(fontsize="small")
    ordered = sorted(cases, key=lambda c: c["tiles"])
    for key, label, colour in LINES:
        tiles = [c["tiles"] for c in ordered]
        lines.plot(tiles, [c[key]["median"] for c in ordered], "o-", color=colour, label=label)
    lines.set_xlabel("tiles")
    lines.set_ylabel("ms (median)")
    lines.set_title("Latency vs tile count")
    lines.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- Pillow fallback -------------------------------------------------------------------------
WIDTH, HEIGHT, MARGIN = 1100, 460, 60


def _save_with_pillow(report: dict[str, Any], path: Path) -> Path:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    half = WIDTH // 2
    _draw_stage_bars(draw, font, report["cases"], (MARGIN, 40, half - 20, HEIGHT - MARGIN))
    _draw_latency_lines(
        draw, font, report["cases"], (half + MARGIN, 40, WIDTH - 20, HEIGHT - MARGIN)
    )
    image.save(path)
    return path


Box = tuple[int, int, int, int]  # left, top, right, bottom


def _axes(draw: ImageDraw.ImageDraw, font: Any, box: Box, title: str, top: float) -> None:
    left, upper, right, bottom = box
    draw.text((left, upper - 30), title, fill="black", font=font)
    draw.line([(left, upper), (left, bottom), (right, bottom)], fill="black")
    for fraction in (0.0, 0.5, 1.0):
        y = bottom - fraction * (bottom - upper)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text(
            (4, y - 6) if left < WIDTH // 2 else (left - 56, y - 6),
            f"{top * fraction:.0f}",
            fill="black",
            font=font,
        )
    draw.text(
        (left - 40 if left < WIDTH // 2 else left - 56, upper - 14), "ms", fill="black", font=font
    )


def _draw_stage_bars(
    draw: ImageDraw.ImageDraw, font: Any, cases: list[dict[str, Any]], box: Box
) -> None:
    left, upper, right, bottom = box
    totals = [sum(stage_breakdown(c).values()) for c in cases]
    top = max(totals, default=1.0) or 1.0
    _axes(draw, font, box, "Stage breakdown per request (median ms)", top)
    slot = (right - left) / max(len(cases), 1)
    for index, case in enumerate(cases):
        x0 = left + index * slot + slot * 0.2
        x1 = left + (index + 1) * slot - slot * 0.2
        y = float(bottom)
        for name, colour in SEGMENTS:
            height = stage_breakdown(case)[name] / top * (bottom - upper)
            draw.rectangle([x0, y - height, x1, y], fill=colour)
            y -= height
        draw.text((x0, bottom + 6), case["label"], fill="black", font=font)
    for index, (name, colour) in enumerate(SEGMENTS):  # legend
        x = left + 10 + index * 80
        draw.rectangle([x, bottom + 26, x + 10, bottom + 36], fill=colour)
        draw.text((x + 14, bottom + 25), name, fill="black", font=font)


def _draw_latency_lines(
    draw: ImageDraw.ImageDraw, font: Any, cases: list[dict[str, Any]], box: Box
) -> None:
    left, upper, right, bottom = box
    ordered = sorted(cases, key=lambda c: c["tiles"])
    top = max((c["e2e_ms"]["median"] for c in ordered), default=1.0) or 1.0
    _axes(draw, font, box, "Latency vs tile count (median ms)", top)
    max_tiles = max((c["tiles"] for c in ordered), default=1)

    def point(case: dict[str, Any], key: str) -> tuple[float, float]:
        x = left + (case["tiles"] / max_tiles) * (right - left - 10)
        return x, bottom - case[key]["median"] / top * (bottom - upper)

    for case in ordered:
        x, _ = point(case, "e2e_ms")
        draw.text((x - 3, bottom + 6), str(case["tiles"]), fill="black", font=font)
    for index, (key, label, colour) in enumerate(LINES):
        points = [point(c, key) for c in ordered]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        x = left + 10 + index * 110
        draw.line([(x, bottom + 31), (x + 16, bottom + 31)], fill=colour, width=2)
        draw.text((x + 20, bottom + 25), label, fill=colour, font=font)
    draw.text((right - 30, bottom + 25), "tiles", fill="black", font=font)
