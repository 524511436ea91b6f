"""The inference core against its numerical oracle, transformers' ReformerModelWithLMHead (random init)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from reformer_infer import (
    CheckpointError,
    ConfigError,
    ReformerCache,
    ReformerConfig,
    ReformerLM,
    load_model,
    save_model,
)

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

TOL = 1e-4


def hf_config(**kw):
    base = dict(
        attn_layers=["local", "lsh", "local", "lsh"], hidden_size=32, num_attention_heads=2, attention_head_size=16,
        feed_forward_size=64, axial_pos_shape=[16, 16], axial_pos_embds_dim=[16, 16], max_position_embeddings=256,
        lsh_attn_chunk_length=8, local_attn_chunk_length=4, num_buckets=4, num_hashes=2, vocab_size=258,
        is_decoder=True, hash_seed=1234, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0, axial_norm_std=0.5,
    )
    base.update(kw)
    return transformers.ReformerConfig(**base)


def make_hf(tmp_path, name: str, safetensors: bool = True, **kw):
    torch.manual_seed(0)
    model = transformers.ReformerModelWithLMHead(hf_config(**kw)).eval()
    with torch.no_grad():  # a non-zero output bias checks that we load and use it (transformers 5 ignores it)
        model.lm_head.bias.zero_()
    d = tmp_path / name
    if safetensors:
        model.save_pretrained(d)
    else:
        d.mkdir()
        model.config.to_json_file(d / "config.json")
        torch.save(model.state_dict(), d / "pytorch_model.bin")
    return model, d


def ids_of(T: int, seed: int = 0, B: int = 1) -> torch.Tensor:
    return torch.randint(3, 258, (B, T), generator=torch.Generator().manual_seed(seed))


CONFIGS = {
    "buckets4_rounds2": {},
    "factorised_buckets": dict(num_buckets=[2, 4]),
    "one_round": dict(num_hashes=1),
    "four_rounds": dict(num_hashes=4),
    "lsh_only": dict(attn_layers=["lsh", "lsh"]),
    # two chunks back: the first chunks' windows wrap around the chunk axis (transformers' _look_adjacent) to
    # the last ones, which the causal mask hides; a slice of one chunk needs two kept from earlier slices
    "wide_windows": dict(local_num_chunks_before=2, lsh_num_chunks_before=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_forward_matches_transformers(tmp_path, name):
    hf, d = make_hf(tmp_path, name, safetensors=(name != "one_round"), **CONFIGS[name])
    ours = load_model(d)
    for T in (3, 8, 13, 40, 77):  # short (dense LSH), exact chunks, and lengths transformers pads
        ids = ids_of(T, seed=T)
        with torch.no_grad():
            ref = hf(ids).logits
        got = ours(ids)
        assert (ref - got).abs().max().item() <= TOL, (name, T)


def _run(gen):
    """Drain a prefill_iter: (its result, the progress it reported)."""
    progress = []
    while True:
        try:
            progress.append(next(gen))
        except StopIteration as stop:
            return stop.value, progress


@pytest.mark.parametrize("name", ["buckets4_rounds2", "four_rounds", "wide_windows"])
def test_prefill_in_small_units_matches_transformers(tmp_path, name):
    """Inference works slice by slice (local keys/values kept across slices, attention output projected into
    the streams in place, hash rounds merged group by group): still transformers' full forward."""
    hf, d = make_hf(tmp_path, name, **CONFIGS[name])
    ours = load_model(d)
    for T in (3, 13, 40, 77):
        ids = ids_of(T, seed=T)
        with torch.no_grad():
            ref = hf(ids).logits
        for work_tokens in (4, 24):  # one local chunk per slice (fewer than it looks back on), and several
            (logits, _), progress = _run(ours.prefill_iter(ids, last_only=False, work_tokens=work_tokens))
            assert (ref - logits).abs().max().item() <= TOL, (name, T, work_tokens)
            assert [done == total for done, total in progress].count(True) == 1  # the work total is exact


@pytest.mark.parametrize("name", ["buckets4_rounds2", "factorised_buckets", "four_rounds"])
@pytest.mark.parametrize("prompt_len", [5, 13, 24])
@pytest.mark.parametrize("pool", ["default", "tiny_pages_and_delta"])
def test_cached_decode_matches_transformers_step_by_step(tmp_path, name, prompt_len, pool):
    hf, d = make_hf(tmp_path, name, **CONFIGS[name])
    ours = load_model(d)
    ids = ids_of(prompt_len, seed=prompt_len)
    with torch.no_grad():
        out = hf(ids, use_cache=True)
    past = out.past_buckets_states
    # pages of 2 positions, delta merged every 2 tokens: every boundary is crossed
    layout = {} if pool == "default" else {"page_size": 2, "delta_size": 2}
    logits, cache = ours.prefill(ids, pool=ours.new_decode_pool(**layout))
    assert (out.logits - logits).abs().max().item() <= TOL
    g = torch.Generator().manual_seed(7)
    for step in range(36):  # crosses the dense -> LSH-window transition for short prompts
        tok = torch.randint(3, 258, (1, 1), generator=g)
        with torch.no_grad():
            o = hf(tok, past_buckets_states=past, use_cache=True)
        past = o.past_buckets_states
        lg, cache = ours.decode_step(tok, cache)
        assert (o.logits[:, -1] - lg[:, -1]).abs().max().item() <= TOL, (name, prompt_len, step)
    assert cache.lengths == [prompt_len + 36]


def test_batched_decode_of_different_lengths_equals_each_alone(tmp_path):
    _, d = make_hf(tmp_path, "m")
    model = load_model(d)
    lengths = [3, 9, 17, 30]  # one still in the dense phase, the others LSH-windowed
    singles, batch = [], []
    for i, T in enumerate(lengths):
        _, c1 = model.prefill(ids_of(T, seed=i))
        _, c2 = model.prefill(ids_of(T, seed=i))
        singles.append(c1)
        batch.append(c2)
    batched = ReformerCache.batch(batch)
    g = torch.Generator().manual_seed(3)
    for _ in range(12):
        toks = torch.randint(3, 258, (len(lengths), 1), generator=g)
        lb, _ = model.decode_step(toks, batched)
        for i, c in enumerate(singles):
            ls, _ = model.decode_step(toks[i : i + 1], c)
            assert (lb[i] - ls[0]).abs().max().item() <= 1e-5
    assert batched.lengths == [T + 12 for T in lengths]


def test_cached_decode_equals_full_recompute_for_local_layers(tmp_path):
    """Local attention has no prefix instability: decode equals the last row of a full forward."""
    _, d = make_hf(tmp_path, "local", attn_layers=["local", "local"])
    model = load_model(d)
    ids = ids_of(6)
    _, cache = model.prefill(ids)
    seq = ids
    for step in range(20):
        tok = ids_of(1, seed=100 + step)
        lg, cache = model.decode_step(tok, cache)
        seq = torch.cat([seq, tok], dim=1)
        full = model(seq)[:, -1]
        assert (lg[:, 0] - full).abs().max().item() <= 1e-5


def test_cached_decode_equals_full_recompute_where_lsh_windows_coincide(tmp_path):
    """With one LSH layer placed last, nothing downstream sees the shifted prefix; when T+1 is a multiple of
    the chunk length and the new token's slot is outside the first chunk of every round, the decode window
    and the full forward's window are the same keys. Elsewhere (documented in docs/semantics.md) they differ."""
    _, d = make_hf(tmp_path, "lshlast", attn_layers=["local", "lsh"], lsh_attn_chunk_length=4,
                   local_attn_chunk_length=4, num_buckets=4, num_hashes=2)
    model = load_model(d)
    C = 4
    ids = ids_of(16, seed=1)
    _, cache = model.prefill(ids)
    seq = ids
    compared = 0
    layer = model.encoder.layers[1].attention.self_attention
    for step in range(40):
        tok = ids_of(1, seed=200 + step)
        T = cache.lengths[0]
        # predict where the new token lands before decoding it
        xs = model.embeddings(torch.cat([seq, tok], 1), torch.arange(T + 1))
        lg, cache = model.decode_step(tok, cache)
        seq = torch.cat([seq, tok], dim=1)
        slot = cache.sequences[0].sorted_positions(1) == T  # (H, R, T+1) where the new token was inserted
        p = slot.float().argmax(-1)
        if (T + 1) % C == 0 and bool((p >= C).all()):
            full = model(seq)[:, -1]
            assert (lg[:, 0] - full).abs().max().item() <= 1e-5
            compared += 1
        del xs
    assert compared >= 3, "the test never reached a step where the semantics coincide"
    assert layer is not None


def test_prefill_units_weigh_the_feed_forward_by_its_width(tmp_path, monkeypatch):
    """A feed-forward position counts ceil(F / E) work units (here F = 2E): its slices cover half as many
    positions as the other passes', so every unit costs about the same; the units still add up to
    `prefill_work` and the result is unchanged."""
    from reformer_infer.model import FeedForward, feed_forward_weight

    _, d = make_hf(tmp_path, "m")
    model = load_model(d)
    assert feed_forward_weight(model.config) == 2
    seen: list[int] = []
    forward = FeedForward.forward

    def recording(self, x):
        seen.append(x.shape[1])
        return forward(self, x)

    ids = ids_of(40, seed=4)
    ref, _ = model.prefill(ids, last_only=False)
    monkeypatch.setattr(FeedForward, "forward", recording)
    (logits, _), steps = _run(model.prefill_iter(ids, last_only=False, work_tokens=8))
    assert seen and max(seen) == 4 and sum(seen) == 40 * len(model.config.attn_layers)
    assert steps[-1][0] == model.prefill_work(40)  # the weighted units add up exactly
    assert (logits - ref).abs().max().item() <= 1e-5

def test_prefill_iter_equals_prefill_and_reports_progress(tmp_path):
    _, d = make_hf(tmp_path, "m")
    model = load_model(d)
    ids = ids_of(77, seed=5)
    ref_logits, ref_cache = model.prefill(ids, last_only=True)
    (logits, cache), progress = _run(model.prefill_iter(ids, work_tokens=8))
    assert len(progress) > 10
    # the work total is exact: only the last unit reaches it (an overcount would be clamped, an undercount stop short)
    assert [done == total for done, total in progress].count(True) == 1
    assert progress[-1][0] == progress[-1][1]
    assert all(a[0] <= b[0] for a, b in zip(progress, progress[1:], strict=False))
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    tok = ids_of(1, seed=9)
    a, _ = model.decode_step(tok, cache)
    b, _ = model.decode_step(tok, ref_cache)
    assert (a - b).abs().max().item() <= 1e-5


def test_decode_works_with_chunked_feed_forward(tmp_path):
    _, d = make_hf(tmp_path, "m")
    plain = load_model(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["chunk_size_feed_forward"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    chunked = load_model(d)
    ids = ids_of(21)
    la, ca = plain.prefill(ids)
    lb, cb = chunked.prefill(ids)
    assert (la - lb).abs().max().item() <= 1e-5
    for step in range(5):
        tok = ids_of(1, seed=step)
        xa, ca = plain.decode_step(tok, ca)
        xb, cb = chunked.decode_step(tok, cb)
        assert (xa - xb).abs().max().item() <= 1e-5


def test_prefill_writes_every_prompt_row_of_the_pool(tmp_path):
    """A prefill writes its rows straight into the pool's (unzeroed) pages: every prompt row must be written,
    alone or as one row of a batched prefill, and with the same keys and values either way."""
    _, d = make_hf(tmp_path, "m")
    model = load_model(d)
    ids = ids_of(40)
    pool = model.new_decode_pool(sequences=3, tokens=256)
    for name in ("keys", "values"):
        getattr(pool, name).fill_(float("nan"))  # what an unwritten row would read as
    _, cache = model.prefill(ids, capacity=64, pool=pool)
    _, pair = model.prefill(torch.cat([ids_of(40, seed=1), ids]), capacity=64, pool=pool)
    one, other = cache.sequences[0], pair.sequences[1]
    for j in range(len(pool.lsh_index)):
        for name in ("keys", "values"):
            t = getattr(pool, name)[j]
            a, b = t.index_select(1, pool._rows(one.slot, 40)), t.index_select(1, pool._rows(other.slot, 40))
            assert not a.isnan().any()
            assert (a - b).abs().max().item() <= 1e-6
    assert pool.slots_in_use == 3
    with cache, pair:
        pass
    assert pool.slots_in_use == 0 and pool.pages_in_use == 0


def test_cache_reports_its_size_in_bytes(tmp_path):
    _, d = make_hf(tmp_path, "m")
    model = load_model(d)
    _, cache = model.prefill(ids_of(40))
    assert cache.nbytes == model.cache_bytes(41)  # the prompt's pages and one for the next token
    for T in range(40, 60):  # pooled: pages as it grows, within the projection the engine admits by
        model.decode_step(ids_of(1, seed=T), cache)
        assert 0 < cache.nbytes <= model.cache_bytes(T + 1)
    # local layers keep only their window: cache bytes grow with the LSH layers only
    per_token = model.cache_bytes_per_token()
    cfg = model.config
    lsh = cfg.attn_layers.count("lsh")
    assert per_token == pytest.approx(lsh * (2 * cfg.all_head_size * 4 + cfg.num_attention_heads * cfg.num_hashes * 4))


def test_project_format_round_trip_keeps_rotations(tmp_path):
    _, d = make_hf(tmp_path, "m")
    model = load_model(d)
    save_model(model, tmp_path / "ours")
    again = load_model(tmp_path / "ours")
    assert again.rotation_fingerprint() == model.rotation_fingerprint()
    ids = ids_of(40)
    assert torch.equal(model(ids), again(ids))


def test_rotations_reproduce_transformers_draw_without_touching_global_rng(tmp_path):
    _, d = make_hf(tmp_path, "m")
    state = torch.get_rng_state()
    model = load_model(d)
    model(ids_of(40))
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(1234)
    expected = torch.randn(2, 16, 2, 2)
    for layer in model.lsh_layers():
        assert torch.equal(layer.rotations, expected)


def test_hash_rounds_can_be_changed_at_load_time(tmp_path):
    _, d = make_hf(tmp_path, "m")
    model = load_model(d, num_hashes=4)
    assert next(model.lsh_layers()).rotations.shape[2] == 4
    hf4, d4 = make_hf(tmp_path, "m4", num_hashes=4)
    ids = ids_of(40)
    with torch.no_grad():
        ref = hf4(ids).logits
    assert (model(ids) - ref).abs().max().item() <= TOL


@pytest.mark.parametrize(
    "field,value",
    [("attn_layers", ["lsh", "dense"]), ("num_buckets", 3), ("axial_pos_embds_dim", [10, 10]),
     ("hidden_act", "mish"), ("num_hashes", 0), ("vocab_size", -1)],
)
def test_bad_config_values_name_the_field(field, value):
    cfg = ReformerConfig().to_dict()
    cfg[field] = value
    with pytest.raises(ConfigError, match=field):
        ReformerConfig.from_dict(cfg)


def test_unknown_config_field_is_an_error():
    with pytest.raises(ConfigError, match="bogus"):
        ReformerConfig.from_dict({**ReformerConfig().to_dict(), "bogus": 1})


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(empty)
    model = ReformerLM(ReformerConfig(max_position_embeddings=4096))
    save_model(model, tmp_path / "ok")
    from safetensors.torch import load_file, save_file

    w = load_file(str(tmp_path / "ok" / "model.safetensors"))
    bad = dict(w)
    bad["lm_head.decoder.weight"] = torch.zeros(3, 3)
    (tmp_path / "shape").mkdir()
    (tmp_path / "shape" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    save_file(bad, str(tmp_path / "shape" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.decoder.weight has shape"):
        load_model(tmp_path / "shape")
    missing = {k: v for k, v in w.items() if k != "encoder.layer_norm.weight"}
    save_file(missing, str(tmp_path / "shape" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing weights"):
        load_model(tmp_path / "shape")
    extra = dict(w, **{"encoder.extra": torch.zeros(1)})
    save_file(extra, str(tmp_path / "shape" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown weights"):
        load_model(tmp_path / "shape")
    (tmp_path / "shape" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path / "shape")


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config().to_dict()))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(d)


def test_sequence_beyond_the_context_is_rejected():
    model = ReformerLM(ReformerConfig(axial_pos_shape=[8, 8], max_position_embeddings=64,
                                      lsh_attn_chunk_length=8, local_attn_chunk_length=8, num_buckets=4))
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_full_attention_baseline_equals_dense_causal_shared_qk_attention(tmp_path):
    """The evaluation switch runs LSH layers densely: equal to the LSH path when one chunk covers everything,
    and its cached decode equals its own full recompute (no hashing, no windows)."""
    _, d = make_hf(tmp_path, "m", lsh_attn_chunk_length=64, local_attn_chunk_length=64, attn_layers=["lsh", "lsh"])
    lsh = load_model(d)
    full = load_model(d)
    full.set_full_attention(True)
    full.score_budget = 64  # force many query blocks
    ids = ids_of(40)
    assert (lsh(ids) - full(ids)).abs().max().item() <= 1e-5  # 40 tokens <= one chunk: LSH is dense too
    _, cache = full.prefill(ids)
    seq = ids
    for step in range(30):  # past one chunk: the dense baseline keeps attending to everything
        tok = ids_of(1, seed=300 + step)
        lg, cache = full.decode_step(tok, cache)
        seq = torch.cat([seq, tok], dim=1)
        assert (lg[:, 0] - full(seq)[:, -1]).abs().max().item() <= 1e-5


def test_an_abandoned_prefill_does_not_leave_inference_mode_on(tmp_path):
    _, d = make_hf(tmp_path, "m")
    model = load_model(d)
    gen = model.prefill_iter(ids_of(40), work_tokens=8)
    next(gen)
    next(gen)
    assert not torch.is_inference_mode_enabled()
    assert torch.is_grad_enabled()
    del gen


def test_memory_tuning_applies_on_glibc():
    import platform

    from reformer_infer.memory import release_large_buffers_promptly

    applied = release_large_buffers_promptly()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied


def test_exp_shifted_is_exp_with_underflow_set_to_zero() -> None:
    from reformer_infer.model import EXP_FLOOR, exp_shifted

    x = torch.cat([torch.linspace(-86.9, 0.0, 1000), torch.tensor([-87.5, -100.0, -1e5, -1e9, float("-inf")])])
    with torch.inference_mode():
        got = exp_shifted(x.clone())
    assert torch.equal(got[:1000], torch.exp(x[:1000]))
    assert torch.equal(got[1000:], torch.zeros(5))  # fp32 exp is denormal or 0 there
    # under autograd: out of place, same values, gradient exp(x) above the floor and 0 below it
    y = x.clone().requires_grad_(True)
    out = exp_shifted(y)
    out.sum().backward()
    assert torch.equal(out.detach(), got) and torch.equal(x, y.detach())
    assert torch.equal(y.grad[:1000], torch.exp(x[:1000])) and torch.equal(y.grad[1000:], torch.zeros(5))
    assert EXP_FLOOR > -87.34  # exp(-87.34) is fp32's smallest normal number


def test_freeze_startup_objects_moves_live_objects_out_of_the_collector() -> None:
    import gc

    from reformer_infer.memory import freeze_startup_objects

    before = gc.get_freeze_count()
    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count() > before
        cycle: list = []
        cycle.append(cycle)  # created after the freeze: still collected
        ref = __import__("weakref").ref(_Box(cycle))
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()


class _Box:
    def __init__(self, payload: object) -> None:
        self.me = self
        self.payload = payload


@pytest.mark.parametrize("layers", [["local", "lsh"], ["lsh", "local"]])
@pytest.mark.parametrize("work_tokens", [None, 8, 5])
def test_last_only_prefill_equals_the_last_row_of_a_full_one(tmp_path, layers, work_tokens):
    """With last_only the last layer projects and feeds forward the last position alone; its logits and
    cache equal those of a prefill that computes every position (and transformers' last row)."""
    hf, d = make_hf(tmp_path, "m", attn_layers=layers)
    model = load_model(d)
    ids = ids_of(37, seed=3, B=2)
    (full, full_cache), _ = _run(model.prefill_iter(ids, last_only=False, work_tokens=work_tokens))
    (last, last_cache), _ = _run(model.prefill_iter(ids, last_only=True, work_tokens=work_tokens))
    assert last.shape == (2, 1, 258)
    assert (last[:, 0] - full[:, -1]).abs().max().item() <= 1e-5
    with torch.no_grad():
        ref = hf(ids).logits[:, -1]
    assert (last[:, 0] - ref).abs().max().item() <= TOL
    tok = ids_of(1, seed=9, B=2)
    a, _ = model.decode_step(tok, full_cache)
    b, _ = model.decode_step(tok, last_cache)
    assert (a - b).abs().max().item() <= 1e-5
