"""The server assembled in-process (ReformerServer on this event loop), for what a subprocess cannot show:
a fault injected into one request through the engine's fault hook."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import grpc
import pytest
import torch
from reformer_server._proto import generation_pb2 as pb
from reformer_server._proto import generation_pb2_grpc as pb_grpc
from reformer_server.config import parse_config
from reformer_server.server import ReformerServer
from server_fixtures import start_in_process, tiny_model_dir  # noqa: F401


def test_out_of_memory_in_one_request_spares_the_others(tiny_model_dir: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        srv = await start_in_process(tiny_model_dir, "--cache-memory", "64MiB")

        def hook(phase: str, request_id: str | None) -> None:
            if phase == "prefill" and request_id == "oom-me":
                raise torch.OutOfMemoryError("injected: CUDA out of memory")

        srv.engine.fault_hook = hook
        # startup objects were moved out of the cyclic GC once the model was up (no full-GC pauses in steps)
        assert gc.get_freeze_count() > 0
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = pb_grpc.TextGenerationStub(ch)
                healthy = stub.Generate(pb.GenerateRequest(text="fine", max_new_tokens=40, ignore_eos=True))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Generate(pb.GenerateRequest(text="boom", max_new_tokens=5, request_id="oom-me"))
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "out of memory" in e.value.details()
                assert (await healthy).usage.generated_tokens == 40
                after = await stub.Generate(pb.GenerateRequest(text="again", max_new_tokens=3, ignore_eos=True))
                assert after.usage.generated_tokens == 3
            assert srv.engine.stats().cache_bytes_in_use == 0 and srv.engine.stats().alive
            assert srv.metrics.registry.get_sample_value(
                "reformer_grpc_requests_total", {"method": "Generate", "code": "RESOURCE_EXHAUSTED"}) == 1
        finally:
            await srv.close()

    asyncio.run(scenario())


def test_requests_during_loading_are_unavailable(tiny_model_dir: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        cfg = parse_config(["--model", str(tiny_model_dir), "--port", "0", "--metrics-port", "-1"], env={})
        srv = ReformerServer(cfg)
        await srv.start()  # bound and answering, model not loaded yet
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = pb_grpc.TextGenerationStub(ch)
                for call in (stub.Generate(pb.GenerateRequest(text="x")), stub.GetModelInfo(pb.GetModelInfoRequest())):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call
                    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details()
        finally:
            await srv.close()

    asyncio.run(scenario())


def test_stream_interval_groups_tokens_in_grpc_messages(tiny_model_dir: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        srv = await start_in_process(tiny_model_dir, "--cache-memory", "64MiB", "--stream-interval", "3")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = pb_grpc.TextGenerationStub(ch)
                request = pb.GenerateRequest(text="grouped", max_new_tokens=20, ignore_eos=True, temperature=0.0)
                counts, tokens = [], []
                async for msg in stub.GenerateStream(request):
                    if msg.token_ids:
                        counts.append(len(msg.token_ids))
                        tokens += list(msg.token_ids)
                # the first message: the first token and any that waited while the writer was busy (timing; the
                # engine's unit test checks the first token alone); then >= 3 a message, the last ones (fewer)
                # with the finish
                assert counts[0] >= 1 and all(c >= 3 for c in counts[1:-1]) and len(counts) <= 1 + -(-19 // 3)
                whole = await stub.Generate(request)  # unary: the same tokens
                assert tokens == list(whole.token_ids) and len(tokens) == 20
        finally:
            await srv.close()

    asyncio.run(scenario())
