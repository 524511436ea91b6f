"""Generate the Python gRPC stubs from protos/reformer/v1/*.proto (the one codegen step).

The stubs are committed, in two copies, so that the server and the stand-alone client SDK can each be
installed without grpcio-tools:

    server/reformer_server/_proto/        (package reformer_server._proto)
    clients/python/reformer_client/_proto/ (package reformer_client._proto)

Run `python scripts/gen_protos.py` after editing a .proto; `--check` exits non-zero when the committed
stubs differ from what the generator produces now (tests/test_protos.py runs it). grpcio-tools embeds
its own and its protobuf's versions in the stubs, as the oldest runtime they accept, so `grpcio` and
`protobuf` must be pinned at or above the committed ones (see pyproject files). `--check` compares the
stubs without those version stamps: a newer grpcio-tools that generates the same code is not a change.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
TARGETS = (
    ROOT / "server" / "reformer_server" / "_proto",
    ROOT / "clients" / "python" / "reformer_client" / "_proto",
)
INIT_TEXT = '"""Generated gRPC stubs for protos/reformer/v1 (do not edit; run scripts/gen_protos.py)."""\n'

log = logging.getLogger("gen_protos")


def _proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "reformer" / "v1").glob("*.proto"))


def generate() -> dict[str, str]:
    """Run protoc once and return {file name: contents} of the flattened, relatively-imported stubs."""
    import grpc_tools
    from grpc_tools import protoc  # imported here: only this script needs grpcio-tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in _proto_files()),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        out: dict[str, str] = {}
        for path in sorted((Path(tmp) / "reformer" / "v1").iterdir()):
            text = path.read_text()
            # The stubs live flat in a `_proto` package, so `from reformer.v1 import x_pb2` becomes relative.
            text = re.sub(r"^from reformer\.v1 import ", "from . import ", text, flags=re.MULTILINE)
            out[path.name] = text
    out["__init__.py"] = INIT_TEXT
    return out


# Lines that only record which generator version wrote a stub (and hence the oldest runtime it accepts).
_VERSION_STAMPS = (
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE),
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)", re.MULTILINE),
)


def without_version_stamps(text: str) -> str:
    """The stub's text with the generator's version stamps blanked out."""
    for pattern in _VERSION_STAMPS:
        text = pattern.sub("<version>", text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only verify that the committed stubs are current")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = generate()
    stale: list[str] = []
    for target in TARGETS:
        existing = {p.name for p in target.glob("*.py*")} if target.exists() else set()
        for name, text in files.items():
            path = target / name
            if args.check:
                if not path.exists() or without_version_stamps(path.read_text()) != without_version_stamps(text):
                    stale.append(str(path.relative_to(ROOT)))
            else:
                target.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        for name in sorted(existing - set(files)):
            stale.append(str((target / name).relative_to(ROOT)))
            if not args.check:
                (target / name).unlink()
    if args.check:
        if stale:
            log.error("stale generated stubs (run python scripts/gen_protos.py): %s", ", ".join(stale))
            return 1
        log.info("generated stubs are current")
        return 0
    log.info("wrote %d files into %s", len(files), ", ".join(str(t.relative_to(ROOT)) for t in TARGETS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
