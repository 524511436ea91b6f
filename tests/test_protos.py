"""The .proto contract: stubs are current, every element is documented, enum and presence conventions hold."""

from __future__ import annotations

import re
import subprocess
import sys

from server_fixtures import ROOT

PROTO = ROOT / "protos" / "reformer" / "v1" / "generation.proto"


def test_committed_stubs_match_the_proto() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def _load_gen_protos():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _floor(pyproject: str, package: str) -> tuple[int, ...]:
    match = re.search(rf'"{package}>=([0-9.]+)', (ROOT / pyproject).read_text())
    assert match, f"{pyproject} pins no floor for {package}"
    return tuple(int(x) for x in match.group(1).split("."))


def test_stub_version_stamps_are_within_the_pinned_floors() -> None:
    """The check ignores the generator's version stamps, so the stamps must stay runnable: the oldest grpcio
    and protobuf the committed stubs accept are at or below what every pyproject lets pip install."""
    stubs = ROOT / "server" / "reformer_server" / "_proto"
    grpc_stamp = re.search(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'", (stubs / "generation_pb2_grpc.py").read_text(), re.M)
    pb_stamp = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
        (stubs / "generation_pb2.py").read_text(),
    )
    assert grpc_stamp and pb_stamp
    grpc_version = tuple(int(x) for x in grpc_stamp.group(1).split("."))
    pb_version = tuple(int(x) for x in pb_stamp.groups())
    for pyproject in ("pyproject.toml", "clients/python/pyproject.toml"):
        assert grpc_version <= _floor(pyproject, "grpcio"), pyproject
        assert pb_version <= _floor(pyproject, "protobuf"), pyproject


def test_the_check_ignores_version_stamps_only() -> None:
    gen = _load_gen_protos()
    stub = (ROOT / "server" / "reformer_server" / "_proto" / "generation_pb2_grpc.py").read_text()
    restamped = re.sub(r"^GRPC_GENERATED_VERSION = .*$", "GRPC_GENERATED_VERSION = '9.99.9'", stub, flags=re.M)
    assert restamped != stub
    assert gen.without_version_stamps(restamped) == gen.without_version_stamps(stub)
    edited = stub.replace("def ", "def x_", 1)
    assert gen.without_version_stamps(edited) != gen.without_version_stamps(stub)


def test_server_and_client_stubs_are_identical() -> None:
    server = ROOT / "server" / "reformer_server" / "_proto"
    client = ROOT / "clients" / "python" / "reformer_client" / "_proto"
    names = sorted(p.name for p in server.glob("*.py*"))
    assert names == sorted(p.name for p in client.glob("*.py*"))
    for name in names:
        assert (server / name).read_text() == (client / name).read_text(), name


_ELEMENT = re.compile(
    r"^\s*(message\s+\w+|enum\s+\w+|service\s+\w+|rpc\s+\w+|"  # declarations
    r"(optional\s+|repeated\s+)?[\w.]+\s+\w+\s*=\s*\d+\s*;|"  # fields
    r"[A-Z][A-Z0-9_]*\s*=\s*\d+\s*;)"  # enum values
)


def _undocumented(text: str) -> list[str]:
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        if _ELEMENT.match(line) and not (i > 0 and lines[i - 1].strip().startswith("//")):
            missing.append(line.strip())
    return missing


def test_every_message_field_enum_value_and_rpc_has_a_comment() -> None:
    assert _undocumented(PROTO.read_text()) == []


def test_comment_check_catches_an_undocumented_field() -> None:
    text = "// A message.\nmessage Foo {\n  // documented\n  int32 a = 1;\n  int32 b = 2;\n}\n"
    assert _undocumented(text) == ["int32 b = 2;"]


def test_package_is_versioned_and_service_has_the_rpcs() -> None:
    from reformer_client._proto import generation_pb2 as pb

    assert pb.DESCRIPTOR.package == "reformer.v1"
    service = pb.DESCRIPTOR.services_by_name["TextGeneration"]
    rpcs = {m.name: m for m in service.methods}
    assert {"GenerateStream", "Generate", "GetModelInfo", "Tokenize"} <= set(rpcs)
    assert rpcs["GenerateStream"].server_streaming and not rpcs["Generate"].server_streaming


def test_enums_have_unspecified_zero() -> None:
    from reformer_client._proto import generation_pb2 as pb

    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name


def test_sampling_fields_with_meaningful_zero_track_presence() -> None:
    from reformer_client._proto import generation_pb2 as pb

    fields = pb.GenerateRequest.DESCRIPTOR.fields_by_name
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        assert fields[name].has_presence, name
    req = pb.GenerateRequest(text="x", temperature=0.0)
    assert req.HasField("temperature") and not req.HasField("top_p")


def test_protobuf_runtime_is_at_least_the_generator_version() -> None:
    import google.protobuf

    stub = (ROOT / "server" / "reformer_server" / "_proto" / "generation_pb2.py").read_text()
    generated = tuple(int(x) for x in re.search(r"Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", stub).groups())
    runtime = tuple(int(x) for x in google.protobuf.__version__.split(".")[:3])
    assert runtime >= generated
    pin = re.search(r'"protobuf>=([\d.]+)', (ROOT / "clients" / "python" / "pyproject.toml").read_text())
    assert pin is not None and tuple(int(x) for x in pin.group(1).split(".")) >= generated

