"""Security: loopback by default, TLS and mutual TLS with certificates made here, bearer-token auth, logs
without secrets or prompts, and a checkpoint that cannot run code.

Certificates come from the `cryptography` package (a throw-away CA, a server certificate for 127.0.0.1 /
localhost signed by it, client certificates from that CA and from an unrelated one). The SDK-level mTLS
test is tests/test_client_sdk.py::test_mutual_tls_and_retry_while_the_server_starts (openssl CLI); this
file talks raw grpc so it checks the server alone. The library-level refusal of pickled code is
tests/test_model.py::test_pickled_code_in_a_checkpoint_is_refused; here the whole server refuses to start
on such a checkpoint and the code never runs.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from reformer_server._proto import generation_pb2 as pb
from reformer_server._proto import generation_pb2_grpc as pb_grpc
from server_fixtures import ServerProcess, start_server, subprocess_env, tiny_config, tiny_model_dir  # noqa: F401

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

TOKEN = "tok-7f3a9c1e5b2d4680-secret"
TIMEOUT_S = 20.0


# ---- certificates -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyPair:
    key: bytes  # PEM private key
    cert: bytes  # PEM certificate


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(cn: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Name] | None, *, ca: bool = False,
           server: bool = False) -> tuple[KeyPair, ec.EllipticCurvePrivateKey, x509.Name]:
    """A certificate for `cn`, signed by `issuer` (self-signed when None), valid for one day."""
    key = ec.generate_private_key(ec.SECP256R1())
    signer, issuer_name = issuer if issuer is not None else (key, _name(cn))
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(signer, hashes.SHA256())
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return KeyPair(pem_key, cert.public_bytes(serialization.Encoding.PEM)), key, _name(cn)


@dataclass(frozen=True)
class Pki:
    ca: KeyPair
    server: KeyPair  # signed by ca, for 127.0.0.1 / localhost
    client: KeyPair  # signed by ca
    stranger_ca: KeyPair  # an unrelated self-signed CA
    stranger_client: KeyPair  # signed by stranger_ca


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, ca_key, ca_name = _issue("reformer test CA", None, ca=True)
    server, _, _ = _issue("localhost", (ca_key, ca_name), server=True)
    client, _, _ = _issue("reformer test client", (ca_key, ca_name))
    stranger_ca, s_key, s_name = _issue("stranger CA", None, ca=True)
    stranger_client, _, _ = _issue("stranger client", (s_key, s_name))
    return Pki(ca, server, client, stranger_ca, stranger_client)


def _write(d: Path, **files: bytes) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, data in files.items():
        (d / name).write_bytes(data)
        out[name] = d / name
    return out


def _generate(channel: grpc.Channel, **kw: object) -> pb.GenerateResponse:
    return pb_grpc.TextGenerationStub(channel).Generate(
        pb.GenerateRequest(text="secure", max_new_tokens=3, ignore_eos=True), timeout=TIMEOUT_S, **kw)


# ---- binding ----------------------------------------------------------------------------------------------
def _listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on `port`, from /proc/net/tcp and tcp6 (hex, as the kernel writes)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


# 127.0.0.1 in /proc/net/tcp, and as the IPv4-mapped ::ffff:127.0.0.1 in /proc/net/tcp6 (grpc listens there).
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}


def test_binds_loopback_only_by_default(tiny_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    port_file = tmp_path / "ports.json"
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "reformer_server", "--model", str(tiny_model_dir), "--port", "0",
           "--metrics-port", "0", "--port-file", str(port_file), "--warmup", "false"]  # no --host
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        ports = json.loads(port_file.read_text())
        for port in (ports["port"], ports["metrics_port"]):
            found = _listening_addresses(port)
            assert found and found <= LOOPBACK, (port, found)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()


# ---- TLS + token --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_server(tiny_model_dir: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:  # noqa: F811
    d = tmp_path_factory.mktemp("tls")
    f = _write(d / "certs", cert=pki.server.cert, key=pki.server.key)
    srv = start_server(tiny_model_dir, d / "run", "--tls-cert", str(f["cert"]), "--tls-key", str(f["key"]),
                       env={"REFORMER_AUTH_TOKEN": TOKEN}, wait_serving=False)
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    deadline = time.monotonic() + 60
    while True:  # the fixture's plaintext health probe cannot speak TLS
        try:
            with grpc.secure_channel(srv.target, creds) as ch:
                if health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1:
                    break
        except grpc.RpcError:
            assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log()
            time.sleep(0.1)
    yield srv
    assert srv.stop() == 0, srv.log()


def test_tls_server_speaks_only_tls_to_clients_that_trust_its_ca(tls_server: ServerProcess, pki: Pki) -> None:
    with grpc.insecure_channel(tls_server.target) as plain, pytest.raises(grpc.RpcError) as e:
        _generate(plain, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    wrong_root = grpc.ssl_channel_credentials(root_certificates=pki.stranger_ca.cert)
    with grpc.secure_channel(tls_server.target, wrong_root) as ch, pytest.raises(grpc.RpcError) as e:
        _generate(ch, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: certificate not trusted
    creds = grpc.composite_channel_credentials(grpc.ssl_channel_credentials(root_certificates=pki.ca.cert),
                                               grpc.access_token_call_credentials(TOKEN))
    with grpc.secure_channel(tls_server.target, creds) as ch:
        messages = list(pb_grpc.TextGenerationStub(ch).GenerateStream(
            pb.GenerateRequest(text="over TLS", max_new_tokens=4, ignore_eos=True), timeout=TIMEOUT_S))
    assert messages[-1].usage.generated_tokens == 4


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                                      (("authorization", f"bearer {TOKEN}x"),)])
def test_missing_or_wrong_token_is_unauthenticated_on_every_service(
    tls_server: ServerProcess, pki: Pki, metadata: tuple  # noqa: F811
) -> None:
    with grpc.secure_channel(tls_server.target, grpc.ssl_channel_credentials(pki.ca.cert)) as ch:
        stub = pb_grpc.TextGenerationStub(ch)
        calls = [
            lambda: _generate(ch, metadata=metadata),
            lambda: list(stub.GenerateStream(pb.GenerateRequest(text="x", max_new_tokens=2), timeout=TIMEOUT_S,
                                             metadata=metadata)),
            lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT_S, metadata=metadata),
            lambda: stub.Cancel(pb.CancelRequest(request_id="x"), timeout=TIMEOUT_S, metadata=metadata),
            lambda: ch.unary_unary("/reformer.v1.TextGeneration/Generate")(b"\xff\xff", timeout=TIMEOUT_S,
                                                                          metadata=metadata),
            lambda: list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT_S,
                metadata=metadata)),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
            assert "bearer token" in e.value.details()
        # Health stays open for probes (no --auth-health).
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S,
                                                    metadata=metadata).status == health_pb2.HealthCheckResponse.SERVING


# ---- token on health, and what reaches the log ---------------------------------------------------------------
PROMPT_MARKER = "PROMPT-MARKER-Zq81"


def test_health_needs_the_token_with_auth_health_and_logs_hold_no_tokens_or_prompts(
    tiny_model_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    srv = start_server(tiny_model_dir, tmp_path, "--auth-health", "true", env={"REFORMER_AUTH_TOKEN": TOKEN},
                       wait_serving=False)
    good = (("authorization", f"Bearer {TOKEN}"),)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 60
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=good).status == 1:
                        break
                except grpc.RpcError:
                    assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log()
                    time.sleep(0.1)
            for bad in ((), (("authorization", f"Bearer {TOKEN[:-1]}"),)):
                with pytest.raises(grpc.RpcError) as e:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S, metadata=bad)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Traffic that could leak into the log: prompts (good, bad and failing), wrong tokens, a stop string.
            stub = pb_grpc.TextGenerationStub(ch)
            stub.Generate(pb.GenerateRequest(text=f"{PROMPT_MARKER} tell me", max_new_tokens=3, stop=[PROMPT_MARKER]),
                          timeout=TIMEOUT_S, metadata=good)
            list(stub.GenerateStream(pb.GenerateRequest(text=f"{PROMPT_MARKER} stream", max_new_tokens=3),
                                     timeout=TIMEOUT_S, metadata=good))
            for req in (pb.GenerateRequest(text=f"{PROMPT_MARKER} bad", temperature=-1.0),
                        pb.GenerateRequest(text=PROMPT_MARKER * 200, max_new_tokens=1000)):
                with pytest.raises(grpc.RpcError):
                    stub.Generate(req, timeout=TIMEOUT_S, metadata=good)
            with pytest.raises(grpc.RpcError):
                stub.Generate(pb.GenerateRequest(text=PROMPT_MARKER), timeout=TIMEOUT_S,
                              metadata=(("authorization", f"Bearer {PROMPT_MARKER}-{TOKEN}"),))
            with pytest.raises(grpc.RpcError):  # cancelled mid-stream: the "cancelled" log line
                call = stub.GenerateStream(pb.GenerateRequest(text=PROMPT_MARKER, max_new_tokens=900, ignore_eos=True),
                                           timeout=TIMEOUT_S, metadata=good)
                next(call)
                call.cancel()
                list(call)
    finally:
        assert srv.stop() == 0, srv.log()
    log = srv.log()
    assert "request " in log  # the access log is on: the check below looks at a log that says something
    assert TOKEN not in log and TOKEN[:12] not in log
    assert PROMPT_MARKER not in log
    assert "tell me" not in log


# ---- mutual TLS ------------------------------------------------------------------------------------------------
def test_mutual_tls_admits_only_client_certificates_from_the_configured_ca(
    tiny_model_dir: Path, pki: Pki, tmp_path: Path  # noqa: F811
) -> None:
    f = _write(tmp_path / "certs", cert=pki.server.cert, key=pki.server.key, ca=pki.ca.cert)
    srv = start_server(tiny_model_dir, tmp_path / "run", "--tls-cert", str(f["cert"]), "--tls-key", str(f["key"]),
                       "--tls-client-ca", str(f["ca"]), wait_serving=False)
    trusted = grpc.ssl_channel_credentials(pki.ca.cert, pki.client.key, pki.client.cert)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with grpc.secure_channel(srv.target, trusted) as ch:
                    assert _generate(ch).usage.generated_tokens == 3
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log()
                time.sleep(0.2)
        for creds in (grpc.ssl_channel_credentials(pki.ca.cert),  # no client certificate
                      grpc.ssl_channel_credentials(pki.ca.cert, pki.stranger_client.key, pki.stranger_client.cert)):
            with grpc.secure_channel(srv.target, creds) as ch, pytest.raises(grpc.RpcError) as e:
                _generate(ch)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # refused in the handshake
    finally:
        assert srv.stop() == 0, srv.log()


# ---- checkpoints ---------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this would create a directory: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.makedirs, (str(self.marker),))


def test_server_refuses_a_pickled_checkpoint_without_running_it(tmp_path: Path) -> None:
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    marker = tmp_path / "code-ran"
    torch.save({"weights": _Payload(marker)}, evil / "pytorch_model.bin")
    r = subprocess.run([sys.executable, "-m", "reformer_server", "--model", str(evil), "--port", "0",
                        "--metrics-port", "-1"], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 1 and "fatal:" in r.stderr, r.stderr
    assert not marker.exists()
