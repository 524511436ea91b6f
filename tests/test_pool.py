"""The pooled decode state: paging, the delta order and its merges, sharing and releasing slots."""

from __future__ import annotations

import pytest
import torch

from reformer_infer import ReformerCache, ReformerConfig, ReformerLM


def tiny_model(**kw) -> ReformerLM:
    cfg = dict(
        attn_layers=["lsh", "local", "lsh"], hidden_size=32, num_attention_heads=2, attention_head_size=16,
        feed_forward_size=64, axial_pos_shape=[16, 16], axial_pos_embds_dim=[16, 16], max_position_embeddings=256,
        lsh_attn_chunk_length=8, local_attn_chunk_length=4, num_buckets=[2, 4], num_hashes=2, vocab_size=258,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    return ReformerLM(ReformerConfig(**cfg)).eval()


def ids_of(T: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 258, (1, T), generator=torch.Generator().manual_seed(seed))


def assert_decode_alike(model: ReformerLM, ref: ReformerCache, got: ReformerCache, steps: int, seed: int) -> None:
    """Both caches take the same random tokens; their logits agree at every step."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tok = torch.randint(3, 258, (1, 1), generator=g)
        a, _ = model.decode_step(tok, ref)
        b, _ = model.decode_step(tok, got)
        assert (a - b).abs().max().item() <= 1e-5


def reference_order(model: ReformerLM, seq, layer: int) -> torch.Tensor:
    """Positions sorted by (bucket, position) from scratch: hash every cached key of the sequence."""
    pool, j = seq.pool, seq.pool.lsh_index[layer]
    L = seq.length
    keys = pool.keys[j].index_select(1, pool._rows(seq.slot, L))
    buckets = model.encoder.layers[layer].attention.self_attention.hash(keys)
    return torch.argsort(buckets * L + torch.arange(L), dim=-1).to(torch.int32)


@pytest.mark.parametrize("prompt_len", [3, 12, 30])
def test_small_pages_and_deltas_decode_like_the_default_pool(prompt_len):
    model = tiny_model()
    ids = ids_of(prompt_len, seed=prompt_len)
    _, ref = model.prefill(ids)
    _, got = model.prefill(ids, pool=model.new_decode_pool(page_size=2, delta_size=2))
    g = torch.Generator().manual_seed(1)
    for _ in range(40):  # crosses pages, merges and (for short prompts) the dense -> LSH transition
        tok = torch.randint(3, 258, (1, 1), generator=g)
        a, ref = model.decode_step(tok, ref)
        b, got = model.decode_step(tok, got)
        assert (a - b).abs().max().item() <= 1e-5
        for layer in (0, 2):
            order = got.sequences[0].sorted_positions(layer)
            if order is not None:
                assert torch.equal(order, reference_order(model, got.sequences[0], layer))
                assert torch.equal(order, ref.sequences[0].sorted_positions(layer))


def test_sequences_share_one_pool_and_give_it_back():
    model = tiny_model()
    pool = model.new_decode_pool(sequences=1, tokens=4, page_size=4, delta_size=3)  # grows for the rest
    caches = [model.prefill(ids_of(T, seed=T), pool=pool)[1] for T in (2, 9, 25, 40)]
    assert pool.slots_in_use == 4 and pool.S >= 4
    batch = ReformerCache.batch(caches)
    singles = [model.prefill(ids_of(T, seed=T))[1] for T in (2, 9, 25, 40)]
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        toks = torch.randint(3, 258, (4, 1), generator=g)
        together, _ = model.decode_step(toks, batch)
        for i, c in enumerate(singles):
            alone, _ = model.decode_step(toks[i : i + 1], c)
            assert (together[i] - alone[0]).abs().max().item() <= 1e-5
    assert batch.nbytes == sum(pool.sequence_bytes(s.slot) for s in batch.sequences)
    pages = pool.pages_in_use
    assert pages >= sum(-(-(T + 10) // 4) for T in (2, 9, 25, 40))
    caches[0].sequences[0].release()
    assert pool.slots_in_use == 3 and pool.pages_in_use < pages
    with batch:  # leaving the block releases every sequence (the one released already too: a no-op)
        pass
    assert pool.slots_in_use == 0 and pool.pages_in_use == 0


def test_a_released_sequence_neither_decodes_nor_frees_its_slots_next_owner():
    model = tiny_model()
    pool = model.new_decode_pool()
    _, old = model.prefill(ids_of(5, seed=0), pool=pool)
    old.release()
    _, new = model.prefill(ids_of(7, seed=1), pool=pool)
    assert new.sequences[0].slot == old.sequences[0].slot  # the slot was given to the next sequence
    old.release()  # a second release of the old one leaves the new owner alone
    assert pool.slots_in_use == 1 and not new.sequences[0].released and old.sequences[0].released
    with pytest.raises(ValueError, match="released"):
        model.decode_step(torch.tensor([[5]]), old)
    model.decode_step(torch.tensor([[5]]), new)
    assert new.lengths == [8]


def test_sequences_of_different_pools_decode_together():
    model = tiny_model()
    a = model.prefill(ids_of(10, seed=1), pool=model.new_decode_pool())[1]
    b = model.prefill(ids_of(20, seed=2), pool=model.new_decode_pool(page_size=8))[1]
    a1 = model.prefill(ids_of(10, seed=1))[1]
    b1 = model.prefill(ids_of(20, seed=2))[1]
    tok = torch.tensor([[7], [9]])
    both, _ = model.decode_step(tok, ReformerCache.batch([a, b]))
    assert (both[0] - model.decode_step(tok[:1], a1)[0][0]).abs().max().item() <= 1e-5
    assert (both[1] - model.decode_step(tok[1:], b1)[0][0]).abs().max().item() <= 1e-5


def test_a_pool_that_grows_between_prefill_units_keeps_the_prefill_right():
    """The pool's tensors move when it grows (more pages or slots); a resumable prefill looks its tables up
    at every unit, so growth between units (another request's allocation) changes nothing."""
    model = tiny_model()
    pool = model.new_decode_pool(sequences=1, tokens=32, page_size=4)
    ids = ids_of(40, seed=5)
    gen = model.prefill_iter(ids, pool=pool, work_tokens=8)
    grown = []
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            _, placed = stop.value
            break
        if len(grown) < 3:  # grow the pool (pages and slots) between units
            n0 = pool.N
            grown.append(model.prefill(ids_of(90, seed=6 + len(grown)), pool=pool)[1])
            assert pool.N > n0
    _, plain = model.prefill(ids)
    assert_decode_alike(model, plain, placed, steps=12, seed=4)


@pytest.mark.parametrize("how", ["closed", "failed"])
def test_a_prefill_that_does_not_finish_gives_its_slot_back(monkeypatch, how):
    model = tiny_model()
    pool = model.new_decode_pool(sequences=2, tokens=128, page_size=4)
    gen = model.prefill_iter(ids_of(40, seed=7), capacity=48, pool=pool, work_tokens=8)
    next(gen)
    assert pool.slots_in_use == 1 and pool.pages_in_use == 12
    if how == "closed":
        gen.close()
    else:
        layer = model.encoder.layers[2].feed_forward

        def boom(x):
            raise RuntimeError("injected")

        monkeypatch.setattr(layer, "forward", boom)
        with pytest.raises(RuntimeError, match="injected"):
            for _ in gen:
                pass
    assert pool.slots_in_use == 0 and pool.pages_in_use == 0


def test_prefill_into_scattered_pages_decodes_the_same():
    model = tiny_model()
    pool = model.new_decode_pool(sequences=12, tokens=4, page_size=4)
    held = [model.prefill(ids_of(7, seed=i), capacity=8, pool=pool)[1] for i in range(12)]  # 2 pages each
    for c in held[::2]:  # every other sequence back: the free pages come in separate pairs
        c.release()
    ids = ids_of(20, seed=9)
    _, placed = model.prefill(ids, capacity=24, pool=pool)
    pages = pool.pages[placed.sequences[0].slot]
    assert pages != list(range(pages[0], pages[0] + len(pages)))  # not one run
    _, plain = model.prefill(ids)
    assert_decode_alike(model, plain, placed, steps=6, seed=8)


def test_window_scores_and_sums_over_table_rows_equal_explicit_math():
    """The LSH decode scores its window by gathering the rows and one bmm, and sums the value rows weighted:
    each equals the textbook q . k and sum of w * v over the same rows."""
    from reformer_infer import model as M

    g = torch.Generator().manual_seed(0)
    table, q = torch.randn(50, 16, generator=g), torch.randn(6, 16, generator=g)
    rows, w = torch.randint(0, 50, (6, 9), generator=g), torch.rand(6, 9, generator=g)
    want_dots = torch.stack([torch.stack([q[b] @ table[r] for r in rows[b]]) for b in range(6)])
    want_sum = torch.stack([sum(w[b, i] * table[rows[b, i]] for i in range(9)) for b in range(6)])
    assert torch.allclose(M._table_dots(q, table, rows), want_dots, atol=1e-5)
    assert torch.allclose(M._table_sum(w, table, rows, {}), want_sum, atol=1e-5)


def test_sequences_with_different_delta_fill_decode_together_like_alone():
    """A step works on the delta entries in use (one more than the fullest sequence's); sequences whose
    deltas hold different numbers of entries decode together exactly as each does alone, and keep their
    true bucket order."""
    model = tiny_model()
    lengths = (5, 9, 40)  # 5: dense until it reaches one chunk (8), then hashed with an empty delta
    ref = [model.prefill(ids_of(T, seed=T))[1] for T in lengths]
    pool = model.new_decode_pool(delta_size=16)
    got = [model.prefill(ids_of(T, seed=T), pool=pool)[1] for T in lengths]
    g = torch.Generator().manual_seed(4)
    for _ in range(6):  # the 40-token sequence runs ahead alone: its delta holds 6 more entries
        tok = torch.randint(3, 258, (1, 1), generator=g)
        a, _ = model.decode_step(tok, ref[2])
        b, _ = model.decode_step(tok, got[2])
        assert (a - b).abs().max().item() <= 1e-5
    batch = ReformerCache.batch(got)
    seen_fills: set[tuple[int, ...]] = set()
    for step in range(40):  # crosses merges of the 16-entry deltas at different steps
        seen_fills.add(tuple(pool.length[s.slot] - pool.static_len[s.slot] for s in batch.sequences))
        tok = torch.randint(3, 258, (3, 1), generator=g)
        b, _ = model.decode_step(tok, batch)
        for i, c in enumerate(ref):
            a, _ = model.decode_step(tok[i : i + 1], c)
            assert (a[0] - b[i]).abs().max().item() <= 1e-5, (step, i)
        for s in batch.sequences:
            if s.sorted_positions(0) is not None:
                for layer in (0, 2):
                    assert torch.equal(s.sorted_positions(layer), reference_order(model, s, layer))
    assert any(len({f for f in fills if f >= 0}) > 1 for fills in seen_fills)  # fills did differ



@pytest.mark.parametrize("ctx_len", [5, 12, 30, 33])
@pytest.mark.parametrize("layout", [{}, {"page_size": 2, "delta_size": 2}])
def test_forks_decode_like_their_own_prefill_and_share_full_pages(ctx_len, layout):
    """Forks of one prefilled sequence decode exactly as a fresh prefill of the same tokens would, together
    and while the source is released midway; they share its full pages (copy-on-write at merges and at the
    hashing at one chunk), and every page is free again once all are released."""
    model = tiny_model()
    pool = model.new_decode_pool(**layout)
    ids = ids_of(ctx_len, seed=ctx_len)
    _, src = model.prefill(ids, pool=pool)
    base = src.sequences[0]
    forks = [pool.fork(base, ctx_len + 30) for _ in range(3)]
    with ReformerCache([pool.allocate(ctx_len + 30)]) as alone:
        whole = alone.nbytes
    for f in forks:  # a fork's bytes are its own pages only
        assert f.nbytes() == whole - pool.page_nbytes * pool.shared_pages(ctx_len)
    refs = [model.prefill(ids)[1] for _ in forks]
    g = torch.Generator().manual_seed(7)
    for step in range(30):  # crosses pages, merges and (short contexts) the dense -> LSH transition
        toks = torch.randint(3, 258, (len(forks), 1), generator=g)
        if step == 3:
            src.release()  # the forks' shared pages live on
        got, _ = model.decode_step(toks, ReformerCache(forks))
        for b, ref in enumerate(refs):
            want, _ = model.decode_step(toks[b : b + 1], ref)
            assert (got[b] - want[0]).abs().max().item() <= 1e-5, (step, b)
        for layer in (0, 2):
            order = forks[0].sorted_positions(layer)
            if order is not None:
                assert torch.equal(order, reference_order(model, forks[0], layer))
    for f in forks:
        f.release()
    assert pool.pages_in_use == 0 and pool.slots_in_use == 0


@pytest.mark.parametrize("n", [1, 5, 40])
def test_decode_tokens_equals_decode_steps_one_by_one(n):
    """A layer-by-layer pass over n tokens of one sequence leaves the state and logits of n decode steps."""
    model = tiny_model()
    ids = ids_of(37, seed=n)
    toks = ids_of(n, seed=100 + n)[0].tolist()
    _, ref = model.prefill(ids)
    _, got = model.prefill(ids)
    assert ref.sequences[0].pool.can_decode_tokens(ref.sequences[0].slot, n)
    for t in toks:
        want, _ = model.decode_step(torch.tensor([[t]]), ref)
    last = model.decode_tokens(toks, got.sequences[0])
    assert (last - want[0, 0]).abs().max().item() <= 1e-5
    assert got.lengths == ref.lengths
    assert_decode_alike(model, ref, got, steps=30, seed=n)  # crosses a merge of each delta
