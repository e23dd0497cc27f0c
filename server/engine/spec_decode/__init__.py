"""Speculative decoding inside the continuous batch (as vLLM's v1/spec_decode).

`drafter.py` is the interface a drafter implements, `ngram.py` the prompt-lookup drafter, and
`speculator.py` the policy: which running sequences draft in a step and how many tokens, what a
verified draft keeps, and the counters /health and /metrics report.
"""
