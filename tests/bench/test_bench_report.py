import os

from server.bench.report import update_section


def test_creates_file_with_title_and_section(tmp_path):
    path = tmp_path / "docs" / "benchmarks.md"
    update_section(path, "kernel", "| a | b |")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "<!-- section:kernel -->\n| a | b |\n<!-- /section:kernel -->" in text


def test_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "benchmarks.md"
    update_section(path, "kernel", "old kernel")
    update_section(path, "serving", "old serving")
    update_section(path, "kernel", "new kernel")
    text = path.read_text()
    assert "old kernel" not in text and "new kernel" in text
    assert "old serving" in text
    assert text.count("<!-- section:kernel -->") == 1
    assert text.index("new kernel") < text.index("old serving")


def test_keeps_text_outside_sections(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nIntro by hand.\n")
    update_section(path, "engine", "numbers")
    update_section(path, "engine", "more numbers")
    text = path.read_text()
    assert "Intro by hand." in text and "more numbers" in text and "\nnumbers" not in text


def test_read_section(tmp_path):
    from server.bench.report import read_section

    path = tmp_path / "benchmarks.md"
    assert read_section(path, "kernel") is None
    update_section(path, "kernel", "line one\nline two")
    update_section(path, "engine", "other")
    assert read_section(path, "kernel") == "line one\nline two"
    assert read_section(path, "serving") is None


def test_device_date_and_command_line(monkeypatch):
    from support.platforms import pretend

    from server.bench.report import command_line, device_name, provenance

    pretend(monkeypatch, "cuda", "NVIDIA H100 80GB HBM3")
    assert device_name() == "NVIDIA H100 80GB HBM3 (MLX CUDA)"
    pretend(monkeypatch, "metal", "Apple M2 Max")
    assert device_name() == "Apple M2 Max (MLX Metal)"
    pretend(monkeypatch, "cpu", "AMD EPYC")
    name = device_name()
    assert name.startswith("CPU ") and name.endswith(f", {os.cpu_count()} cores (MLX CPU)")
    assert (
        command_line("engine", ["--model", "/a b", "--write"]) == "python -m server.bench engine --model '/a b' --write"
    )
    assert provenance("2026-01-01 00:00 UTC", name, "python -m server.bench engine") == (
        f"2026-01-01 00:00 UTC, {name}. Command: `python -m server.bench engine`"
    )
