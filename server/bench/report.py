"""Rewrite one named section of docs/benchmarks.md, leaving the others alone.

Several benchmark scripts (kernel, engine, serving) share the file; each owns the text between
`<!-- section:NAME -->` and `<!-- /section:NAME -->`, so reruns replace only their own numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

TITLE = "# Benchmarks\n"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- section:{name} -->", f"<!-- /section:{name} -->"


def update_section(path: str | Path, name: str, markdown: str) -> None:
    """Replace section `name` of the markdown file at `path` with `markdown`.

    Creates the file (with a `# Benchmarks` title) and appends the section when either is missing.
    """
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"section name must be a plain word, got {name!r}")
    path = Path(path)
    start, end = _markers(name)
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else TITLE
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
