"""Throughput, latency and speed-quality measurement (``harness bench``).

``timing``: synchronisation, percentiles, peak memory, forward-pass counting; ``probe``: the
machine's matmul FLOP/s and memory bandwidth; ``throughput``: the measurement of one model
variant at one setting; ``vllm_ar``: the optional vLLM backend; ``command``: the CLI and the store.
"""
