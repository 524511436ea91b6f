"""Contexts through the SDK and the CLI against the real server: create (with progress, cancellable), generate
on a context (sync, async, streamed, by object or id), list, delete, expiry, the memory cap, and the errors
each maps to."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from reformer_client import (
    NO_RETRY,
    AsyncClient,
    Client,
    Context,
    FailedPreconditionError,
    Finished,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PrefillProgress,
    RetryPolicy,
    TextChunk,
    UnavailableError,
)
from server_fixtures import (  # noqa: F401
    ServerProcess,
    free_port,
    prompt_text,
    server,
    start_server,
    subprocess_env,
    tiny_model_dir,
)

DOC = prompt_text(300)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:  # noqa: F811
    with Client(server.target) as c:
        yield c


@pytest.fixture(autouse=True)
def _no_contexts_left(server: ServerProcess) -> Iterator[None]:  # noqa: F811
    """Every test deletes what it creates: afterwards no context is live and every cache byte is free."""
    yield
    with Client(server.target) as c:
        assert c.list_contexts() == []
    assert server.wait_metric("reformer_contexts", 0.0) == 0.0
    assert server.wait_metric("reformer_cache_bytes_in_use", 0.0) == 0.0


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reformer_client", *args], input=stdin, capture_output=True,
                          text=True, env=subprocess_env(), timeout=120)


# ---- SDK -------------------------------------------------------------------------------------------------
def test_a_context_continues_like_its_prompt_and_counts_cached_tokens(client: Client) -> None:
    alone = client.generate(DOC, max_new_tokens=12, temperature=0.0, ignore_eos=True)  # no context live yet
    assert alone.usage.cached_tokens == 0
    ctx = client.create_context(DOC)
    try:
        assert isinstance(ctx, Context) and ctx.context_id
        assert ctx.prompt_tokens == len(DOC) and ctx.cache_bytes > 0 and ctx.ttl_seconds > 0
        # An empty prompt on a context is prefill(context) + decode: what the same text gives as a prompt.
        on_ctx = client.generate(context=ctx, max_new_tokens=12, temperature=0.0, ignore_eos=True)
        assert on_ctx.token_ids == alone.token_ids and on_ctx.text == alone.text
        assert on_ctx.usage.prompt_tokens == len(DOC) and on_ctx.usage.cached_tokens == len(DOC)
        # Automatic prefix caching: the same text as a plain prompt now continues the live context.
        again = client.generate(DOC, max_new_tokens=12, temperature=0.0, ignore_eos=True)
        assert again.usage.cached_tokens == len(DOC) and again.token_ids == alone.token_ids
        # A prompt after the context: its id works as well as the object, streamed or not.
        by_obj = client.generate(" Emma", context=ctx, max_new_tokens=12, temperature=0.0, ignore_eos=True)
        by_id = client.generate(" Emma", context=ctx.context_id, max_new_tokens=12, temperature=0.0,
                                ignore_eos=True)
        with client.generate_stream(" Emma", context=ctx, max_new_tokens=12, temperature=0.0,
                                    ignore_eos=True) as stream:
            streamed = stream.collect()
        assert by_obj.token_ids == by_id.token_ids == streamed.token_ids
        assert by_obj.usage.prompt_tokens == len(DOC) + 5 and by_obj.usage.cached_tokens == len(DOC)
        assert by_obj.peak_cache_bytes < ctx.cache_bytes  # the fork owns its own pages only
        # Token ids name the same context as text does (byte-level tokenizer).
        ids = client.tokenize(" Emma")
        assert client.generate(ids, context=ctx, max_new_tokens=12, temperature=0.0,
                               ignore_eos=True).token_ids == by_obj.token_ids
    finally:
        assert client.delete_context(ctx) == 0


def test_a_token_id_context_equals_the_text_one(client: Client) -> None:
    by_text = client.create_context(DOC)
    by_ids = client.create_context(client.tokenize(DOC))
    try:
        assert by_ids.prompt_tokens == by_text.prompt_tokens
        a, b = (client.generate(" x", context=c, max_new_tokens=8, temperature=0.0, ignore_eos=True)
                for c in (by_text, by_ids))
        assert a.token_ids == b.token_ids
    finally:
        client.delete_context(by_text)
        client.delete_context(by_ids)


def test_create_reports_prefill_progress(client: Client) -> None:
    seen: list[tuple[int, int]] = []
    ctx = client.create_context(prompt_text(700), on_progress=lambda done, total: seen.append((done, total)))
    try:
        assert seen and all(total == 700 for _, total in seen)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] <= 700
        assert ctx.prompt_tokens == 700
    finally:
        client.delete_context(ctx)


def test_list_then_delete_then_not_found(client: Client, server: ServerProcess) -> None:  # noqa: F811
    first = client.create_context(DOC, ttl_seconds=60)
    second = client.create_context(DOC[:100])
    listed = client.list_contexts()
    assert [c.context_id for c in listed] == [first.context_id, second.context_id]  # oldest first
    info = listed[0]
    assert (info.prompt_tokens, info.cache_bytes, info.active_requests) == (len(DOC), first.cache_bytes, 0)
    assert 0 < info.expires_in_seconds <= 60
    assert server.metric("reformer_contexts") == 2
    assert server.metric("reformer_context_cache_bytes") == first.cache_bytes + second.cache_bytes
    assert client.delete_context(first.context_id) == 0
    assert [c.context_id for c in client.list_contexts()] == [second.context_id]
    with pytest.raises(NotFoundError) as e:
        client.generate("x", context=first, max_new_tokens=2)
    assert e.value.code == "NOT_FOUND"
    with pytest.raises(NotFoundError):
        list(client.generate_stream("x", context=first, max_new_tokens=2))
    with pytest.raises(NotFoundError):
        client.delete_context(first)
    with pytest.raises(NotFoundError):
        client.generate("x", context="no-such-context", max_new_tokens=2)
    client.delete_context(second)


def test_deleting_a_context_in_use_lets_its_requests_finish(client: Client) -> None:
    ctx = client.create_context(DOC)
    with client.generate_stream(context=ctx, max_new_tokens=700, ignore_eos=True) as stream:  # ~3 s
        assert isinstance(next(stream), TextChunk | PrefillProgress)
        assert client.list_contexts()[0].active_requests == 1
        assert client.delete_context(ctx) == 1
        events = list(stream)
    assert isinstance(events[-1], Finished) and events[-1].usage.generated_tokens == 700


def test_an_exception_in_on_progress_cancels_the_prefill(client: Client, server: ServerProcess) -> None:  # noqa: F811
    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt  # what Ctrl-C raises in the caller's thread

    with pytest.raises(KeyboardInterrupt):
        client.create_context(prompt_text(900), on_progress=stop)
    # the autouse fixture checks that nothing is left: no context, no cache bytes


def test_cancelling_an_async_create_frees_the_prefill(server: ServerProcess) -> None:  # noqa: F811
    async def run() -> None:
        async with AsyncClient(server.target) as ac:
            started = asyncio.Event()
            task = asyncio.ensure_future(ac.create_context(prompt_text(900), on_progress=lambda d, t: started.set()))
            await asyncio.wait_for(started.wait(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())


def test_async_client_creates_generates_lists_and_deletes(client: Client, server: ServerProcess) -> None:  # noqa: F811
    async def run() -> tuple[tuple[int, ...], str]:
        async with AsyncClient(server.target) as ac:
            seen: list[int] = []

            async def progress(done: int, total: int) -> None:
                seen.append(done)

            ctx = await ac.create_context(prompt_text(700), on_progress=progress)
            assert seen and ctx.prompt_tokens == 700
            unary = await ac.generate(" and", context=ctx, max_new_tokens=10, temperature=0.0, ignore_eos=True)
            chunks = [ev async for ev in ac.generate_stream(" and", context=ctx.context_id, max_new_tokens=10,
                                                            temperature=0.0, ignore_eos=True)]
            assert isinstance(chunks[-1], Finished) and chunks[-1].usage.cached_tokens == 700
            assert unary.token_ids == tuple(t for c in chunks if isinstance(c, TextChunk) for t in c.token_ids)
            assert [c.context_id for c in await ac.list_contexts()] == [ctx.context_id]
            return unary.token_ids, ctx.context_id

    token_ids, context_id = asyncio.run(run())
    assert client.generate(" and", context=context_id, max_new_tokens=10, temperature=0.0,
                           ignore_eos=True).token_ids == token_ids
    assert client.delete_context(context_id) == 0


def test_bad_requests_are_invalid_argument(client: Client, server: ServerProcess) -> None:  # noqa: F811
    with pytest.raises(InvalidRequestError) as e:
        client.create_context("")
    assert e.value.field == "text"
    with Client(server.target, validate=False) as remote, pytest.raises(InvalidRequestError) as server_side:
        remote.create_context("")
    assert str(server_side.value) == str(e.value)  # the client-side check says what the server says
    limit = client.model_info().limits.max_context_ttl_seconds
    for ttl in (0.0, -5.0, limit + 1, float("nan")):  # the server knows the limit: no client-side check
        with pytest.raises(InvalidRequestError) as e:
            client.create_context(DOC, ttl_seconds=ttl)
        assert e.value.field == "ttl_seconds" and f"must be in (0, {limit:g}]" in e.value.reason
    with pytest.raises(InvalidRequestError):
        client.generate(max_new_tokens=2)  # neither a prompt nor a context
    with pytest.raises(InvalidRequestError) as e:
        client.generate("x", context="", max_new_tokens=2)
    assert e.value.field == "context_id"


# ---- a small server: the cap, expiry and the limits it reports ---------------------------------------------
SMALL_CAP = {}  # the small server's --context-memory, in bytes


@pytest.fixture(scope="module")
def small_server(
    client: Client, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
) -> Iterator[ServerProcess]:
    """Room for two and a half contexts of DOC (measured on the default server), short TTLs, no prefix caching."""
    probe = client.create_context(DOC)
    client.delete_context(probe)
    SMALL_CAP["bytes"] = cap = probe.cache_bytes * 5 // 2
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("ctx-small"), "--prefill-chunk-tokens", "64",
                       "--context-memory", str(cap), "--max-context-ttl", "30", "--default-context-ttl", "20",
                       "--no-prefix-caching")
    yield srv
    assert srv.stop() == 0, srv.log()


def test_model_info_reports_the_context_limits(small_server: ServerProcess) -> None:
    with Client(small_server.target) as c:
        lim = c.model_info().limits
    cap = SMALL_CAP["bytes"]
    assert (lim.context_memory_bytes, lim.max_context_ttl_seconds, lim.default_context_ttl_seconds,
            lim.prefix_caching) == (cap, 30.0, 20.0, False)
    r = cli("--target", small_server.target, "info")
    assert f"contexts:     up to {cap:,} bytes; ttl 20s by default, at most 30s; prefix caching off" in r.stdout


def test_contexts_beyond_the_cap_are_overloaded_and_expire(small_server: ServerProcess) -> None:
    with Client(small_server.target) as c:
        made = [c.create_context(DOC), c.create_context(DOC)]
        assert made[0].ttl_seconds == 20.0  # --default-context-ttl
        with pytest.raises(OverloadedError):
            c.create_context(DOC)
        assert [x.context_id for x in c.list_contexts()] == [m.context_id for m in made]
        for m in made:
            c.delete_context(m)
        short = c.create_context(DOC, ttl_seconds=0.5)
        assert short.ttl_seconds == 0.5
        deadline = time.monotonic() + 10
        while c.list_contexts() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.list_contexts() == []
        with pytest.raises(NotFoundError):
            c.generate("x", context=short, max_new_tokens=2)
    assert small_server.wait_metric("reformer_cache_bytes_in_use", 0.0) == 0.0


def test_a_server_without_contexts_says_so(tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    srv = start_server(tiny_model_dir, tmp_path, "--context-memory", "0")
    try:
        with Client(srv.target) as c:
            assert c.model_info().limits.context_memory_bytes == 0
            with pytest.raises(FailedPreconditionError, match="--context-memory 0"):
                c.create_context(DOC)
            assert c.list_contexts() == []
            assert c.generate(DOC, max_new_tokens=2).usage.cached_tokens == 0
        assert "contexts:     off" in cli("--target", srv.target, "info").stdout
        r = cli("--target", srv.target, "context", "create", DOC)
        assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and r.stdout == ""
    finally:
        assert srv.stop() == 0, srv.log()


def test_create_retries_unavailable_until_the_server_takes_it(tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """Before its first message nothing was created (nothing listens, or the model is loading): retried."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    started: dict[str, ServerProcess] = {}
    thread = threading.Thread(target=lambda: started.setdefault("srv", start_server(
        tiny_model_dir, tmp_path, "--port", str(port), wait_serving=False)))
    try:
        with Client(target, retry=NO_RETRY, timeout=5) as c, pytest.raises(UnavailableError):
            c.create_context(DOC)
        thread.start()
        patient = RetryPolicy(max_attempts=200, initial_backoff=0.1, max_backoff=0.5)
        with Client(target, retry=patient) as c:
            ctx = c.create_context(DOC)
            assert ctx.prompt_tokens == len(DOC) and [x.context_id for x in c.list_contexts()] == [ctx.context_id]
            c.delete_context(ctx)
    finally:
        thread.join(60)
        if "srv" in started:
            assert started["srv"].stop() == 0, started["srv"].log()


# ---- CLI -------------------------------------------------------------------------------------------------
def test_cli_create_generate_list_delete(server: ServerProcess, client: Client, tmp_path: Path) -> None:  # noqa: F811
    doc = tmp_path / "doc.txt"
    doc.write_text(prompt_text(700))
    target = ("--target", server.target)
    created = cli(*target, "context", "create", "--file", str(doc), "--ttl", "60")
    assert created.returncode == 0, created.stderr
    context_id = created.stdout.strip()
    assert created.stdout == context_id + "\n" and "[prefill " in created.stderr  # progress on stderr only
    try:
        listed = cli(*target, "context", "list")
        assert listed.returncode == 0 and context_id in listed.stdout and " 700 " in listed.stdout
        assert json.loads(cli(*target, "context", "list", "--json").stdout)["contexts"][0]["context_id"] == context_id
        out = cli(*target, "generate", "--context", context_id, "--max-new-tokens", "8", "--temperature", "0",
                  "--ignore-eos")
        assert out.returncode == 0, out.stderr
        assert out.stdout == client.generate(context=context_id, max_new_tokens=8, temperature=0.0,
                                             ignore_eos=True).text
        as_json = json.loads(cli(*target, "generate", " Emma", "--context", context_id, "--max-new-tokens", "4",
                                 "--json").stdout)
        assert as_json["usage"]["cached_tokens"] == 700 and as_json["usage"]["prompt_tokens"] == 705
        stats = cli(*target, "generate", "--context", context_id, "--max-new-tokens", "2", "--stats")
        assert "cached=700" in stats.stderr
    finally:
        deleted = cli(*target, "context", "delete", context_id)
    assert deleted.returncode == 0 and deleted.stdout.strip() == f"deleted {context_id}"
    again = cli(*target, "context", "delete", context_id)
    assert again.returncode == 7 and again.stderr.startswith("reformer-client: error: NOT_FOUND:"), again.stderr
    gone = cli(*target, "generate", "x", "--context", context_id)
    assert gone.returncode == 7 and gone.stdout == ""


def test_cli_create_from_token_ids_and_json(server: ServerProcess, client: Client, tmp_path: Path) -> None:  # noqa: F811
    target = ("--target", server.target)
    ids = tmp_path / "ids.json"
    ids.write_text(cli(*target, "tokenize", DOC, "--json").stdout)  # {"token_ids": [...]}
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(client.tokenize(DOC)))  # a plain list
    made = []
    for path in (ids, listed):
        r = cli(*target, "context", "create", "--tokens-file", str(path), "--json", "--quiet")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        made.append(json.loads(r.stdout))
    try:
        assert {m["prompt_tokens"] for m in made} == {len(DOC)}
        assert all(m["cache_bytes"] > 0 and m["ttl_seconds"] > 0 for m in made)
    finally:
        for m in made:
            assert json.loads(cli(*target, "context", "delete", m["context_id"], "--json").stdout) == {
                "context_id": m["context_id"], "active_requests": 0}
    bad = tmp_path / "bad.json"
    bad.write_text('{"ids": [1]}')
    r = cli(*target, "context", "create", "--tokens-file", str(bad))
    assert r.returncode == 2 and "expected a JSON list of token ids" in r.stderr
    r = cli(*target, "context", "create", "x", "--tokens-file", str(ids))
    assert r.returncode == 2 and "exactly one input" in r.stderr
