"""The `mla-server` command (also `python -m server`): settings from every source, then serve."""

from __future__ import annotations

from collections.abc import Sequence

from server.config import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 after a clean stop, 1 when the server cannot start, 2 for bad settings."""
    settings, _ = load_settings(argv)
    # Imported here so that --help and --print-config answer without loading MLX and the web stack.
    from server.serve import serve

    return serve(settings)
