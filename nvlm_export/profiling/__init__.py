"""Latency, memory and power profiling of exported bundles (`nvlm-export profile`).

Stage timings come from the runtime pipeline itself; `cost` adds the analytic per-token cost,
`memory` this process's resident and GPU memory, `tegrastats` Jetson power and utilisation.
Nothing here imports torch or transformers; `onnx` is used when installed for exact weight counts.
"""
