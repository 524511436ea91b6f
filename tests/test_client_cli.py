"""The `reformer-client` command against the real server: streamed output, --json, inputs, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from reformer_client import Client
from server_fixtures import ServerProcess, free_port, server, subprocess_env, tiny_model_dir  # noqa: F401


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reformer_client", *args],
        input=stdin, capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )


def test_generate_streams_the_same_text_as_the_sdk(server: ServerProcess) -> None:  # noqa: F811
    r = cli("--target", server.target, "generate", "Hello there", "--max-new-tokens", "20", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    with Client(server.target) as c:
        expected = c.generate("Hello there", max_new_tokens=20, temperature=0.0).text
    assert r.stdout == expected  # not a TTY: no trailing newline is added
    assert r.stderr == ""


def test_generate_json_is_machine_readable(server: ServerProcess) -> None:  # noqa: F811
    r = cli("--target", server.target, "generate", "Hi", "--max-new-tokens", "6", "--seed", "7",
            "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--json", "--logprobs", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["usage"]["prompt_tokens"] == 2 and len(out["token_ids"]) == out["usage"]["generated_tokens"]
    assert out["finish_reason"] in ("length", "eos") and len(out["logprobs"]) == len(out["token_ids"])
    again = json.loads(cli("--target", server.target, "generate", "Hi", "--max-new-tokens", "6", "--seed", "7",
                           "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--json", "--no-stream").stdout)
    assert again["token_ids"] == out["token_ids"]  # same seed, same tokens, streamed or not


def test_prompt_from_stdin_and_file(server: ServerProcess, tmp_path: Path) -> None:  # noqa: F811
    prompt = "A long prompt. " * 30
    path = tmp_path / "prompt.txt"
    path.write_text(prompt)
    outs = []
    for args, stdin in ((["--stdin"], prompt), (["-"], prompt), (["--file", str(path)], None)):
        r = cli("--target", server.target, "generate", *args, "--max-new-tokens", "3", "--json", stdin=stdin)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout)["usage"]["prompt_tokens"])
    assert outs == [len(prompt)] * 3


def test_info_health_tokenize(server: ServerProcess) -> None:  # noqa: F811
    info = cli("--target", server.target, "info", "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["config"]["vocab_size"] == 258
    assert "context:      1024 tokens" in cli("--target", server.target, "info").stdout
    health = cli("--target", server.target, "health")
    assert health.returncode == 0 and health.stdout.strip() == "SERVING"
    tok = cli("--target", server.target, "tokenize", "ab", "--json")
    assert json.loads(tok.stdout) == {"token_ids": [99, 100]}


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["generate", "x", "--temperature", "-1"], 2, "INVALID_ARGUMENT: temperature:"),
        (["generate", "x" * 1000, "--max-new-tokens", "100"], 2, "INVALID_ARGUMENT: max_new_tokens:"),
        (["generate"], 2, "exactly one input"),
        (["generate", "x", "--stdin"], 2, "exactly one input"),
    ],
)
def test_failures_exit_non_zero_with_one_line(
    server: ServerProcess, args: list[str], code: int, needle: str  # noqa: F811
) -> None:
    r = cli("--target", server.target, *args, stdin="")
    assert r.returncode == code
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("reformer-client: error:")]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert r.stdout == ""


def test_unreachable_server_exits_3() -> None:
    r = cli("--target", f"127.0.0.1:{free_port()}", "--retries", "0", "health")
    assert r.returncode == 3
    assert r.stderr.startswith("reformer-client: error: UNAVAILABLE:") and r.stderr.count("\n") == 1


def test_generate_flushes_text_while_the_stream_is_running(server: ServerProcess) -> None:  # noqa: F811
    import os

    proc = subprocess.Popen(
        [sys.executable, "-m", "reformer_client", "--target", server.target, "generate", "Hi",
         "--max-new-tokens", "900", "--ignore-eos"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(),
    )
    try:
        first = os.read(proc.stdout.fileno(), 1)  # blocks until the CLI has flushed something
        assert first and proc.poll() is None  # text arrived while generation was still going on
    finally:
        proc.kill()
        proc.wait()
    assert server.wait_metric("reformer_cache_bytes_in_use", 0.0) == 0.0  # the killed client's request is freed
