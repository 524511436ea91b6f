"""`reformer-server` / `python -m reformer_server`: parse flags (and REFORMER_* variables), serve."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from reformer_server.config import parse_config


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv)
    logging.basicConfig(
        level=getattr(logging, cfg.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from reformer_server.backend import resolve_device
    from reformer_server.server import serve  # after logging is set up: importing torch takes a moment

    try:
        on_cpu = resolve_device(cfg.device) == "cpu"
    except RuntimeError:  # --device cuda without one: serve() reports it
        on_cpu = False
    # The engine thread and the gRPC event loop share the GIL. On a CPU the engine thread holds it through
    # every op of a step: with Python's default 5 ms switch interval a token event can wait that long for the
    # loop to run, and 0.5 ms keeps streaming at the engine's pace. On a GPU the step waits on the device
    # with the GIL released, and the default stands unless set.
    if cfg.switch_interval is not None or on_cpu:
        sys.setswitchinterval(cfg.switch_interval or 0.0005)
    if on_cpu:
        from reformer_infer.memory import release_large_buffers_promptly

        release_large_buffers_promptly()  # long CPU prefills would otherwise ratchet RSS up (heap fragmentation)

    try:
        asyncio.run(serve(cfg))
    except Exception as exc:  # a startup failure (bad model path, port in use): one line, non-zero exit
        logging.getLogger("reformer_server").error("fatal: %s", exc, exc_info=cfg.log_level == "DEBUG")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
