"""The Python SDK (reformer_client) against the real server: streaming, cancellation, errors, TLS, retry."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from reformer_client import (
    NO_RETRY,
    AsyncClient,
    AuthenticationError,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    Finished,
    FinishReason,
    HealthStatus,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PrefillProgress,
    RetryPolicy,
    ServerError,
    TextChunk,
    UnavailableError,
)
from reformer_client.errors import RequestCancelledError, from_rpc_error
from server_fixtures import (  # noqa: F401
    ServerProcess,
    free_port,
    prompt_text,
    server,
    start_server,
    tiny_model_dir,
)

TOKEN = "test-token-123"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:  # noqa: F811
    with Client(server.target) as c:
        yield c


# ---- streaming ---------------------------------------------------------------------------------------
def test_sync_stream_yields_typed_events_ending_with_finished(client: Client) -> None:
    events = list(client.generate_stream("Hello", max_new_tokens=30, ignore_eos=True, seed=3, logprobs=2))
    chunks = [e for e in events if isinstance(e, TextChunk)]
    assert isinstance(events[-1], Finished) and not any(isinstance(e, Finished) for e in events[:-1])
    final = events[-1]
    assert final.finish_reason is FinishReason.LENGTH and final.usage.generated_tokens == 30
    assert sum(len(c.token_ids) for c in chunks) == 30
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    assert final.timings.total_seconds >= final.timings.first_token_seconds > 0
    assert final.peak_cache_bytes > 0
    result = client.generate("Hello", max_new_tokens=30, ignore_eos=True, seed=3, logprobs=2)
    assert result.text == "".join(c.text for c in chunks) + final.text
    assert result.token_ids == tuple(t for c in chunks for t in c.token_ids)
    assert len(result.logprobs) == 30 and len(result.logprobs[0].top) == 2


def test_async_stream_matches_sync_result(client: Client, server: ServerProcess) -> None:  # noqa: F811
    async def run() -> tuple[str, FinishReason]:
        async with AsyncClient(server.target) as ac:
            text = []
            final = None
            async for ev in ac.generate_stream("Hello", max_new_tokens=25, temperature=0.0):
                if isinstance(ev, TextChunk):
                    text.append(ev.text)
                elif isinstance(ev, Finished):
                    final = ev
                    text.append(ev.text)
            unary = await ac.generate("Hello", max_new_tokens=25, temperature=0.0)
            assert unary.text == "".join(text)
            assert final is not None
            return unary.text, final.finish_reason

    text, reason = asyncio.run(run())
    assert text == client.generate("Hello", max_new_tokens=25, temperature=0.0).text
    assert reason in (FinishReason.LENGTH, FinishReason.EOS)


def test_prefill_progress_events_for_long_prompts(client: Client) -> None:
    events = list(client.generate_stream(prompt_text(700), max_new_tokens=2))
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert progress and progress[0].total_tokens == 700


def test_token_id_prompts_and_tokenize_roundtrip(client: Client) -> None:
    ids = client.tokenize("Emma")
    assert client.detokenize(ids) == "Emma"
    a = client.generate(ids, max_new_tokens=5, temperature=0.0)
    b = client.generate("Emma", max_new_tokens=5, temperature=0.0)
    assert a.token_ids == b.token_ids and a.usage.prompt_tokens == 4


# ---- leaving early frees the server's cache --------------------------------------------------------------
def _wait_free(server: ServerProcess) -> None:  # noqa: F811
    assert server.wait_metric("reformer_cache_bytes_in_use", 0.0) == 0.0
    assert server.wait_metric("reformer_num_requests_running", 0.0) == 0.0


def test_breaking_out_of_a_sync_stream_frees_the_cache(client: Client, server: ServerProcess) -> None:  # noqa: F811
    for i, _ev in enumerate(client.generate_stream("Hello", max_new_tokens=900, ignore_eos=True)):
        if i == 3:
            assert server.metric("reformer_cache_bytes_in_use") > 0
            break
    _wait_free(server)
    before = server.metric("reformer_request_success_total", finish_reason="cancelled")
    with pytest.raises(RuntimeError), client.generate_stream("Hello", max_new_tokens=900, ignore_eos=True) as s:
        next(s)
        raise RuntimeError("caller failed mid-stream")
    _wait_free(server)
    assert server.metric("reformer_request_success_total", finish_reason="cancelled") >= before + 1


def test_breaking_out_of_an_async_stream_frees_the_cache(server: ServerProcess) -> None:  # noqa: F811
    async def run() -> None:
        async with AsyncClient(server.target) as ac:
            n = 0
            async for _ev in ac.generate_stream("Hello", max_new_tokens=900, ignore_eos=True):
                n += 1
                if n == 3:
                    break
            await asyncio.to_thread(_wait_free, server)

            async def consume() -> None:
                async for _ev in ac.generate_stream("Hello", max_new_tokens=900, ignore_eos=True):
                    pass

            task = asyncio.ensure_future(consume())
            await asyncio.sleep(0.5)
            assert await asyncio.to_thread(server.metric, "reformer_cache_bytes_in_use") > 0
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(_wait_free, server)

    asyncio.run(run())


# ---- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": 50}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"seed": -1}, "seed"),
    ],
)
def test_client_side_validation_says_what_the_server_says(
    server: ServerProcess, params: dict, field: str  # noqa: F811
) -> None:
    with Client(server.target) as local, pytest.raises(InvalidRequestError) as local_err:
        local.generate("x", **params)
    assert local_err.value.field == field
    if field == "seed":  # uint64 on the wire: a negative seed cannot even be sent
        return
    with Client(server.target, validate=False) as remote, pytest.raises(InvalidRequestError) as remote_err:
        remote.generate("x", **params)
    assert remote_err.value.field == field
    assert str(remote_err.value) == str(local_err.value)


def test_server_side_invalid_argument_names_the_field(client: Client) -> None:
    with pytest.raises(InvalidRequestError) as e:
        client.generate([5, 999])
    assert e.value.field == "token_ids" and e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(InvalidRequestError) as e:
        list(client.generate_stream("a" * 1000, max_new_tokens=100))
    assert e.value.field == "max_new_tokens"


def test_deadline_maps_to_deadline_exceeded(client: Client, server: ServerProcess) -> None:  # noqa: F811
    with pytest.raises(DeadlineExceededError):
        client.generate("Hello", max_new_tokens=900, ignore_eos=True, timeout=0.3)
    with pytest.raises(DeadlineExceededError):
        list(client.generate_stream("Hello", max_new_tokens=900, ignore_eos=True, timeout=0.3))
    _wait_free(server)


def test_unreachable_server_is_unavailable() -> None:
    with Client(f"127.0.0.1:{free_port()}", retry=NO_RETRY, timeout=5) as c, pytest.raises(UnavailableError):
        c.model_info()


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, OverloadedError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.UNAUTHENTICATED, AuthenticationError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.CANCELLED, RequestCancelledError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
        (grpc.StatusCode.INTERNAL, ServerError),
        (grpc.StatusCode.UNKNOWN, ServerError),
    ],
)
def test_every_status_code_has_its_exception(code: grpc.StatusCode, cls: type) -> None:
    err = from_rpc_error(code, "details", ())
    assert type(err) is cls and err.code == code.name and "details" in str(err)


@pytest.fixture(scope="module")
def strict_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:  # noqa: F811
    """Auth required, one running slot and one waiting place: for auth and overload errors."""
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("strict"), "--max-batch", "1", "--max-queue", "1",
                       env={"REFORMER_AUTH_TOKEN": TOKEN})
    yield srv
    assert srv.stop() == 0, srv.log()


def test_missing_or_wrong_token_is_authentication_error(strict_server: ServerProcess) -> None:
    for token in (None, "wrong"):
        with Client(strict_server.target, token=token) as c, pytest.raises(AuthenticationError):
            c.model_info()
    with Client(strict_server.target, token=TOKEN) as c:
        assert c.model_info().limits.max_batch == 1
    with Client(strict_server.target) as c:  # health stays open for probes
        assert c.health() is HealthStatus.SERVING


def test_full_queue_is_overloaded_error(strict_server: ServerProcess) -> None:
    with Client(strict_server.target, token=TOKEN) as c:
        running = c.generate_stream("x", max_new_tokens=900, ignore_eos=True)
        next(running)
        waiting = c.generate_stream("x", max_new_tokens=900, ignore_eos=True)
        deadline = time.monotonic() + 10
        while strict_server.metric("reformer_num_requests_waiting") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(OverloadedError):
            c.generate("y", max_new_tokens=2)
        running.close()
        waiting.close()
        _wait_free(strict_server)


def test_health_and_model_info(client: Client) -> None:
    assert client.health() is HealthStatus.SERVING
    assert client.health("reformer.v1.TextGeneration") is HealthStatus.SERVING
    info = client.model_info()
    assert info.config.vocab_size == 258 and info.limits.max_context == 1024 and info.backend == "eager"


# ---- TLS and retry -------------------------------------------------------------------------------------
def _make_certs(d: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca", "-keyout", "ca.key",
        "-out", "ca.pem")
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, cn in (("server", "localhost"), ("client", "test-client")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.pem", "-extfile", "san.cnf")


def test_mutual_tls_and_retry_while_the_server_starts(tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    _make_certs(tmp_path)
    port = free_port()
    started: dict[str, ServerProcess] = {}
    thread = threading.Thread(target=lambda: started.setdefault("srv", start_server(
        tiny_model_dir, tmp_path / "srv", "--port", str(port), "--tls-cert", str(tmp_path / "server.pem"),
        "--tls-key", str(tmp_path / "server.key"), "--tls-client-ca", str(tmp_path / "ca.pem"),
        wait_serving=False)))  # the fixture's plaintext health probe cannot speak mTLS; the client waits
    ca, key, cert = (tmp_path / n for n in ("ca.pem", "client.key", "client.pem"))
    target = f"127.0.0.1:{port}"
    try:
        with Client(target, root_certificates=ca.read_bytes(), private_key=key.read_bytes(),
                    certificate_chain=cert.read_bytes(), retry=NO_RETRY) as c, pytest.raises(UnavailableError):
            c.model_info()  # nothing listens yet, and no retry
        thread.start()
        # The client retries UNAVAILABLE (not listening, then "model is still loading") until the server is up.
        patient = RetryPolicy(max_attempts=200, initial_backoff=0.1, max_backoff=0.5)
        with Client(target, root_certificates=ca.read_bytes(), private_key=key.read_bytes(),
                    certificate_chain=cert.read_bytes(), retry=patient, timeout=5) as c:
            assert c.model_info().config.vocab_size == 258
            assert c.generate("TLS", max_new_tokens=3, ignore_eos=True).usage.generated_tokens == 3
        thread.join(60)
        with Client(target, root_certificates=ca.read_bytes(), retry=NO_RETRY, timeout=5) as c:
            with pytest.raises((UnavailableError, AuthenticationError)):
                c.model_info()  # no client certificate: the handshake fails
    finally:
        thread.join(60)
        if "srv" in started:
            assert started["srv"].stop() == 0, started["srv"].log()
