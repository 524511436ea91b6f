"""The SDK and CLI examples in docs/serving.md run as written (against a real server on the tiny model)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from server_fixtures import ROOT, ServerProcess, server, subprocess_env, tiny_model_dir  # noqa: F401

DOC = ROOT / "docs" / "serving.md"
DEFAULT_TARGET = "127.0.0.1:50051"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


PYTHON_EXAMPLES = _blocks("python")
CLI_EXAMPLES = [
    line.split("  #")[0].strip()
    for block in _blocks("sh")
    for line in block.splitlines()
    if "reformer-client" in line and "myhost" not in line
]


def test_the_doc_has_examples_to_check() -> None:
    assert len(PYTHON_EXAMPLES) >= 4 and len(CLI_EXAMPLES) >= 5


@pytest.mark.parametrize("code", PYTHON_EXAMPLES, ids=[f"python-{i}" for i in range(len(PYTHON_EXAMPLES))])
def test_python_example_runs(code: str, server: ServerProcess) -> None:  # noqa: F811
    assert DEFAULT_TARGET in code
    r = subprocess.run([sys.executable, "-c", code.replace(DEFAULT_TARGET, server.target)],
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout or "print(" not in code


@pytest.mark.parametrize("line", CLI_EXAMPLES, ids=[f"cli-{i}" for i in range(len(CLI_EXAMPLES))])
def test_cli_example_runs(line: str, server: ServerProcess, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "chapter1.txt").write_text("CHAPTER I.\n\nEmma Woodhouse, handsome, clever, and rich. " * 5)
    script = f'reformer-client() {{ "{sys.executable}" -m reformer_client "$@"; }}\nset -o pipefail\n{line}\n'
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env=subprocess_env({"REFORMER_TARGET": server.target}))
    assert r.returncode == 0, r.stderr
    assert r.stdout
