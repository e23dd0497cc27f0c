"""Every server option, declared once in `Settings`.

The command-line flags (`--max-num-seqs`), the TOML file keys (`max_num_seqs`) and the environment
variables (`MLA_SERVER_MAX_NUM_SEQS`) are all derived from the dataclass fields, so an option added
here exists everywhere at once. Precedence: default < file < environment < command line.
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
from dataclasses import dataclass, field
from typing import Any

from server.engine.args import EngineArgs

ENV_PREFIX = "MLA_SERVER_"
PROG = "mla-server"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
SECRET_OPTIONS = frozenset({"api_key"})


def _option(default: Any, help: str, check: Callable[[Any], bool] | None = None, rule: str = "") -> Any:
    return field(default=default, metadata={"help": help, "check": check, "rule": rule})


_POSITIVE: dict[str, Any] = {"check": lambda v: v > 0, "rule": "must be > 0"}
# Engine options take their defaults from the engine's own declaration.
_ENGINE = EngineArgs()


@dataclass
class Settings:
    """Every option of the server; each field's metadata holds its help text and validity rule."""

    model: str | None = _option(
        None, "local directory or Hugging Face repo id of an MLA model (unset: the embedded demo model)"
    )
    host: str = _option("127.0.0.1", "address to listen on (0.0.0.0 serves the whole network)")
    port: int = _option(8080, "TCP port to listen on", lambda v: 0 <= v <= 65535, "must be in 0..65535")
    max_num_seqs: int | None = _option(
        _ENGINE.max_num_seqs,
        "most sequences decoded together in one batch (unset: 64 on a GPU, 16 on the CPU)",
        **_POSITIVE,
    )
    max_model_len: int | None = _option(
        _ENGINE.max_model_len, "longest prompt + completion in tokens (unset: the model's own limit)", **_POSITIVE
    )
    cache_tokens: int | None = _option(
        _ENGINE.cache_tokens, "latent cache capacity in tokens (unset: sized by --cache-memory-fraction)", **_POSITIVE
    )
    cache_memory_fraction: float = _option(
        _ENGINE.cache_memory_fraction,
        "share of device memory given to the latent cache when --cache-tokens is unset",
        lambda v: 0 < v <= 1,
        "must be in (0, 1]",
    )
    cache_tokens_per_seq: int = _option(
        _ENGINE.cache_tokens_per_seq,
        "tokens per running sequence the default cache is sized for (within --cache-memory-fraction)",
        **_POSITIVE,
    )
    warmup: str = _option(
        _ENGINE.warmup,
        "run the engine's step shapes once before serving: on, off, or auto (on a GPU only)",
        lambda v: v in ("auto", "on", "off"),
        "must be one of auto, on, off",
    )
    warmup_workers: int | None = _option(
        _ENGINE.warmup_workers,
        "processes compiling MLX's costliest kernels in parallel on an empty kernel cache (unset: CUDA up to 7, else 0)",
        lambda v: v >= 0,
        "must be >= 0",
    )
    latent_cache: str = _option(
        _ENGINE.latent_cache,
        "the latent cache: int4 (MLX 4-bit, 272 bytes/token/layer for Mistral Small 4) or bf16 (unquantized, 640)",
        lambda v: v in ("int4", "bf16"),
        "must be one of int4, bf16",
    )
    prefill_chunk_size: int | None = _option(
        _ENGINE.prefill_chunk_size,
        "prompt tokens prefilled per sequence per engine step (unset: 2048 on CUDA, 512 on Metal and the CPU)",
        **_POSITIVE,
    )
    max_prefill_tokens_per_step: int | None = _option(
        _ENGINE.max_prefill_tokens_per_step,
        "most prompt tokens prefilled in a step that also decodes (unset: up to --max-num-batched-tokens)",
        **_POSITIVE,
    )
    target_step_ms: float | None = _option(
        _ENGINE.target_step_ms,
        "while sequences decode, prefill only as much per step as keeps a step near this many ms (unset: off)",
        **_POSITIVE,
    )
    max_num_batched_tokens: int = _option(
        _ENGINE.max_num_batched_tokens, "most tokens (prefill + decode) processed in one engine step", **_POSITIVE
    )
    request_timeout: float = _option(
        _ENGINE.request_timeout, "seconds a request may run before it is ended", **_POSITIVE
    )
    log_level: str = _option(
        "info", "one of " + ", ".join(LOG_LEVELS), lambda v: v in LOG_LEVELS, "must be one of " + ", ".join(LOG_LEVELS)
    )
    log_file: str | None = _option(
        None, "append the log to this file, reopened after log rotation moves it (unset: stderr)"
    )
    max_waiting_requests: int | None = _option(
        _ENGINE.max_waiting_requests,
        "requests queued beyond the running ones before new ones get 429 (unset: 4 x --max-num-seqs)",
        lambda v: v >= 0,
        "must be >= 0",
    )
    decode_backend: str = _option(
        _ENGINE.decode_backend,
        "decode attention: auto (the fused kernel on Metal/CUDA, checked at load; cpu on the CPU), reference, cpu,"
        " metal or cuda",
        lambda v: v in ("auto", "reference", "cpu", "metal", "cuda"),
        "must be one of auto, reference, cpu, metal, cuda",
    )
    async_scheduling: str = _option(
        _ENGINE.async_scheduling,
        "build each engine step while the device still runs the previous one (host and device work overlap): on or off",
        lambda v: v in ("on", "off"),
        "must be one of on, off",
    )
    moe_by_expert: str = _option(
        _ENGINE.moe_by_expert,
        "run routed experts one expert at a time: auto (CUDA, batches giving each expert 3+ rows on average), on or off",
        lambda v: v in ("auto", "on", "off"),
        "must be one of auto, on, off",
    )
    prefill_buckets: str = _option(
        _ENGINE.prefill_buckets,
        "pad prefill attention to bucketed lengths, so CUDA builds a bounded set of cuDNN graphs: auto (CUDA, heads"
        " cuDNN takes), on or off",
        lambda v: v in ("auto", "on", "off"),
        "must be one of auto, on, off",
    )
    rank_timeout: float = _option(
        _ENGINE.rank_timeout,
        "tensor parallel: seconds rank 0 waits for the other ranks in one step before it stops the set",
        **_POSITIVE,
    )
    default_max_tokens: int = _option(
        _ENGINE.default_max_tokens, "completion tokens of a request that sets no max_tokens", **_POSITIVE
    )
    max_request_bytes: int | None = _option(
        None, "largest request body in bytes (unset: 1 MiB + 64 bytes per token of context)", **_POSITIVE
    )
    allowed_hosts: str | None = _option(
        None,
        "comma-separated Host names the server answers besides the loopback names it answers when bound "
        "to loopback (unset: loopback names only when bound to loopback, any host otherwise)",
    )
    cors_origins: str | None = _option(
        None, "comma-separated origins allowed to call the API from a browser, * for any (unset: CORS off)"
    )
    max_n: int = _option(16, "most choices one request may ask for (n, times the prompts of a completion)", **_POSITIVE)
    header_timeout: float = _option(
        10.0, "seconds a connection may take to send a complete request head before it is closed", **_POSITIVE
    )
    api_key: str | None = _option(None, "require 'Authorization: Bearer <key>' (unset: no authentication)")
    served_model_name: str | None = _option(None, "model name clients send and see (unset: derived from --model)")
    config: str | None = _option(None, "TOML file holding any of these options, keys spelled with underscores")

    def engine_args(self) -> EngineArgs:
        """The engine's share of the settings."""
        names = {f.name for f in dataclasses.fields(EngineArgs)} & {f.name for f in dataclasses.fields(self)}
        return EngineArgs(**{name: getattr(self, name) for name in names})


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
