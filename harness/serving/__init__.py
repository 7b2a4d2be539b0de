"""Served engines: an OpenAI-compatible HTTP client (``client``), what a server says about itself
(``server_info``) and a small reference server over a Hugging Face model (``reference_server``,
the ``serve`` extra). The endpoint backend is ``harness.models.endpoint``; the serving benchmark
is ``harness.perf.serving``."""
