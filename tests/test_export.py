"""Export path: graphs written to disk, reloaded (TorchScript, ONNX Runtime, torch.export) and compared with eager."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest
import torch

from reformer_infer import ReformerCache, ReformerConfig, ReformerLM, save_model
from reformer_infer.engine import Engine, EngineConfig
from reformer_infer.export import export_model, main, verify_export
from reformer_infer.exported import ExportedModel, ExportedModelError, load_exported
from reformer_infer.generation import generate
from reformer_infer.requests import SamplingParams, TokenEvent

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
for name in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo", "torch.fx.experimental"):
    logging.getLogger(name).setLevel(logging.ERROR)

BASE = dict(
    hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=64, axial_pos_shape=[16, 16],
    axial_pos_embds_dim=[16, 16], max_position_embeddings=256, num_hashes=2, hash_seed=3, vocab_size=258,
)
CONFIGS = {
    # LSH chunk = lcm: prompts up to one chunk are the dense regime; factorised buckets
    "mixed": dict(attn_layers=["local", "lsh", "local", "lsh"], lsh_attn_chunk_length=8, local_attn_chunk_length=4,
                  num_buckets=[2, 4]),
    # lcm 12 > LSH chunk 4: a 5-token prompt is padded to 12 and hashed; local layer last
    "lsh_first": dict(attn_layers=["lsh", "local"], lsh_attn_chunk_length=4, local_attn_chunk_length=6, num_buckets=4),
    "lsh_only": dict(attn_layers=["lsh", "lsh"], lsh_attn_chunk_length=8, local_attn_chunk_length=8, num_buckets=4),
    "local_only": dict(attn_layers=["local", "local"], lsh_attn_chunk_length=8, local_attn_chunk_length=4,
                       num_buckets=4),
}
# every config in TorchScript (fast to write); ONNX and .pt2 on the layouts that differ for them (zero-size
# local or LSH stacks); ONNX export takes tens of seconds per graph on a small machine, hence `slow` marks
CASES = [(c, "torchscript") for c in CONFIGS] + [
    ("mixed", "onnx"),
    pytest.param("lsh_only", "onnx", marks=pytest.mark.slow),
    pytest.param("local_only", "onnx", marks=pytest.mark.slow),
    pytest.param("mixed", "pt2", marks=pytest.mark.slow),
]


def tiny(name: str) -> ReformerLM:
    torch.manual_seed(1)  # a seed whose greedy continuation of the server test's prompt is not one repeated byte
    model = ReformerLM(ReformerConfig(**BASE, **CONFIGS[name])).eval()
    with torch.no_grad():  # larger matrices than the init: greedy paths that move from token to token
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """(config, format) -> (eager model, export dir); each export written once per module."""
    made: dict[tuple[str, str], tuple[ReformerLM, Path]] = {}

    def get(name: str, fmt: str) -> tuple[ReformerLM, Path]:
        if (name, fmt) not in made:
            model = tiny(name)
            out = tmp_path_factory.mktemp(f"{name}-{fmt}")
            export_model(model, out, fmt)
            made[name, fmt] = (model, out)
        return made[name, fmt]

    return get


@pytest.mark.parametrize("name,fmt", CASES)
def test_reloaded_graphs_match_eager_prefill_decode_and_greedy(exported, name: str, fmt: str) -> None:
    model, out = exported(name, fmt)
    checks = verify_export(model, out, fmt, new_tokens=12)
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    assert not failed, failed
    names = " ".join(c.name for c in checks)
    assert "greedy" in names and "batched decode" in names and "prefill logits" in names
    if fmt == "onnx":
        assert "onnx.checker" in names


def test_onnx_inputs_keep_symbolic_batch_length_pool_rows_and_slots(exported) -> None:
    import onnx

    _, out = exported("mixed", "onnx")
    for fname, want in (("prefill.onnx", {"input_ids": [0, 1]}),
                        ("decode.onnx", {"input_ids": [0], "keys": [2], "local_keys": [1], "len_d": [0]})):
        proto = onnx.load(str(out / fname))
        onnx.checker.check_model(proto, full_check=True)
        dims = {i.name: i.type.tensor_type.shape.dim for i in proto.graph.input}
        for inp, axes in want.items():
            assert all(dims[inp][a].dim_param for a in axes), (fname, inp, dims[inp])


@pytest.mark.parametrize("prompt_len", [6, 8])  # below one LSH chunk, and exactly one (prefilled un-hashed)
def test_decode_graph_crosses_dense_to_hashed_like_eager(exported, prompt_len: int) -> None:
    model, out = exported("mixed", "torchscript")
    em = ExportedModel(out, "torchscript")
    ids = torch.randint(3, 258, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    ref_logits, ref = model.prefill(ids)
    got_logits, got = em.prefill(ids)
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert got.sequences[0].sorted_positions(1) is None  # left dense, as the eager prefill leaves it
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        tok = torch.randint(3, 258, (1, 1), generator=g)
        a, _ = model.decode_step(tok, ref)
        b, _ = em.decode_step(tok, got)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        eager_order, order = ref.sequences[0].sorted_positions(1), got.sequences[0].sorted_positions(1)
        assert (order is None) == (eager_order is None)
        if order is not None:
            assert torch.equal(order, eager_order)
            assert torch.equal(got.sequences[0].bucket_counts(1), ref.sequences[0].bucket_counts(1))
    assert got.lengths == ref.lengths


def test_engine_streams_the_same_greedy_tokens_from_onnx_as_eager_generate(exported) -> None:
    model, out = exported("mixed", "onnx")
    em = load_exported(out, "onnx")
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 258) for _ in range(n)] for n in (5, 8, 19, 33)]

    async def go() -> list[list[int]]:
        engine = Engine(em, EngineConfig(max_batch=3, prefill_chunk_tokens=16))
        engine.start()
        streams = [engine.add_request(p, SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True))
                   for p in prompts]
        async def collect(stream) -> list:
            return [ev async for ev in stream]

        events = await asyncio.gather(*(collect(s) for s in streams))
        assert engine.stats().cache_bytes_in_use == 0
        await engine.shutdown()
        return [[t for ev in evs if isinstance(ev, TokenEvent) for t in ev.token_ids] for evs in events]

    streamed = asyncio.run(go())
    for p, toks in zip(prompts, streamed, strict=True):
        assert toks == list(generate(model, p, 10, temperature=0.0))
    assert len({t for toks in streamed for t in toks}) > 4  # the greedy paths are not one repeated token


def test_generate_runs_on_an_exported_model_and_gives_its_state_back(exported) -> None:
    """`generate` releases its cache at the end, whatever the backend: an exported model's sequences
    release their tensors (they raised AttributeError before)."""
    model, out = exported("mixed", "torchscript")
    em = ExportedModel(out, "torchscript")
    prompt = list(range(5, 25))
    assert list(generate(em, prompt, 6, temperature=0.0)) == list(generate(model, prompt, 6, temperature=0.0))
    _, cache = em.prefill(torch.tensor([prompt]))
    assert cache.nbytes > 0
    cache.release()
    cache.release()
    assert cache.nbytes == 0


def test_batched_decode_of_one_pool_equals_eager_batch(exported) -> None:
    """Sequences of different lengths in one pool decode in one decode-graph call per step."""
    model, out = exported("lsh_first", "torchscript")
    em = ExportedModel(out, "torchscript")
    lengths = [2, 5, 13, 30]  # dense, hashed below one LSH chunk's lcm, padded, exact
    ref_pool, got_pool = model.new_decode_pool(4), em.new_decode_pool(4)
    ref_caches, got_caches = [], []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, 258, (1, n), generator=torch.Generator().manual_seed(i))
        ref_caches.append(model.prefill(ids, pool=ref_pool)[1])
        got_caches.append(em.prefill(ids, pool=got_pool)[1])
    ref, got = ReformerCache.batch(ref_caches), ReformerCache.batch(got_caches)
    for step in range(8):
        toks = torch.tensor([[(11 * step + i) % 250 + 3] for i in range(len(lengths))])
        torch.testing.assert_close(em.decode_step(toks, got)[0], model.decode_step(toks, ref)[0], atol=1e-4, rtol=1e-4)
    assert got.lengths == [n + 8 for n in lengths]
    assert got.nbytes > 0


def test_cli_writes_graphs_and_exits_nonzero_when_parity_fails(tmp_path: Path, capsys) -> None:
    save_model(tiny("lsh_first"), tmp_path / "m")
    assert main(["--model", str(tmp_path / "m"), "--format", "torchscript", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "prefill.pt").exists() and (tmp_path / "o" / "decode.pt").exists()
    assert (tmp_path / "o" / "export.json").exists() and (tmp_path / "o" / "config.json").exists()
    # a tolerance no float result can meet: the logit checks fail and the CLI says so
    code = main(["--model", str(tmp_path / "m"), "--format", "torchscript", "--out", str(tmp_path / "o"),
                 "--tol", "-1"])
    assert code == 1
    assert "parity FAILED" in capsys.readouterr().err


def test_exported_backend_refuses_what_it_cannot_serve(exported, tmp_path: Path) -> None:
    _, out = exported("mixed", "torchscript")
    with pytest.raises(ExportedModelError, match="no onnx graphs"):
        ExportedModel(out, "onnx")
    with pytest.raises(ExportedModelError, match="float32"):
        load_exported(out, "torchscript", dtype="bfloat16")
    with pytest.raises(ExportedModelError, match="export.json"):
        ExportedModel(tmp_path, "torchscript")


def test_server_streams_the_same_greedy_tokens_from_every_backend(exported, tmp_path: Path) -> None:
    """In-process server over eager, TorchScript and ONNX directories; the backend label reaches the metrics.
    The exported backends are registered through `reformer_server.backend.register_backend` with
    `reformer_infer.exported.load_exported`, which is all the server needs for `--backend torchscript|onnx`."""
    import grpc
    from reformer_server import backend as backends
    from reformer_server._proto import generation_pb2 as pb
    from reformer_server._proto import generation_pb2_grpc as pb_grpc
    from server_fixtures import start_in_process

    from reformer_infer.tokenizer import ByteTokenizer

    for kind in ("torchscript", "onnx"):
        if kind not in backends.backend_names():
            backends.register_backend(kind, lambda d, dev, dt, k=kind: load_exported(d, k, dev, dt))
    model, onnx_dir = exported("mixed", "onnx")
    _, ts_dir = exported("mixed", "torchscript")
    save_model(model, tmp_path / "eager")
    text = "It is a truth universally acknowledged"
    expected = list(generate(model, ByteTokenizer().encode(text), 12, temperature=0.0))

    async def serve(backend: str, model_dir: Path) -> list[int]:
        srv = await start_in_process(model_dir, "--backend", backend)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = pb_grpc.TextGenerationStub(ch)
                request = pb.GenerateRequest(text=text, max_new_tokens=12, temperature=0.0, ignore_eos=True)
                streamed = [t async for msg in stub.GenerateStream(request) for t in msg.token_ids]
                info = await stub.GetModelInfo(pb.GetModelInfoRequest())
                assert info.backend == backend
            assert srv.metrics.registry.get_sample_value(
                "reformer_e2e_request_latency_seconds_count", {"model": model_dir.name, "backend": backend}) == 1
            return streamed
        finally:
            await srv.close()

    assert len(set(expected)) > 3
    for backend, model_dir in (("eager", tmp_path / "eager"), ("torchscript", ts_dir), ("onnx", onnx_dir)):
        assert asyncio.run(serve(backend, model_dir)) == expected, backend
