"""Server configuration: flags, REFORMER_* environment variables and their precedence, in one place."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import server_fixtures  # noqa: F401  (puts server/ on sys.path in a plain checkout)
from reformer_server.config import ServerConfig, build_parser, parse_bytes, parse_config


def test_defaults_bind_loopback_and_standard_ports() -> None:
    cfg = parse_config([], env={})
    assert (cfg.host, cfg.port, cfg.metrics_port) == ("127.0.0.1", 50051, 9090)
    assert cfg.model is None and cfg.reflection and cfg.auth_token is None and cfg.backend == "eager"


def test_environment_variables_configure_the_server() -> None:
    env = {"REFORMER_PORT": "6000", "REFORMER_MODEL": "/m", "REFORMER_CACHE_MEMORY": "2GiB",
           "REFORMER_REFLECTION": "false", "REFORMER_AUTH_TOKEN": "s3cret", "REFORMER_GRACE_PERIOD": "5"}
    cfg = parse_config([], env=env)
    assert cfg.port == 6000 and cfg.model == Path("/m") and cfg.cache_memory == 2 * 2**30
    assert cfg.reflection is False and cfg.auth_token == "s3cret" and cfg.grace_period == 5.0


def test_flag_wins_over_environment_variable() -> None:
    cfg = parse_config(["--port", "7000", "--max-batch", "4"], env={"REFORMER_PORT": "6000",
                                                                   "REFORMER_ARRIVAL_WINDOW": "0"})
    assert cfg.port == 7000 and cfg.max_batch == 4 and cfg.arrival_window == 0.0


def test_every_flag_documents_its_environment_variable() -> None:
    text = build_parser().format_help().replace("\n", " ")
    for action in build_parser()._actions:
        if action.dest != "help":
            assert f"REFORMER_{action.dest.upper()}" in text.replace(" ", ""), action.dest


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--tls-cert", "c.pem"], {}),
        (["--tls-client-ca", "ca.pem"], {}),
        (["--max-batch", "0"], {}),
        (["--arrival-window", "-0.001"], {}),
        ([], {"REFORMER_PORT": "not-a-port"}),
        ([], {"REFORMER_DEVICE": "tpu"}),
    ],
)
def test_inconsistent_settings_are_rejected(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(argv, env=env)


def test_byte_sizes_accept_units() -> None:
    assert parse_bytes("1024") == 1024
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("2G") == 2 * 10**9
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("lots")


def test_config_dataclass_reports_tls() -> None:
    assert not ServerConfig().tls
    assert ServerConfig(tls_cert=Path("c"), tls_key=Path("k")).tls


def test_exported_backends_are_selectable_and_default_to_float32() -> None:
    from reformer_server import backend

    assert {"eager", "torchscript", "onnx", "pt2"} <= set(backend.backend_names())
    assert backend.resolve_dtype("auto", "cuda", "onnx") == "float32"
    assert backend.resolve_dtype("auto", "cuda", "eager") == "bfloat16"
    assert backend.resolve_dtype("auto", "cpu", "eager") == "float32"
    with pytest.raises(ValueError, match="unknown backend"):
        backend.load_backend("tensorrt", Path("/nowhere"), "cpu", "float32")


def test_overlap_steps_auto_by_default_and_forced_by_flag_or_env() -> None:
    assert parse_config([], env={}).overlap_steps is None
    assert parse_config(["--overlap-steps", "true"], env={}).overlap_steps is True
    assert parse_config(["--overlap-steps", "auto"], env={"REFORMER_OVERLAP_STEPS": "0"}).overlap_steps is None
    assert parse_config([], env={"REFORMER_OVERLAP_STEPS": "off"}).overlap_steps is False


def test_stream_interval_defaults_to_every_token_and_rejects_zero() -> None:
    assert parse_config([], env={}).stream_interval == 1
    assert parse_config(["--stream-interval", "4"], env={}).stream_interval == 4
    assert parse_config([], env={"REFORMER_STREAM_INTERVAL": "2"}).stream_interval == 2
    with pytest.raises(SystemExit):
        parse_config(["--stream-interval", "0"], env={})


def test_compile_step_off_by_default_and_switched_on_by_flag_or_env() -> None:
    assert parse_config([], env={}).compile_step is False
    assert parse_config(["--compile-step", "true"], env={}).compile_step is True
    assert parse_config([], env={"REFORMER_COMPILE_STEP": "1"}).compile_step is True


def test_cuda_graphs_on_by_default_and_switched_off_three_ways() -> None:
    assert parse_config([], env={}).cuda_graphs is True
    assert parse_config(["--no-cuda-graphs"], env={}).cuda_graphs is False
    assert parse_config(["--cuda-graphs", "false"], env={}).cuda_graphs is False
    assert parse_config([], env={"REFORMER_CUDA_GRAPHS": "0"}).cuda_graphs is False
    assert parse_config(["--cuda-graphs", "true"], env={"REFORMER_CUDA_GRAPHS": "0"}).cuda_graphs is True
