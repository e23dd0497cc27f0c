"""Load generator and serving benchmarks: `python -m server.bench` drives any OpenAI-compatible server."""
