"""How an option is declared: one dataclass field holding its default, its help text and its
validity rule.

`EngineArgs` (server/engine/args.py) declares the engine's options this way and `Settings`
(server/config.py) the server's own; config.py makes each declared field a command-line flag, a
TOML key and an environment variable, and checks its rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def option(default: Any, help: str, check: Callable[[Any], bool] | None = None, rule: str = "") -> Any:
    """A field that is an option: `check(value)` is False for a value `rule` (e.g. "must be > 0")
    refuses; unset (None) is never checked."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "rule": rule})


def is_option(f: dataclasses.Field[Any]) -> bool:
    """Whether a field was declared with `option` (an `EngineArgs` field may be internal)."""
    return "help" in f.metadata


def one_of(*values: str) -> dict[str, Any]:
    """The check and rule of an option that takes one of `values`."""
    return {"check": lambda v: v in values, "rule": "must be one of " + ", ".join(values)}


POSITIVE: dict[str, Any] = {"check": lambda v: v > 0, "rule": "must be > 0"}
NON_NEGATIVE: dict[str, Any] = {"check": lambda v: v >= 0, "rule": "must be >= 0"}
