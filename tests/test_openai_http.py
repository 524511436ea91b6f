"""The OpenAI-compatible HTTP front-end, with the official `openai` client against a real server subprocess
that serves gRPC and HTTP on the same engine (tiny model, bearer token set)."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from reformer_client import Client
from server_fixtures import ServerProcess, start_server, tiny_model_dir  # noqa: F401

TOKEN = "s3cret-http"
PROMPT = "It is a truth universally acknowledged"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:  # noqa: F811
    proc = start_server(tiny_model_dir, tmp_path_factory.mktemp("http"), "--http-port", "0",
                        "--prefill-chunk-tokens", "64", env={"REFORMER_AUTH_TOKEN": TOKEN})
    yield proc
    code = proc.stop()
    assert code == 0, f"server exited with {code}:\n{proc.log()}"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=TOKEN, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _get(url: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_the_served_model_with_its_context(client: openai.OpenAI, tiny_model_dir: Path) -> None:  # noqa: F811
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_model_dir.name]
    assert models[0].model_extra["max_model_len"] == 1024
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_completion_whole_and_streamed_agree(client: openai.OpenAI, model: str) -> None:
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "length"
    assert whole.usage.prompt_tokens == len(PROMPT.encode()) and whole.usage.completion_tokens == 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24

    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len(chunks) > 2
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 24  # the include_usage chunk
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "seed": 7}])
def test_completion_text_equals_grpc_generate(server: ServerProcess, client: openai.OpenAI, model: str,
                                              sampling: dict) -> None:
    http = client.completions.create(model=model, prompt=PROMPT, max_tokens=20, extra_body={"top_k": 40},
                                     **sampling).choices[0].text
    with Client(server.target, token=TOKEN) as grpc_client:
        result = grpc_client.generate(PROMPT, max_new_tokens=20, top_k=40, **sampling)
    assert http == result.text


def test_token_id_prompt_stop_and_logprobs(client: openai.OpenAI, model: str) -> None:
    text = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    ids = [b + 2 for b in PROMPT.encode()]  # the byte-level vocabulary: id = byte + 2
    same = client.completions.create(model=model, prompt=ids, max_tokens=24, temperature=0, logprobs=2)
    assert same.choices[0].text == text
    lp = same.choices[0].logprobs
    assert len(lp.token_logprobs) == 24 and all(len(top) <= 2 for top in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    stop = next(ch for ch in text[4:] if ch != "\ufffd")
    stopped = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 2}, "n"),
        ({"echo": True}, "echo"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"prompt": [1, -3]}, "prompt"),
        ({"prompt": [999]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"extra_body": {"max_token": 3}}, "max_token"),
    ],
)
def test_bad_parameter_is_a_bad_request_naming_it(client: openai.OpenAI, model: str, kwargs: dict,
                                                  param: str) -> None:
    args = {"model": model, "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**args)
    assert err.value.param == param and err.value.status_code == 400
    assert f"{param}: " in err.value.message


def test_wrong_or_missing_token_is_an_authentication_error(server: ServerProcess, model: str) -> None:
    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert _get(f"{server.http_url}/v1/models")[0] == 401
    # Probes carry no token: health stays open unless --auth-health
    assert _get(f"{server.http_url}/health") == (200, {"status": "SERVING"})
    assert _get(f"{server.http_url}/ready") == (200, {"status": "SERVING"})


def test_unknown_model_route_and_chat_are_not_found(server: ServerProcess, client: openai.OpenAI,
                                                    model: str) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert err.value.param == "model" and err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in err.value.message
    status, body = _get(f"{server.http_url}/v1/embeddings", TOKEN)
    assert status == 404 and body["error"]["code"] == "not_found"


def test_disconnecting_mid_stream_aborts_and_frees_the_cache(server: ServerProcess, client: openai.OpenAI,
                                                             model: str) -> None:
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=900, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    assert server.metric("reformer_cache_bytes_in_use") > 0
    assert 0 < server.metric("reformer_cache_usage_ratio") <= 1
    stream.close()  # drops the connection
    assert server.wait_metric("reformer_cache_bytes_in_use", 0.0) == 0.0
    assert server.wait_metric("reformer_num_requests_running", 0.0) == 0.0
    assert server.metric("reformer_cache_usage_ratio") == 0.0
    deadline = time.monotonic() + 5
    while "cancelled (client gone" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "cancelled (client gone" in server.log()
    assert server.metric("reformer_generation_tokens_total") < 900 + 200  # it did not run to the end
    assert server.metric("reformer_http_requests_total", route="/v1/completions", status="200") >= 1


def test_draining_server_answers_503_and_lets_running_streams_finish(tiny_model_dir: Path,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    proc = start_server(tiny_model_dir, tmp_path, "--http-port", "0", "--drain-announce", "3")
    try:
        url = proc.http_url
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as c:
            model = c.models.list().data[0].id
            stream = c.completions.create(model=model, prompt=PROMPT, max_tokens=600, temperature=0, stream=True,
                                          extra_body={"ignore_eos": True})
            chunks = [next(iter(stream))]
            proc.proc.terminate()
            deadline = time.monotonic() + 2
            while _get(f"{url}/ready")[0] == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _get(f"{url}/ready") == (503, {"status": "NOT_SERVING"})
            with pytest.raises(openai.InternalServerError) as err:
                c.completions.create(model=model, prompt=PROMPT, max_tokens=2)
            assert err.value.status_code == 503
            chunks += list(stream)  # the running stream goes on through the drain
            assert chunks[-1].choices[0].finish_reason == "length"
        assert proc.proc.wait(timeout=30) == 0
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_and_the_open_stream_limit_apply_to_http(tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=reformer",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    proc = start_server(tiny_model_dir, tmp_path / "srv", "--http-port", "0", "--tls-cert", str(cert), "--tls-key",
                        str(key), "--max-concurrent-streams", "1", wait_serving=False)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        base = f"https://127.0.0.1:{proc.http_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ready", context=context, timeout=5) as r:
                    assert r.status == 200
                    break
            except urllib.error.HTTPError as e:  # 503 while loading
                assert e.code == 503 and time.monotonic() < deadline
                time.sleep(0.1)
        with pytest.raises(OSError):  # plaintext HTTP is not served on a TLS port (the server hangs up)
            urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port}/ready", timeout=5)
        with httpx.Client(base_url=f"{base}/v1", verify=context, timeout=60) as http, \
                openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0,
                              http_client=openai.DefaultHttpxClient(verify=context)) as c:
            model = c.models.list().data[0].id
            body = {"model": model, "prompt": PROMPT, "max_tokens": 800, "stream": True, "ignore_eos": True}
            with http.stream("POST", "/completions", json=body) as first:  # holds the one open stream
                lines = first.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                with pytest.raises(openai.RateLimitError) as err:
                    c.completions.create(model=model, prompt=PROMPT, max_tokens=2)
                assert "--max-concurrent-streams" in err.value.message
            deadline = time.monotonic() + 10
            while proc.metric("reformer_grpc_streams_open") != 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.completions.create(model=model, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    finally:
        assert proc.stop() == 0, proc.log()


def test_text_for_a_model_without_a_tokenizer_is_a_bad_request_not_an_internal_error(caplog) -> None:
    """The HTTP side of gRPC's FAILED_PRECONDITION (issue 17): 400 with the reason, nothing logged as a bug."""
    from reformer_server.openai_api import http_error_for

    from reformer_infer.requests import TokenizerUnavailableError

    err = http_error_for(TokenizerUnavailableError("this model has no tokenizer (no tokenizer.json or spiece.model)"))
    assert (err.status, err.type, err.code) == (400, "invalid_request_error", "tokenizer_unavailable")
    assert "no tokenizer.json or spiece.model" in err.message and "token ids" in err.message
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
