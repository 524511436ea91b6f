"""Context caching over gRPC (issue 19), with the server assembled in-process: CreateContext (progress, then the
context; cancellable), Generate on a context (== the library's prefill + decode steps), Delete/List, owners,
the error codes, limits in GetModelInfo and the metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch
from reformer_server._proto import generation_pb2 as pb
from reformer_server._proto import generation_pb2_grpc as pb_grpc
from reformer_server.server import ReformerServer
from server_fixtures import start_in_process, tiny_model_dir  # noqa: F401

from reformer_infer import load_model


def reference(model, context: list[int], tail: list[int], n: int) -> list[int]:
    """prefill(context), then decode_step over the prompt and each generated token (greedy)."""
    logits, cache = model.prefill(torch.tensor([context]))
    last = logits[0, -1]
    with cache:
        got = []
        for t in tail + [None] * n:
            if t is None:
                t = int(last.argmax())
                got.append(t)
            out, _ = model.decode_step(torch.tensor([[t]]), cache)
            last = out[0, -1]
    return got


async def start(model_dir: Path, *flags: str) -> ReformerServer:
    return await start_in_process(model_dir, "--cache-memory", "64MiB", "--priority-tokens", "alice,bob", *flags)


def auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def create(stub: pb_grpc.TextGenerationStub, token: str = "alice", **kw) -> list[pb.CreateContextResponse]:
    return [m async for m in stub.CreateContext(pb.CreateContextRequest(**kw), metadata=auth(token))]


async def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value.code()


def test_contexts_over_grpc(tiny_model_dir: Path) -> None:  # noqa: F811
    model = load_model(tiny_model_dir)
    doc = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 3

    async def scenario() -> None:
        srv = await start(tiny_model_dir, "--prefill-chunk-tokens", "64", "--context-memory", "700000",
                          "--max-context-ttl", "100", "--default-context-ttl", "50")
        engine, reg = srv.engine, srv.metrics.registry
        ctx_ids = engine.tokenizer.encode(doc)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = pb_grpc.TextGenerationStub(ch)
                limits = (await stub.GetModelInfo(pb.GetModelInfoRequest())).limits
                assert limits.context_memory_bytes == 700000 and limits.prefix_caching
                assert limits.max_context_ttl_seconds == 100 and limits.default_context_ttl_seconds == 50

                msgs = await create(stub, text=doc)
                last = msgs[-1]
                assert all(m.context_id == last.context_id for m in msgs)
                assert any(m.HasField("prefill_progress") for m in msgs[:-1])  # 276 tokens, chunks of 64
                assert last.prompt_tokens == len(ctx_ids) and last.ttl_seconds == 50
                assert last.cache_bytes == model.cache_bytes(len(ctx_ids))
                assert reg.get_sample_value("reformer_contexts") == 1
                assert reg.get_sample_value("reformer_context_cache_bytes") == last.cache_bytes
                cid = last.context_id

                # text, token ids and an empty prompt on the context: the library's contract
                tail = engine.tokenizer.encode(" And so")
                for req, t in ((pb.GenerateRequest(context_id=cid, text=" And so"), tail),
                               (pb.GenerateRequest(context_id=cid, token_ids=[40, 50, 60]), [40, 50, 60]),
                               (pb.GenerateRequest(context_id=cid), [])):
                    req.max_new_tokens, req.temperature, req.ignore_eos = 8, 0.0, True
                    resp = await stub.Generate(req, metadata=auth("alice"))
                    assert list(resp.token_ids) == reference(model, ctx_ids, t, 8)
                    assert resp.usage.cached_tokens == len(ctx_ids)
                    assert resp.usage.prompt_tokens == len(ctx_ids) + len(t)
                # automatic reuse: the same document as a plain prompt (same caller)
                resp = await stub.Generate(pb.GenerateRequest(text=doc + " And so", max_new_tokens=8, temperature=0.0,
                                                              ignore_eos=True), metadata=auth("alice"))
                assert resp.usage.cached_tokens == len(ctx_ids)
                assert list(resp.token_ids) == reference(model, ctx_ids, tail, 8)
                assert reg.get_sample_value("reformer_prefix_cache_hits_total") == len(ctx_ids)
                assert reg.get_sample_value("reformer_prefix_cache_queries_total") == len(ctx_ids) + len(tail)

                # another caller sees nothing of it
                listed = await stub.ListContexts(pb.ListContextsRequest(), metadata=auth("bob"))
                assert len(listed.contexts) == 0
                for call in (stub.Generate(pb.GenerateRequest(context_id=cid, text="x"), metadata=auth("bob")),
                             stub.DeleteContext(pb.DeleteContextRequest(context_id=cid), metadata=auth("bob")),
                             stub.Generate(pb.GenerateRequest(context_id="ctx-unknown", text="x"),
                                           metadata=auth("alice"))):
                    assert await code_of(call) == grpc.StatusCode.NOT_FOUND
                listed = await stub.ListContexts(pb.ListContextsRequest(), metadata=auth("alice"))
                assert [c.context_id for c in listed.contexts] == [cid]
                assert 0 < listed.contexts[0].expires_in_seconds <= 50

                # errors: bad ttl, too long, the context memory cap
                assert await code_of(create(stub, text="abc", ttl_seconds=1000)) == grpc.StatusCode.INVALID_ARGUMENT
                assert await code_of(create(stub, text="abc", ttl_seconds=-1)) == grpc.StatusCode.INVALID_ARGUMENT
                assert await code_of(stub.Generate(pb.GenerateRequest(context_id=cid, text="x", max_new_tokens=1000),
                                                   metadata=auth("alice"))) == grpc.StatusCode.INVALID_ARGUMENT
                assert await code_of(create(stub, token_ids=[5] * 1000)) == grpc.StatusCode.RESOURCE_EXHAUSTED

                # cancelling CreateContext frees everything
                call = stub.CreateContext(pb.CreateContextRequest(token_ids=[7] * 700), metadata=auth("alice"))
                first = await call.read()
                assert first.HasField("prefill_progress")
                call.cancel()
                await asyncio.sleep(0.2)
                assert engine.stats().cache_bytes_in_use == last.cache_bytes  # only the first context

                # delete: NOT_FOUND afterwards, every byte back
                deleted = await stub.DeleteContext(pb.DeleteContextRequest(context_id=cid), metadata=auth("alice"))
                assert deleted.active_requests == 0
                assert await code_of(stub.DeleteContext(pb.DeleteContextRequest(context_id=cid),
                                                        metadata=auth("alice"))) == grpc.StatusCode.NOT_FOUND
                await asyncio.sleep(0.1)
                assert engine.stats().cache_bytes_in_use == 0 and engine._pool.pages_in_use == 0
                assert reg.get_sample_value("reformer_contexts") == 0
                assert reg.get_sample_value("reformer_context_cache_bytes") == 0
        finally:
            await srv.close()

    asyncio.run(scenario())


def test_contexts_off_is_failed_precondition(tiny_model_dir: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        srv = await start(tiny_model_dir, "--context-memory", "0", "--no-prefix-caching")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = pb_grpc.TextGenerationStub(ch)
                limits = (await stub.GetModelInfo(pb.GetModelInfoRequest())).limits
                assert limits.context_memory_bytes == 0 and not limits.prefix_caching
                assert await code_of(create(stub, text="abc")) == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            await srv.close()

    asyncio.run(scenario())
