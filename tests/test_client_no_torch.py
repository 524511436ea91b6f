"""The SDK and CLI work where torch cannot be imported (what `pip install reformer-client` alone gives)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from server_fixtures import ROOT, ServerProcess, server, subprocess_env, tiny_model_dir  # noqa: F401

# A None entry in sys.modules makes `import torch` raise ImportError, as if torch were not installed.
BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['reformer_infer'] = None\n"


def run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code), *args],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)


def test_torch_is_really_blocked_in_the_probe() -> None:
    r = run_without_torch("import torch")
    assert r.returncode != 0 and "import of torch halted" in r.stderr


def test_sdk_imports_and_generates_without_torch(server: ServerProcess) -> None:  # noqa: F811
    r = run_without_torch(
        """
        import json, sys
        import reformer_client
        from reformer_client import AsyncClient, Client
        with Client(sys.argv[1]) as c:
            result = c.generate("Hi", max_new_tokens=4, ignore_eos=True)
            chunks = [e.text for e in c.generate_stream("Hi", max_new_tokens=4, ignore_eos=True)]
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "reformer_infer", "reformer_server"))
        print(json.dumps({"generated": result.usage.generated_tokens, "chunks": len(chunks), "loaded": loaded}))
        """,
        server.target,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["generated"] == 4 and out["chunks"] >= 2
    assert out["loaded"] in ([], ["reformer_infer", "torch"])  # only our None placeholders, nothing imported


def test_cli_runs_without_torch(server: ServerProcess) -> None:  # noqa: F811
    r = run_without_torch("import runpy; runpy.run_module('reformer_client', run_name='__main__')",
                          "--target", server.target, "health")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "SERVING"


def test_client_package_declares_no_torch_dependency() -> None:
    text = (ROOT / "clients" / "python" / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "torch" not in deps and "grpcio" in deps and "protobuf" in deps
    assert not any(p.suffix == ".py" and "import torch" in p.read_text()
                   for p in Path(ROOT / "clients" / "python" / "reformer_client").rglob("*.py"))
