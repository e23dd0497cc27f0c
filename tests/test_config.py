"""Settings: one declaration per option; file < environment < command line; clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from server.config import Settings, env_name, flag, load_settings

FIELDS = [f for f in dataclasses.fields(Settings) if f.name != "config"]

# A valid non-default value per option, as TOML text and as command-line/environment text.
SAMPLES = {
    "model": ('"/models/x"', "/models/x", "/models/x"),
    "host": ('"0.0.0.0"', "0.0.0.0", "0.0.0.0"),
    "port": ("9001", "9001", 9001),
    "max_num_seqs": ("8", "8", 8),
    "max_model_len": ("1024", "1024", 1024),
    "cache_tokens": ("65536", "65536", 65536),
    "cache_memory_fraction": ("0.25", "0.25", 0.25),
    "prefill_chunk_size": ("128", "128", 128),
    "max_num_batched_tokens": ("4096", "4096", 4096),
    "request_timeout": ("30.5", "30.5", 30.5),
    "log_level": ('"debug"', "debug", "debug"),
    "log_file": ('"/tmp/s.log"', "/tmp/s.log", "/tmp/s.log"),
    "api_key": ('"sk-local"', "sk-local", "sk-local"),
    "served_model_name": ('"mistral-small-4"', "mistral-small-4", "mistral-small-4"),
    "max_waiting_requests": ("16", "16", 16),
    "default_max_tokens": ("512", "512", 512),
    "max_request_bytes": ("1048576", "1048576", 1048576),
    "allowed_hosts": ('"mac.local,studio.lan"', "mac.local,studio.lan", "mac.local,studio.lan"),
    "header_timeout": ("2.5", "2.5", 2.5),
    "cors_origins": ('"http://localhost:3000"', "http://localhost:3000", "http://localhost:3000"),
    "max_n": ("4", "4", 4),
    "rank_timeout": ("30.0", "30.0", 30.0),
    "decode_backend": ('"reference"', "reference", "reference"),
    "moe_by_expert": ('"off"', "off", "off"),
    "prefill_buckets": ('"on"', "on", "on"),
    "async_scheduling": ('"off"', "off", "off"),
    "cache_tokens_per_seq": ("4096", "4096", 4096),
    "warmup": ('"on"', "on", "on"),
    "warmup_workers": ("3", "3", 3),
    "latent_cache": ('"bf16"', "bf16", "bf16"),
    "max_prefill_tokens_per_step": ("256", "256", 256),
    "target_step_ms": ("30.0", "30.0", 30.0),
    "disk_cache_dir": ('"/var/cache/mla"', "/var/cache/mla", "/var/cache/mla"),
    "disk_cache_bytes": ("1073741824", "1073741824", 1073741824),
    "speculative": ('"ngram"', "ngram", "ngram"),
    "num_speculative_tokens": ("5", "5", 5),
    "speculative_max_batch": ("8", "8", 8),
}


def write_toml(tmp_path, text: str) -> str:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return str(path)


def test_every_option_has_a_sample():
    assert set(SAMPLES) == {f.name for f in FIELDS}


def test_defaults_when_nothing_is_given():
    settings, sources = load_settings([], {})
    assert settings == Settings()
    assert settings.host == "127.0.0.1" and settings.port == 8080 and settings.model is None
    assert set(sources.values()) == {"default"}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_each_source_sets_each_option(tmp_path, name):
    toml, text, value = SAMPLES[name]
    config = write_toml(tmp_path, f"{name} = {toml}\n")
    for argv, env, source in [
        (["--config", config], {}, "file"),
        ([], {env_name(name): text}, "env"),
        ([flag(name), text], {}, "cli"),
    ]:
        settings, sources = load_settings(argv, env)
        assert getattr(settings, name) == value, source
        assert sources[name] == source


def test_precedence_file_then_env_then_cli(tmp_path):
    config = write_toml(tmp_path, 'port = 9001\nhost = "0.0.0.0"\nmax_num_seqs = 8\n')
    env = {"MLA_SERVER_PORT": "9002", "MLA_SERVER_HOST": "10.0.0.1"}
    settings, sources = load_settings(["--config", config, "--port", "9003"], env)
    assert (settings.port, sources["port"]) == (9003, "cli")
    assert (settings.host, sources["host"]) == ("10.0.0.1", "env")
    assert (settings.max_num_seqs, sources["max_num_seqs"]) == (8, "file")
    assert (settings.prefill_chunk_size, sources["prefill_chunk_size"]) == (None, "default")
    assert sources["config"] == "cli"


def test_config_path_from_the_environment(tmp_path):
    config = write_toml(tmp_path, "max_num_seqs = 4\n")
    settings, sources = load_settings([], {"MLA_SERVER_CONFIG": config})
    assert settings.max_num_seqs == 4 and sources["max_num_seqs"] == "file"


def test_empty_value_unsets_an_optional_option(tmp_path):
    config = write_toml(tmp_path, 'model = "/models/x"\n')
    settings, sources = load_settings(["--config", config], {"MLA_SERVER_MODEL": ""})
    assert settings.model is None and sources["model"] == "env"


def test_toml_integer_is_accepted_for_a_float_option(tmp_path):
    settings, _ = load_settings(["--config", write_toml(tmp_path, "cache_memory_fraction = 1\n")], {})
    assert settings.cache_memory_fraction == 1.0


def test_unrelated_variables_with_the_prefix_are_ignored():
    # MLA_SERVER_CACHE_DIR belongs to the demo model's cache, not to Settings.
    settings, _ = load_settings([], {"MLA_SERVER_CACHE_DIR": "/tmp/x", "PORT": "1"})
    assert settings == Settings()


def run_failing(capsys, argv, env) -> str:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(argv, env)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_unknown_key_in_the_file(tmp_path, capsys):
    err = run_failing(capsys, ["--config", write_toml(tmp_path, "prot = 8080\n")], {})
    assert "unknown key 'prot'" in err and "port" in err


def test_config_key_inside_the_file(tmp_path, capsys):
    err = run_failing(capsys, ["--config", write_toml(tmp_path, 'config = "other.toml"\n')], {})
    assert "unknown key 'config'" in err


def test_bad_type_in_the_environment(capsys):
    err = run_failing(capsys, [], {"MLA_SERVER_PORT": "eighty"})
    assert "MLA_SERVER_PORT='eighty' is not a valid int" in err


def test_bad_type_in_the_file(tmp_path, capsys):
    err = run_failing(capsys, ["--config", write_toml(tmp_path, 'max_num_seqs = "8"\n')], {})
    assert "max_num_seqs" in err and "not a valid int" in err


def test_invalid_toml(tmp_path, capsys):
    err = run_failing(capsys, ["--config", write_toml(tmp_path, "port = \n")], {})
    assert "server.toml" in err


def test_missing_config_file(tmp_path, capsys):
    err = run_failing(capsys, ["--config", str(tmp_path / "nope.toml")], {})
    assert "nope.toml does not exist" in err


@pytest.mark.parametrize(
    "env", [{"MLA_SERVER_PORT": "70000"}, {"MLA_SERVER_MAX_NUM_SEQS": "0"}, {"MLA_SERVER_LOG_LEVEL": "loud"}]
)
def test_out_of_range_values(capsys, env):
    (name,) = env
    err = run_failing(capsys, [], env)
    assert f"from {name}" in err


def test_bad_type_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_settings(["--port", "x"], {})
    assert exit_info.value.code == 2
    assert "invalid int value: 'x'" in capsys.readouterr().err


def test_print_config_shows_values_and_sources(tmp_path, capsys):
    config = write_toml(tmp_path, "max_num_seqs = 8\n")
    env = {"MLA_SERVER_PORT": "9002", "MLA_SERVER_API_KEY": "sk-secret"}
    with pytest.raises(SystemExit) as exit_info:
        load_settings(["--config", config, "--host", "0.0.0.0", "--print-config"], env)
    assert exit_info.value.code == 0
    lines = {line.split(" =")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == {f.name for f in dataclasses.fields(Settings)}
    assert lines["host"].startswith('host = "0.0.0.0"') and lines["host"].endswith("# cli")
    assert lines["port"].startswith("port = 9002") and lines["port"].endswith("# env")
    assert lines["max_num_seqs"].startswith("max_num_seqs = 8") and lines["max_num_seqs"].endswith("# file")
    assert lines["model"].startswith("model = (unset)") and lines["model"].endswith("# default")
    assert "sk-secret" not in lines["api_key"] and lines["api_key"].endswith("# env")
