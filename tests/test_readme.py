"""The README's code runs as written: every ```python block, in order, in one namespace (a fresh working
directory), and every `istr ...` command line of its ```bash blocks parses (flags and values) with the CLI's parser."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    import torch

    blocks = _blocks("python")
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    previous = torch.get_num_threads()
    namespace: dict = {"__name__": "__readme__"}
    try:
        for i, code in enumerate(blocks):
            try:
                exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
            except Exception as exc:  # name the block, keep the traceback
                raise AssertionError(f"README python block {i + 1} failed: {type(exc).__name__}: {exc}\n{code}") from exc
    finally:
        torch.set_num_threads(previous)


def test_cli_lines_parse(monkeypatch):
    from istr.cli import build_parser

    lines = []
    for block in _blocks("bash"):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("istr ") or " -m istr " in line:
                lines.append(line[line.index("istr "):] if line.startswith("istr ") else line.split(" -m ", 1)[1])
    assert len(lines) >= 4
    parser = build_parser()
    for line in lines:
        argv = [a for a in shlex.split(line)[1:] if a != "..."]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"README command does not parse (exit {exc.code}): {line}")
