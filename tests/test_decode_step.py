"""The decode step as a device would run it: no host sync and fixed shapes while a batch's sequences stay,
one trace for every token (torch.compile fullgraph, no recompile across delta merges), results unchanged."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from reformer_infer import ReformerCache, ReformerConfig, ReformerLM
from reformer_infer.requests import SamplingParams
from reformer_infer.sampling import SlotSampler, download, unpack
from reformer_infer.step_graphs import decode_and_sample

ENWIK8_LAYERS = ["local", "local", "lsh", "local", "local", "local", "lsh", "local", "local", "local", "lsh", "local"]
# ops that wait for the device or copy host values in (a device step must have none)
SYNC_OPS = {"aten::_local_scalar_dense", "aten::lift_fresh", "aten::nonzero", "aten::masked_select",
            "aten::unique", "aten::_unique2", "aten::unique_consecutive", "aten::item"}


def enwik8_layout_model(layers: list[str] = ENWIK8_LAYERS) -> ReformerLM:
    cfg = ReformerConfig(
        attn_layers=layers, hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=64,
        axial_pos_shape=[32, 32], axial_pos_embds_dim=[16, 16], max_position_embeddings=1024,
        lsh_attn_chunk_length=16, local_attn_chunk_length=8, num_buckets=8, num_hashes=2, vocab_size=258,
    )
    torch.manual_seed(0)
    return ReformerLM(cfg).eval()


def prompts(n: int, first: int, stride: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 258, (1, first + stride * i), generator=g) for i in range(n)]


def sampled_rows(n: int) -> tuple[SlotSampler, list[int]]:
    """A sampler with n rows of mixed parameters: greedy, sampled with top-k / top-p, penalised, logprobs."""
    sampler = SlotSampler(n + 1, 258)
    kinds = [dict(temperature=0.0), dict(temperature=0.8, top_k=20, seed=1), dict(temperature=1.1, top_p=0.9, seed=2),
             dict(temperature=0.0, repetition_penalty=1.3, logprobs=2)]
    rows = []
    for i in range(n):
        rows.append(sampler.take_row())
        sampler.join(rows[-1], SamplingParams(**kinds[i % 4]), [65, 66])
    return sampler, rows


def test_batched_steps_with_sampling_have_no_host_sync_and_two_shape_signatures_at_most():
    """The engine's step (`decode_and_sample`: decode, then sampling on the device with mixed greedy, sampled,
    penalised and logprob rows, the sampled ids fed back as the next input) of 16 sequences of different
    lengths (some shorter than one LSH chunk: they cross into LSH windows on the way), 140 tokens: at least
    90% of the steps hold no host sync, and those share at most two shape signatures (with and without a
    sequence still decoding densely). The one download per step comes after the step."""
    model = enwik8_layout_model()
    pool = model.new_decode_pool(16, 16 * 400)
    caches = [model.prefill(ids, capacity=ids.shape[1] + 150, pool=pool)[1].sequences[0]
              for ids in prompts(16, 3, 17)]
    slots = [c.slot for c in caches]
    sampler, rows = sampled_rows(16)
    synced, signatures, tokens = 0, {}, []
    with torch.inference_mode():
        for _ in range(140):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                packed = decode_and_sample(model, pool, slots, sampler, rows)
            ops = [e for e in prof.events() if e.name.startswith("aten::")]
            if any(e.name in SYNC_OPS for e in ops):
                synced += 1
            else:
                sig = tuple((e.name, str(e.input_shapes)) for e in ops)
                signatures[sig] = signatures.get(sig, 0) + 1
            tokens.append(unpack(download(packed), sampler.wants(rows)).tokens)
    assert synced <= 14, synced
    assert len(signatures) <= 2, [len(s) for s in signatures]
    assert any("aten::sort" in {n for n, _ in sig} for sig in signatures)  # the sampling is in the step
    assert min(pool.is_hashed[s] for s in slots)  # every sequence crossed into LSH windows
    assert sampler.next_ids[rows].tolist() == tokens[-1]
    assert len({tuple(t[1::4]) for t in tokens}) > 1  # sampled rows vary


def test_the_sampled_step_compiles_as_one_graph_and_replays_across_merges():
    """`decode_core` and the sampling after it (the step `StepGraphs` records) trace whole (fullgraph) and,
    once warm, are not traced again over 200 tokens that cross several delta merges (delta of 16 entries);
    the tokens equal those of the eager step (`decode_and_sample`) on a second pool with the same seeds."""
    model = enwik8_layout_model(["local", "lsh", "local", "lsh"])
    pools = [model.new_decode_pool(4, 4 * 400, delta_size=16) for _ in range(2)]
    caches = [[model.prefill(ids, capacity=ids.shape[1] + 210, pool=pool)[1] for ids in prompts(4, 20, 23)]
              for pool in pools]
    traces = []

    def backend(gm, example_inputs):
        traces.append(gm)
        return gm.forward

    def step(pool, plan, sampler, rows_t, mode):
        return sampler.sample(model.decode_core(sampler.next_input(rows_t), pool, plan), rows_t, mode)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    (sampler, rows), (ref_sampler, ref_rows) = sampled_rows(4), sampled_rows(4)
    pool, ref_pool = pools
    slots, ref_slots = ([c.sequences[0].slot for c in cs] for cs in caches)
    rows_t = sampler.rows_tensor(rows)
    mode = sampler.mode(rows)
    merges = 0
    with torch.inference_mode():
        for i in range(200):
            if i == 2:
                warm = len(traces)  # the first call creates the step's scratch buffers: traced twice
            static_before = [pool.static_len[s] for s in slots]
            plan = pool.begin_step(slots)
            got = compiled(pool, plan, sampler, rows_t, mode)
            assert not pool.end_step(plan, slots)  # all hashed already: nothing to do between steps
            merges += sum(pool.static_len[s] != b for s, b in zip(slots, static_before, strict=True))
            want = decode_and_sample(model, ref_pool, ref_slots, ref_sampler, ref_rows)
            assert torch.equal(got[:, :1], want[:, :1]), i  # the tokens
            lp, ref_lp = (unpack(t, [2] * 4).logprobs[3] for t in (got, want))  # row 3 asks for logprobs
            assert lp.top[0][0] == ref_lp.top[0][0] and abs(lp.logprob - ref_lp.logprob) <= 1e-5, i
    assert merges >= 4 * 12
    assert len(traces) == warm <= 2


def test_half_precision_decode_keeps_fp32_softmax_accumulators():
    """Stored in bf16 / fp16, a model still takes its attention softmax and log-normalisers in fp32: over
    30 greedy steps (the dense-to-LSH transition included) its logits stay within a few hundredths of the
    fp32 model's (in bf16 scores and normalisers, the tiny model drifted to 0.45) and its argmax agrees."""
    from test_pool import ids_of, tiny_model

    ref = tiny_model()
    for dtype, bound in ((torch.bfloat16, 0.05), (torch.float16, 0.01)):
        model = tiny_model().to(dtype)
        with torch.inference_mode():
            got, cache = model.prefill(ids_of(6, seed=1))
            want, ref_cache = ref.prefill(ids_of(6, seed=1))
            worst, agree = (got.float() - want).abs().max().item(), 0
            for _ in range(30):
                tok = want[:, -1].argmax(-1, keepdim=True)
                agree += int(got[:, -1].argmax(-1).item() == tok.item())
                got, cache = model.decode_step(tok, cache)
                want, ref_cache = ref.decode_step(tok, ref_cache)
                worst = max(worst, (got.float() - want).abs().max().item())
        assert worst <= bound, (dtype, worst)
        assert agree >= 27, (dtype, agree)


def test_captured_steps_replay_on_static_buffers_like_eager_steps():
    """Steps through `StepGraphs` (with the eager stand-in for a CUDA graph, which checks that no buffer it
    reads moved): batches padded to buckets with the pad slot, sequences joining and leaving, the dense
    variant and the dense-to-LSH transition, a pool that grows (every recording is dropped and made again).
    Logits equal plain eager steps; the pad slot never shows in the slots or pages in use."""
    from reformer_infer.step_graphs import EagerReplay

    model = enwik8_layout_model(["local", "lsh", "local", "lsh"])
    pool = model.new_decode_pool(8, 8 * 300, delta_size=8)
    graphs = model.use_step_graphs(pool, capture=EagerReplay)
    ids = prompts(6, 5, 9)  # 5..50 tokens: some dense, some hashed (chunk 16)
    got = [model.prefill(x, capacity=x.shape[1] + 60, pool=pool)[1] for x in ids]
    ref = [model.prefill(x)[1] for x in ids]
    g = torch.Generator().manual_seed(3)
    live = list(range(6))
    for step in range(40):
        if step == 10:
            live = [0, 2, 3, 5]  # two leave: a bucket of 4
        if step == 20:
            got[1].release()
            extra = prompts(1, 70, 1)[0]  # a new sequence, past what the pool held: it grows
            got[1] = model.prefill(extra, capacity=200, pool=pool)[1]
            ref[1] = model.prefill(extra)[1]
            live = [0, 1, 2, 3, 5]  # a bucket of 8 with 3 pad rows
        tok = torch.randint(3, 258, (len(live), 1), generator=g)
        a, _ = model.decode_step(tok, ReformerCache([got[i].sequences[0] for i in live]))
        for r, i in enumerate(live):
            b, _ = model.decode_step(tok[r : r + 1], ref[i])
            assert (a[r] - b[0]).abs().max().item() <= 1e-5, (step, i)
    assert graphs.captures >= 4  # buckets 8 and 4, dense and not, again after the pool grew
    assert pool.slots_in_use == 6
    for c in got:
        c.release()
    assert pool.slots_in_use == 0 and pool.pages_in_use == 0


def test_a_captured_step_refuses_moved_buffers():
    """The stand-in replay fails loudly where a CUDA graph would read freed memory: a pool reallocated
    behind its back."""
    import pytest

    from reformer_infer.step_graphs import EagerReplay, StepGraphs

    model = enwik8_layout_model(["local", "lsh"])
    pool = model.new_decode_pool(2, 64)
    _, cache = model.prefill(prompts(1, 20, 1)[0], capacity=30, pool=pool)
    graphs = StepGraphs(model, pool, capture=EagerReplay)
    slot = cache.sequences[0].slot
    _, plan = graphs.run(torch.tensor([7]), [slot])
    model.finish_step(pool, plan, [slot])
    (replay, _), = graphs._graphs.values()
    pool._alloc_pages(2 * pool.N)  # the pool moves: a graph recorded before must not replay
    with pytest.raises(RuntimeError, match="moved buffers"):
        replay()


def test_captured_sampled_steps_replay_like_eager_steps():
    """The engine's step through `StepGraphs.run_sampled` (decode and sampling recorded together, with the
    eager stand-in that refuses moved buffers) samples the tokens of the eager step from the same seeds:
    batches padded to buckets (the pad slot and the sampler's pad row), rows joining and leaving, steps whose
    rows are all greedy (argmax only) and steps with sampled rows (a recording per mode), the dense-to-LSH
    transition, a sampler that grows (every recording is dropped and made again)."""
    from reformer_infer.step_graphs import EagerReplay

    model = enwik8_layout_model(["local", "lsh", "local", "lsh"])
    ids = prompts(6, 5, 9)  # 5..50 tokens: some dense, some hashed (chunk 16)
    runs = []
    for captured in (True, False):
        pool = model.new_decode_pool(8, 8 * 300, delta_size=8)
        graphs = model.use_step_graphs(pool, capture=EagerReplay) if captured else None
        sampler = SlotSampler(4, 258)
        slots = [model.prefill(x, capacity=x.shape[1] + 60, pool=pool)[1].sequences[0].slot for x in ids]
        rows = []
        for i in range(6):
            rows.append(sampler.take_row())
            params = SamplingParams(temperature=0.0) if i < 3 else SamplingParams(temperature=0.9, top_k=30, seed=i)
            sampler.join(rows[-1], params, [])
        out = []
        with torch.inference_mode():
            for step in range(30):
                live = [0, 1, 2] if step < 8 else [0, 2, 3, 5] if step < 20 else [0, 1, 2, 3, 4, 5]
                packed = decode_and_sample(model, pool, [slots[i] for i in live], sampler, [rows[i] for i in live],
                                           graphs)
                out.append(packed[:, 0].tolist())
        runs.append((out, graphs, sampler))
    (got, graphs, sampler), (want, _, _) = runs
    assert got == want
    assert graphs.captures >= 4  # bucket 4 greedy (all greedy rows), 4 and 8 sampled, dense and not
    assert sampler.generation == 2 and sampler.pad_row() not in range(6)  # grew for the 5th row


def test_compiled_cpu_step_equals_the_eager_step(tmp_path, monkeypatch):
    """The CPU recorder `step_graphs.aoti_capture` (`EngineConfig.compile_step`: the step exported and compiled
    ahead of time by AOTInductor, writing the pool and the sampler in place) decodes what the eager step
    decodes: a greedy sequence with logprobs and a seeded top-k sampled one (bucket 2), 40 tokens across
    several delta merges (delta of 8 entries) with both LSH and local layers writing every step: the same
    tokens and the same log-probabilities within 1e-4, one compile. A second recording of the same step (a new
    pool of the same layout) loads the package from the compile cache instead of compiling it again, and
    decodes the same tokens, and reads the model's own weights (a changed bias shows). Skipped without a C++
    compiler."""
    import shutil

    import pytest

    from reformer_infer.step_graphs import aoti_available, aoti_capture

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")) or not aoti_available():
        pytest.skip("no C++ compiler for inductor, or no AOTInductor in this torch")
    monkeypatch.setenv("REFORMER_COMPILE_CACHE_DIR", str(tmp_path))
    model = enwik8_layout_model(["local", "lsh", "local", "lsh"])
    runs = []
    for compiled in (True, False, True):
        if len(runs) == 2:  # the third run: from the cache, or not at all
            assert len(list(tmp_path.glob("step-*.pt2"))) == len(list(tmp_path.iterdir())) == 1

            def no_compile(*args, **kwargs):
                raise AssertionError("compiled again instead of loading the cached package")

            monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compile)
        pool = model.new_decode_pool(3, 3 * 100, delta_size=8)
        graphs = model.use_step_graphs(pool, capture=aoti_capture) if compiled else None
        slots = [model.prefill(x, capacity=x.shape[1] + 45, pool=pool)[1].sequences[0].slot
                 for x in prompts(2, 17, 6)]  # past one LSH chunk (16): hashed from the start
        sampler = SlotSampler(3, 258)
        rows = []
        for params in (SamplingParams(temperature=0.0, logprobs=1),
                       SamplingParams(temperature=0.9, top_k=40, seed=7, logprobs=1)):
            rows.append(sampler.take_row())
            sampler.join(rows[-1], params, [])
        merges, out = 0, []
        with torch.inference_mode():
            for _ in range(40):
                before = [pool.static_len[s] for s in slots]
                packed = decode_and_sample(model, pool, slots, sampler, rows, graphs)
                got = unpack(download(packed), sampler.wants(rows))
                out.append((got.tokens, [lp.logprob for lp in got.logprobs]))
                merges += sum(pool.static_len[s] != b for s, b in zip(slots, before, strict=True))
        runs.append((out, graphs, merges))
    # the packages read the model's own weights (not a copy): a bias pushed up now wins the greedy row
    with torch.no_grad():
        model.lm_head.bias[42] += 1e4
    with torch.inference_mode():
        assert decode_and_sample(model, pool, slots, sampler, rows, runs[2][1])[0, 0] == 42
    (got, graphs, merges), (want, _, _), (cached, _, _) = runs
    assert merges >= 6
    assert [t for t, _ in got] == [t for t, _ in want] == [t for t, _ in cached]
    assert len({t[1] for t, _ in got}) > 5  # the sampled row varies
    assert max(abs(a - b) for (_, la), (_, lb) in zip(got, want, strict=True) for a, b in zip(la, lb, strict=True)) <= 1e-4
    assert graphs.captures == 1


def test_compile_cache_key_follows_the_program_not_the_input_values():
    """`step_graphs.program_key` (the compile cache's key) is the same for two exports of one step whatever the
    pool and sampler hold (values change every token), and changes with a weight, the sampling mode and the
    pool's layout (shapes)."""
    from reformer_infer.step_graphs import StepModule, program_key

    def key(model, temperature=0.0, pages=300, fill=0):
        pool = model.new_decode_pool(3, pages, delta_size=8)
        pool.keys.fill_(fill)
        sampler = SlotSampler(3, 258)
        rows = [sampler.take_row() for _ in range(2)]
        for r in rows:
            sampler.join(r, SamplingParams(temperature=temperature), [])  # unseeded: random seeds each time
        module = StepModule(model, pool, 0, sampler, sampler.mode(rows))
        with torch.no_grad():
            program = torch.export.export(module, (torch.tensor(rows), torch.tensor([0, 1]), *pool.state(),
                                                   *sampler.buffers()))
        return program_key(program)

    model = enwik8_layout_model(["local", "lsh"])
    base = key(model)
    assert key(model, fill=1) == base  # other values, same program
    assert key(model, temperature=0.5) != base  # another sampling mode
    assert key(model, pages=600) != base  # another pool layout
    with torch.no_grad():
        model.lm_head.decoder.weight[0, 0] += 1.0
    assert key(model) != base  # another weight
