"""Every benchmark of this project, run as `python -m server.bench {serve,side-by-side,engine,kernel}`.

Only the fixtures benchmarks need live here too (`synthetic_model`, `kernel_cases`); nothing in
the runtime packages imports this one.
"""
