"""`reformer-client`: generate, context, info, health and tokenize against a reformer-serve server from a shell.

Output is for people by default (generated text streamed to stdout as it arrives) and for programs with
`--json`. Any failure prints one line `reformer-client: error: <CODE>: <message>` to stderr and exits
non-zero:

    0 ok   1 server error / not serving   2 invalid arguments   3 unavailable   4 unauthenticated
    5 deadline exceeded   6 overloaded   7 not found (e.g. an unknown or expired context)   130 interrupted
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from reformer_client.client import DEFAULT_TARGET, NO_RETRY, Client, RetryPolicy
from reformer_client.errors import (
    AuthenticationError,
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    ReformerError,
    UnavailableError,
)
from reformer_client.types import Finished, GenerateResult, HealthStatus, PrefillProgress, TextChunk

EXIT_CODES: tuple[tuple[type[ReformerError], int], ...] = (
    (InvalidRequestError, 2),
    (UnavailableError, 3),
    (AuthenticationError, 4),
    (DeadlineExceededError, 5),
    (OverloadedError, 6),
    (NotFoundError, 7),
)


class _CliError(Exception):
    """A usage problem found after parsing (e.g. two prompt sources)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reformer-client",
        description="Talk to a reformer-serve gRPC server.",
        epilog="exit codes: 0 ok, 1 server error or not serving, 2 invalid arguments, 3 unavailable, "
        "4 unauthenticated, 5 deadline exceeded, 6 overloaded, 7 not found",
    )
    p.add_argument("--target", default=os.environ.get("REFORMER_TARGET", DEFAULT_TARGET),
                   help="server address host:port [env REFORMER_TARGET; default %(default)s]")
    p.add_argument("--token", default=os.environ.get("REFORMER_TOKEN") or os.environ.get("REFORMER_AUTH_TOKEN"),
                   help="bearer token [env REFORMER_TOKEN or REFORMER_AUTH_TOKEN]")
    p.add_argument("--tls", action="store_true", help="use TLS (implied by --ca-cert / --client-cert)")
    p.add_argument("--allow-insecure-token", action="store_true",
                   help="send --token over plaintext to a non-loopback target (only via a trusted TLS proxy)")
    p.add_argument("--ca-cert", type=Path, help="PEM CA bundle to verify the server (default: system roots)")
    p.add_argument("--client-cert", type=Path, help="PEM client certificate (mutual TLS)")
    p.add_argument("--client-key", type=Path, help="PEM client private key (mutual TLS)")
    p.add_argument("--server-name", help="name to verify the server certificate against (overrides the host)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds for the call")
    p.add_argument("--retries", type=int, default=3, help="retries on UNAVAILABLE for unary calls (default 3)")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text, streamed to stdout as it arrives")
    g.add_argument("prompt", nargs="?", help="the prompt ('-' reads stdin); optional with --context")
    g.add_argument("--stdin", action="store_true", help="read the prompt from stdin")
    g.add_argument("--file", type=Path, help="read the prompt from a file (long prompts)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--logprobs", type=int, default=0, help="top-N log-probabilities per token (with --json)")
    g.add_argument("--truncate", choices=("none", "left"), help="drop the oldest prompt tokens that do not fit")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    g.add_argument("--request-id", help="client-chosen request id")
    g.add_argument("--context", metavar="ID",
                   help="continue after a context made by `context create` (the prompt may then be omitted)")
    g.add_argument("--no-stream", action="store_true", help="use the unary Generate call")
    g.add_argument("--stats", action="store_true", help="print usage and timings to stderr at the end")
    g.add_argument("--json", action="store_true", help="print the whole result as one JSON object")

    c = sub.add_parser("context", help="prefilled prompts pinned on the server, for generate --context")
    csub = c.add_subparsers(dest="context_command", required=True)
    cc = csub.add_parser("create", help="prefill a prompt once and print the context's id")
    cc.add_argument("text", nargs="?", help="the context's text ('-' reads stdin)")
    cc.add_argument("--stdin", action="store_true", help="read the text from stdin")
    cc.add_argument("--file", type=Path, help="read the text from a file (a long document)")
    cc.add_argument("--tokens-file", type=Path,
                    help="token ids instead of text: a JSON list, or the output of `tokenize --json`")
    cc.add_argument("--ttl", type=float, help="seconds the context lives (default: the server's)")
    cc.add_argument("--quiet", action="store_true", help="no prefill progress on stderr")
    cc.add_argument("--json", action="store_true", help="print the context (id, tokens, cache bytes, ttl) as JSON")
    cl = csub.add_parser("list", help="this caller's live contexts")
    cl.add_argument("--json", action="store_true")
    cd = csub.add_parser("delete", help="delete a context (requests already using it finish)")
    cd.add_argument("context_id", metavar="ID")
    cd.add_argument("--json", action="store_true")

    i = sub.add_parser("info", help="describe the served model and the server's limits")
    i.add_argument("--json", action="store_true")

    h = sub.add_parser("health", help="grpc.health.v1 status (exit 0 only when SERVING)")
    h.add_argument("--service", default="", help="service name ('' = the whole server)")
    h.add_argument("--json", action="store_true")

    t = sub.add_parser("tokenize", help="print the token ids of a text")
    t.add_argument("text", nargs="?", help="the text ('-' reads stdin)")
    t.add_argument("--stdin", action="store_true")
    t.add_argument("--file", type=Path)
    t.add_argument("--json", action="store_true")
    return p


def _read_input(positional: str | None, stdin: bool, file: Path | None, optional: bool = False) -> str:
    """The one input given (an argument, stdin or a file); "" when none is and `optional`."""
    sources = sum((positional is not None and positional != "-", stdin or positional == "-", file is not None))
    if sources == 0 and optional:
        return ""
    if sources != 1:
        raise _CliError("give exactly one input: an argument, --stdin (or '-'), or --file")
    if file is not None:
        return file.read_text(encoding="utf-8")
    if stdin or positional == "-":
        return sys.stdin.read()
    assert positional is not None
    return positional


def _client(args: argparse.Namespace) -> Client:
    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path is not None else None

    tls = args.tls or args.ca_cert is not None or args.client_cert is not None
    retry = RetryPolicy(max_attempts=args.retries + 1) if args.retries > 0 else NO_RETRY
    return Client(
        args.target, tls=tls, root_certificates=read(args.ca_cert), private_key=read(args.client_key),
        certificate_chain=read(args.client_cert), server_name=args.server_name, token=args.token,
        retry=retry, timeout=args.timeout, generate_timeout=args.timeout,
        allow_insecure_token=args.allow_insecure_token,
    )


def _result_json(r: GenerateResult) -> dict[str, Any]:
    out = asdict(r)
    out["finish_reason"] = r.finish_reason.value
    out["token_ids"] = list(r.token_ids)
    if not r.logprobs:
        out.pop("logprobs")
    return out


def _generate(client: Client, args: argparse.Namespace) -> int:
    prompt = _read_input(args.prompt, args.stdin, args.file, optional=args.context is not None)
    params: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
        "stop": args.stop, "logprobs": args.logprobs, "truncate": args.truncate, "request_id": args.request_id,
        "ignore_eos": args.ignore_eos, "context": args.context,
    }
    if args.no_stream:
        result = client.generate(prompt, **params)
        if args.json:
            print(json.dumps(_result_json(result)))
        else:
            sys.stdout.write(result.text)
    elif args.json:
        with client.generate_stream(prompt, **params) as stream:
            result = stream.collect()
        print(json.dumps(_result_json(result)))
    else:
        result = None
        with client.generate_stream(prompt, **params) as stream:
            for ev in stream:
                if isinstance(ev, TextChunk | Finished) and ev.text:
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                if isinstance(ev, PrefillProgress) and args.stats:
                    print(f"[prefill {ev.done_tokens}/{ev.total_tokens}]", file=sys.stderr)
                if isinstance(ev, Finished):
                    result = ev
        if result is not None and args.stats:
            print(f"\n[finish={result.finish_reason.value} prompt={result.usage.prompt_tokens} "
                  f"cached={result.usage.cached_tokens} generated={result.usage.generated_tokens} "
                  f"ttft={result.timings.first_token_seconds:.3f}s "
                  f"total={result.timings.total_seconds:.3f}s]", file=sys.stderr)
    if not args.json and sys.stdout.isatty():
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def _read_token_ids(path: Path) -> list[int]:
    """A JSON list of token ids, or an object with "token_ids" (what `tokenize --json` prints)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _CliError(f"{path}: not JSON ({e})") from None
    if isinstance(data, dict):
        data = data.get("token_ids")
    if not isinstance(data, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in data):
        raise _CliError(f"{path}: expected a JSON list of token ids or {{\"token_ids\": [...]}}")
    return data


class _Progress:
    """Prefill progress on stderr (the server reports it every engine step): on a terminal one line rewritten
    in place at most 10 times a second, otherwise a line at most once a second."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.interval = 0.1 if self.tty else 1.0
        self.last = -math.inf
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and done < total:
            return
        self.last = now
        line = f"[prefill {done}/{total} tokens]"
        sys.stderr.write(f"\r{line}" if self.tty else f"{line}\n")
        sys.stderr.flush()
        self.shown = True

    def end(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\n")


def _context(client: Client, args: argparse.Namespace) -> int:
    if args.context_command == "create":
        prompt: str | list[int]
        if args.tokens_file is not None:
            if args.text is not None or args.stdin or args.file is not None:
                raise _CliError("give exactly one input: an argument, --stdin (or '-'), --file or --tokens-file")
            prompt = _read_token_ids(args.tokens_file)
        else:
            prompt = _read_input(args.text, args.stdin, args.file)
        progress = None if args.quiet else _Progress()
        try:
            ctx = client.create_context(prompt, ttl_seconds=args.ttl, on_progress=progress)
        finally:
            if progress is not None:
                progress.end()
        print(json.dumps(asdict(ctx)) if args.json else ctx.context_id)
    elif args.context_command == "list":
        contexts = client.list_contexts()
        if args.json:
            print(json.dumps({"contexts": [asdict(c) for c in contexts]}))
        else:
            print(f"{'ID':<36} {'TOKENS':>8} {'CACHE BYTES':>14} {'EXPIRES IN':>10} {'ACTIVE':>6}")
            for c in contexts:
                print(f"{c.context_id:<36} {c.prompt_tokens:>8} {c.cache_bytes:>14,} "
                      f"{c.expires_in_seconds:>9.0f}s {c.active_requests:>6}")
    else:
        active = client.delete_context(args.context_id)
        if args.json:
            print(json.dumps({"context_id": args.context_id, "active_requests": active}))
        else:
            print(f"deleted {args.context_id}" + (f" ({active} requests still generating on it finish first)"
                                                   if active else ""))
    return 0


def _info(client: Client, args: argparse.Namespace) -> int:
    info = client.model_info(timeout=args.timeout)
    if args.json:
        out = asdict(info)
        out.pop("extra", None)
        print(json.dumps(out))
        return 0
    c, lim = info.config, info.limits
    print(f"model:        {info.model_name} ({info.num_parameters:,} parameters, {info.backend}, {info.device}, "
          f"{info.dtype})")
    print(f"layers:       {', '.join(c.attn_layers)}; hidden {c.hidden_size}, {c.num_attention_heads} heads x "
          f"{c.attention_head_size}; {c.num_hashes} hash rounds, {c.num_buckets} buckets")
    tok = info.tokenizer
    print(f"tokenizer:    {tok.kind or 'unknown'}{f' ({tok.file})' if tok.file else ''}, {tok.vocab_size} tokens"
          f"{'; token ids only, text is refused' if tok.kind == 'none' else ''}")
    print(f"context:      {lim.max_context} tokens; max_new_tokens <= {lim.max_new_tokens}")
    print(f"batching:     {lim.max_batch} running, {lim.max_queue} waiting, cache budget "
          f"{lim.cache_memory_bytes:,} bytes")
    if lim.context_memory_bytes:
        print(f"contexts:     up to {lim.context_memory_bytes:,} bytes; ttl {lim.default_context_ttl_seconds:g}s by "
              f"default, at most {lim.max_context_ttl_seconds:g}s; prefix caching "
              f"{'on' if lim.prefix_caching else 'off'}")
    else:
        print("contexts:     off")
    print(f"rotations:    {info.rotation_fingerprint}")
    print(f"server:       {info.server_version}")
    return 0


def _health(client: Client, args: argparse.Namespace) -> int:
    status = client.health(args.service, timeout=args.timeout)
    print(json.dumps({"status": status.value}) if args.json else status.value)
    return 0 if status is HealthStatus.SERVING else 1


def _tokenize(client: Client, args: argparse.Namespace) -> int:
    ids = client.tokenize(_read_input(args.text, args.stdin, args.file), timeout=args.timeout)
    print(json.dumps({"token_ids": ids}) if args.json else " ".join(map(str, ids)))
    return 0


_COMMANDS = {"generate": _generate, "context": _context, "info": _info, "health": _health, "tokenize": _tokenize}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _client(args) as client:
            return _COMMANDS[args.command](client, args)
    except ValueError as e:  # e.g. a token refused on a plaintext channel to a remote target
        print(f"reformer-client: error: {e}", file=sys.stderr)
        return 2
    except _CliError as e:
        parser.print_usage(sys.stderr)
        print(f"reformer-client: error: {e}", file=sys.stderr)
        return 2
    except ReformerError as e:
        print(f"reformer-client: error: {e}".replace("\n", " "), file=sys.stderr)
        return next((code for cls, code in EXIT_CODES if isinstance(e, cls)), 1)
    except OSError as e:  # unreadable --file / certificate
        print(f"reformer-client: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
