"""Every server option, gathered in `Settings`: the engine's, declared in `EngineArgs`, and the
server's own, declared here.

The command-line flags (`--max-num-seqs`), the TOML file keys (`max_num_seqs`) and the environment
variables (`MLA_SERVER_MAX_NUM_SEQS`) are all derived from the dataclass fields, so an option added
to either declaration exists everywhere at once. Precedence: default < file < environment < command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from server.engine.args import EngineArgs
from server.options import POSITIVE, is_option, one_of, option

ENV_PREFIX = "MLA_SERVER_"
PROG = "mla-server"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
SECRET_OPTIONS = frozenset({"api_key"})
# The engine's options, declared in `EngineArgs`.
ENGINE_OPTIONS = [f for f in dataclasses.fields(EngineArgs) if is_option(f)]

T = TypeVar("T")


def _engine_options_first(cls: type[T]) -> type[T]:
    """`cls` with every engine option as a field ahead of its own, with the same default, help and
    rule, so that the flags, file keys and variables derived from the fields cover both. (Typed
    code reads the engine's options through `Settings.engine_args()`: mypy sees only these here.)"""
    cls.__annotations__ = {**{f.name: f.type for f in ENGINE_OPTIONS}, **cls.__annotations__}
    for f in ENGINE_OPTIONS:
        setattr(cls, f.name, dataclasses.field(default=f.default, metadata=f.metadata))
    return cls


@dataclass
@_engine_options_first
class Settings:
    """Every option of the server: the engine's (`EngineArgs`), then the server's own; each field's
    metadata holds its help text and validity rule."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 serves the whole network)")
    port: int = option(8080, "TCP port to listen on", lambda v: 0 <= v <= 65535, "must be in 0..65535")
    log_level: str = option("info", "one of " + ", ".join(LOG_LEVELS), **one_of(*LOG_LEVELS))
    log_file: str | None = option(
        None, "append the log to this file, reopened after log rotation moves it (unset: stderr)"
    )
    max_request_bytes: int | None = option(
        None, "largest request body in bytes (unset: 1 MiB + 64 bytes per token of context)", **POSITIVE
    )
    allowed_hosts: str | None = option(
        None,
        "comma-separated Host names the server answers besides the loopback names it answers when bound "
        "to loopback (unset: loopback names only when bound to loopback, any host otherwise)",
    )
    cors_origins: str | None = option(
        None, "comma-separated origins allowed to call the API from a browser, * for any (unset: CORS off)"
    )
    max_n: int = option(16, "most choices one request may ask for (n, times the prompts of a completion)", **POSITIVE)
    header_timeout: float = option(
        10.0, "seconds a connection may take to send a complete request head before it is closed", **POSITIVE
    )
    api_key: str | None = option(None, "require 'Authorization: Bearer <key>' (unset: no authentication)")
    config: str | None = option(None, "TOML file holding any of these options, keys spelled with underscores")

    def engine_args(self) -> EngineArgs:
        """The engine's share of the settings."""
        return EngineArgs(**{f.name: getattr(self, f.name) for f in ENGINE_OPTIONS})


class ConfigError(Exception):
    """A setting that cannot be used; the message names the option and its source."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def load_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> tuple[Settings, dict[str, str]]:
    """Settings from defaults, the TOML file, the environment and `argv`, in rising precedence.

    Returns the settings and, per option name, where its value came from: "default", "file",
    "env" or "cli". Exits 0 after printing with --print-config; exits 2 with one line on stderr
    for a bad value, an unknown file key or a missing file.
    """
    env = os.environ if env is None else env
    parser = build_parser()
    cli = vars(parser.parse_args(argv))
    print_config = cli.pop("print_config")
    try:
        values, sources = _merge(cli, env)
        settings = Settings(**values)
        _check(settings, sources)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if print_config:
        print(format_settings(settings, sources), end="")
        raise SystemExit(0)
    return settings, sources


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="OpenAI-compatible server for Multi-head Latent Attention models on MLX.",
        epilog=f"Every option can also be set in the --config file or as {ENV_PREFIX}<NAME> in the "
        "environment; precedence: file < environment < command line. An empty value unsets an "
        "option whose default is unset.",
    )
    for f in dataclasses.fields(Settings):
        kind, _ = _kind(f)
        shown = "unset" if f.default is None else f.default
        parser.add_argument(
            flag(f.name),
            dest=f.name,
            default=argparse.SUPPRESS,
            type=_cli_parser(f),
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} [default: {shown}; env {env_name(f.name)}]",
        )
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective settings and their sources, then exit"
    )
    return parser


def format_settings(settings: Settings, sources: Mapping[str, str]) -> str:
    """One `name = value  # source` line per option; secrets are masked."""
    rows = []
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if value is None:
            shown = "(unset)"
        elif f.name in SECRET_OPTIONS:
            shown = '"***"'
        else:
            shown = json.dumps(value)
        rows.append((f"{f.name} = {shown}", sources[f.name]))
    width = max(len(left) for left, _ in rows)
    return "".join(f"{left.ljust(width)}  # {source}\n" for left, source in rows)


def _merge(cli: dict[str, Any], env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values = {name: f.default for name, f in fields.items()}
    sources = dict.fromkeys(fields, "default")
    from_env = {
        name: _parse_text(f, env[env_name(name)], env_name(name)) for name, f in fields.items() if env_name(name) in env
    }
    path = cli.get("config", from_env.get("config"))
    layers = [("file", _read_file(path, fields) if path else {}), ("env", from_env), ("cli", cli)]
    for source, layer in layers:
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    return values, sources


def _read_file(path: str, fields: dict[str, dataclasses.Field[Any]]) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path}: {e}") from None
    values = {}
    for key, value in data.items():
        if key not in fields or key == "config":
            known = ", ".join(n for n in fields if n != "config")
            raise ConfigError(f"config file {path}: unknown key {key!r} (known keys: {known})")
        values[key] = _parse_toml(fields[key], value, f"config file {path}: {key}")
    return values


def _kind(f: dataclasses.Field[Any]) -> tuple[type, bool]:
    """The option's value type and whether it may be unset (None)."""
    hint = typing.get_type_hints(Settings)[f.name]
    if isinstance(hint, types.UnionType):
        (base,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return base, True
    return hint, False


def _parse_text(f: dataclasses.Field[Any], text: str, where: str) -> Any:
    kind, optional = _kind(f)
    if optional and text == "":
        return None
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{where}={text!r} is not a valid {kind.__name__}") from None


def _parse_toml(f: dataclasses.Field[Any], value: Any, where: str) -> Any:
    kind, _ = _kind(f)
    # TOML writes 8080 as int where a float is expected; bool is an int subclass but never a number here.
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if not ok or isinstance(value, bool):
        raise ConfigError(f"{where} = {value!r} is not a valid {kind.__name__}")
    return kind(value)


def _cli_parser(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return _parse_text(f, text, flag(f.name))
        except ConfigError:
            raise argparse.ArgumentTypeError(f"invalid {_kind(f)[0].__name__} value: {text!r}") from None

    return parse


def _check(settings: Settings, sources: Mapping[str, str]) -> None:
    for f in dataclasses.fields(Settings):
        value, check = getattr(settings, f.name), f.metadata["check"]
        if value is not None and check is not None and not check(value):
            where = {"default": "default", "file": "config file", "env": env_name(f.name), "cli": flag(f.name)}
            raise ConfigError(f"{f.name} = {value!r} (from {where[sources[f.name]]}) {f.metadata['rule']}")
