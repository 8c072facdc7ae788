"""Run in a vLLM venv by tests/test_vllm_engine.py: greedy tokens through the vLLM hand-off.

    python tests/helpers/vllm_generate.py BUNDLE TP REQUESTS.json  ->  "RESULT {json}" on stdout

REQUESTS.json is a list of {"prompt", "image", "max_tiles"}. Prints, per request, the token ids
of a streamed single request and of the same requests served concurrently, plus tiles per image.
vLLM's engine runs in spawned processes, hence the __main__ guard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nvlm_export.handoff.vllm_engine import Request, VLLMPipeline

NEW_TOKENS = 24
RESULT = "RESULT "  # marks the answer line among vLLM's own output

if __name__ == "__main__":
    bundle, tensor_parallel_size, requests_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    wanted = json.loads(Path(requests_file).read_text())
    engine = VLLMPipeline.load(
        bundle,
        tensor_parallel_size=tensor_parallel_size,
        cpu_kv_cache_gib=1,
        engine_options={"enforce_eager": True},  # no compilation: the test wants tokens only
    )
    requests = [Request(r["prompt"], (r["image"],), max_tiles=r["max_tiles"]) for r in wanted]
    single, tiles = [], []
    for request in requests:
        stream = engine.generate(
            request.prompt,
            request.images,
            max_tiles=request.max_tiles,
            max_new_tokens=NEW_TOKENS,
            ignore_eos=True,
        )
        text = "".join(event.text for event in stream)
        assert stream.result is not None and text == stream.result.text
        single.append(list(stream.result.token_ids))
        tiles.append([t.num_tiles for t in stream.prepared.tilings])
    together = engine.generate_concurrent(requests, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    concurrent = [list(result.token_ids) for result in together.results]
    result = {"single": single, "concurrent": concurrent, "tiles": tiles}
    print(RESULT + json.dumps(result), flush=True)
