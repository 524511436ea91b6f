"""GPU benchmark of the decode engine (issue 21, item 6): bf16, enwik8 shape (random init), one run.

Prints ONE markdown table (and writes it to --out), every figure measured in this run:
  * 64K prefill seconds and peak GPU memory (`torch.cuda.max_memory_allocated`), ours and transformers';
  * decode ms per step (one token for every sequence of the batch) at 1K, 16K and 64K for batch 1, 16 and 64:
    our public `decode_step` eager, and the engine's step through the library's captured steps
    (`step_graphs.decode_and_sample` on `model.use_step_graphs(pool)`: decode and greedy sampling on the
    device, one CUDA graph per batch bucket, and the one download of the ids, as the engine runs with
    --cuda-graphs; a CPU dry run replays it with `step_graphs.EagerReplay`), median and mean of N steps
    after warm-up, each step timed between two `torch.cuda.synchronize()` (the host work of a step counts);
    transformers' Reformer decode on the same GPU, same dtype, same contexts where its cache fits;
  * cache bytes per 64K stream (`model.cache_bytes`) and how many 64K streams fit in 80 GB (and in this
    GPU's memory) beside the weights.

Decode cells run on synthetic caches of the right shapes (random keys, values and bucket ids written through
the pool's own prefill interface, as `bench_core._ours_synthetic_cache`; transformers': random hidden states
and bucket ids): a decode step's cost does not depend on the values, so no 64K prefill is needed per cell.
The steps per cell (default 136) cross one delta merge per sequence (every 128 tokens): the mean includes it.

  python bench/bench_gpu.py --out gpu_check.md                 # on a CUDA machine (about 3 minutes on an H100)
  python bench/bench_gpu.py --device cpu --small --out x.md    # dry run: tiny widths and contexts, CPU

`--budget-s` bounds the run: cells still to run when it is spent are skipped and the table says so
(transformers' cells come last).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import ENWIK8  # noqa: E402

# Tiny widths with the enwik8 layer layout, for dry runs on a CPU (`--small`) and the CPU mode of tests/test_gpu.py.
TINY = dict(ENWIK8, hidden_size=64, feed_forward_size=128, num_attention_heads=2, attention_head_size=32,
            num_buckets=8, lsh_attn_chunk_length=32, local_attn_chunk_length=16, axial_pos_shape=[32, 64],
            axial_pos_embds_dim=[16, 48], max_position_embeddings=2048)
NOMINAL_GPU_BYTES = 80 * 10**9  # "80 GB" of the issue


# ---------------------------------------------------------------------------------------------------
# Helpers shared with tests/test_gpu.py
# ---------------------------------------------------------------------------------------------------
def build_hf_dir(spec: dict, out_dir: Path, seed: int = 0) -> int:
    """A random-init transformers Reformer of `spec` saved to `out_dir`; returns its parameter count."""
    from transformers import ReformerConfig, ReformerModelWithLMHead

    torch.manual_seed(seed)
    hf = ReformerModelWithLMHead(ReformerConfig(**spec)).eval()
    n = sum(p.numel() for p in hf.parameters())
    hf.save_pretrained(out_dir)
    return n


def model_dir(spec: dict, name: str, tmp: Path) -> Path:
    """The random-init model of `spec`: built under `tmp`, or, when REFORMER_GPU_CHECK_MODEL_DIR is set (the
    GPU check sets it), built there once and reused by the tests and the benchmark (~10 s each on a CPU)."""
    root = os.environ.get("REFORMER_GPU_CHECK_MODEL_DIR")
    d = (Path(root) if root else tmp) / name
    if not (d / "config.json").exists():
        part = d.with_name(d.name + f".part{os.getpid()}")  # complete or absent: a killed build is not reused
        build_hf_dir(spec, part)
        part.rename(d)
    return d


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def snapshot_pool(pool) -> dict:
    """Every tensor (cloned) and host list (copied) of a decode pool: `restore_pool` puts it back."""
    snap = {}
    for name, val in vars(pool).items():
        if isinstance(val, torch.Tensor) and not name.startswith("_"):
            snap[name] = val.clone()
        elif isinstance(val, list):
            snap[name] = copy.deepcopy(val)
    return snap


def restore_pool(pool, snap: dict) -> None:
    """Put a `snapshot_pool` back, tensors copied into the pool's own (a captured graph keeps its addresses)."""
    for name, val in snap.items():
        cur = getattr(pool, name)
        if isinstance(val, torch.Tensor):
            if cur.shape != val.shape:
                raise RuntimeError(f"pool tensor {name} changed shape {tuple(val.shape)} -> {tuple(cur.shape)}")
            cur.copy_(val)
        else:
            setattr(pool, name, copy.deepcopy(val))


def synthetic_pool(model, batch: int, T: int, extra: int, seed: int = 0):
    """A pool of `batch` sequences of T positions each with random keys, values and bucket ids, written through
    the pool's prefill interface on the model's device (decode cost does not depend on the values). All
    sequences share one draw per layer. Returns (pool, ReformerCache of the sequences)."""
    from reformer_infer import ReformerCache

    cfg, dev, dt = model.config, model.device, model.dtype
    H, D = cfg.num_attention_heads, cfg.attention_head_size
    g = torch.Generator(device=dev).manual_seed(seed)
    pool = model.new_decode_pool(batch + 1, batch * (T + extra))
    pool.pad_slot()  # taken now: taken by the first captured step, it could make the pool grow (reallocate)
    seqs = [pool.allocate(T + extra) for _ in range(batch)]
    for i, kind in enumerate(cfg.attn_layers):
        k = (torch.randn(H, T, D, generator=g, device=dev) / D**0.5).to(dt)
        v = torch.randn(H, T, D, generator=g, device=dev).to(dt)
        if kind == "local":
            for s in seqs:
                pool.write_ring(pool.local_index[i], s, k, v, T)
        else:
            j = pool.lsh_index[i]
            b = torch.randint(0, cfg.total_buckets, (1, H, pool.R, T), generator=g, device=dev)
            order = torch.argsort(b * T + torch.arange(T, device=dev), dim=-1)
            for s in seqs:
                rows = pool.rows_of([s.slot], T)[0]
                pool.keys[j].index_copy_(1, rows, k)
                pool.values[j].index_copy_(1, rows, v)
                pool.set_order(j, [s.slot], order, b)
            del b, order
        del k, v
    pool.finish_prefill(seqs, T, hashed=T > cfg.lsh_attn_chunk_length)
    return pool, ReformerCache(seqs)


def hf_synthetic_cache(hf, batch: int, T: int, device, dtype):
    """transformers' cache of T positions for `batch` sequences: random hidden states and bucket ids."""
    from transformers.models.reformer.modeling_reformer import ReformerDynamicCache

    cfg = hf.config
    g = torch.Generator(device=device).manual_seed(0)
    nb = cfg.num_buckets if isinstance(cfg.num_buckets, int) else math.prod(cfg.num_buckets)
    cache = ReformerDynamicCache()
    for i, kind in enumerate(cfg.attn_layers):
        states = torch.randn(batch, T, cfg.hidden_size, generator=g, device=device).to(dtype)
        b = None
        if kind == "lsh":
            b = torch.randint(0, nb, (batch, cfg.num_attention_heads, cfg.num_hashes, T), generator=g, device=device)
            b = b + (torch.arange(cfg.num_hashes, device=device) * nb).view(1, 1, -1, 1)
        cache.update(b, states, i)
    return cache


def hf_cache_bytes(cfg, batch: int, T: int, elt: int) -> int:
    """Bytes of transformers' Reformer cache: every layer's hidden states, LSH layers' bucket ids (int64)."""
    lsh = list(cfg.attn_layers).count("lsh")
    return batch * T * (len(cfg.attn_layers) * cfg.hidden_size * elt + lsh * cfg.num_attention_heads * cfg.num_hashes * 8)


# ---------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------
def timed_steps(fn, steps: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def free_device(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def peak_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device) -> int | None:
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None


def failure(e: BaseException) -> str:
    """One table-safe line naming an exception."""
    first = (str(e).splitlines() or [""])[0][:100].replace("|", "/")
    return f"{type(e).__name__}: {first}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a (CPU)"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fmt_ms(v: list[float] | None) -> str:
    return f"{statistics.median(v):.2f} (mean {statistics.fmean(v):.2f})" if v else "–"


class Budget:
    """Seconds left for starting cells; `stop` (SIGTERM: the caller's time limit) spends them at once, so the
    cells still to run are skipped and the table is written within the caller's grace period."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.stopped = False

    def left(self) -> float:
        return self.end - time.monotonic()

    def stop(self, *_: object) -> None:
        self.stopped, self.end = True, time.monotonic()
        raise TimeoutError("stopped by SIGTERM (time limit)")  # the cell running is reported as stopped


def ours_cell(model, B: int, T: int, extra: int, args) -> tuple[list[float] | None, list[float] | None, list[str]]:
    """Decode ms of B sequences at T positions: `decode_step` eager, then through captured steps (CUDA)."""
    dev = model.device
    cuda = dev.type == "cuda"
    eager = graph = None
    note: list[str] = []
    caches = None
    try:
        with torch.inference_mode():
            pool, caches = synthetic_pool(model, B, T, extra)
            tok = torch.full((B, 1), 65, device=dev)
            peak_reset(dev)
            eager = timed_steps(lambda: model.decode_step(tok, caches), args.steps, args.warmup, dev)
            peak = peak_bytes(dev)
            if not args.no_graphs and getattr(args, "graph_failed", None):
                note.append(f"graph: not tried (failed in an earlier cell: {args.graph_failed})")
            elif not args.no_graphs:
                try:
                    graph = engine_steps(model, pool, caches, args)
                except Exception as e:  # reported in the table: a failure is a finding
                    args.graph_failed = failure(e)
                    note.append(f"graph: {args.graph_failed}")
                finally:
                    # the model keeps a pool's captured steps (and so the pool) until dropped: a 64 x 64K pool
                    # is ~54 GB
                    model.drop_step_graphs(pool)
            if cuda:
                note.append(f"peak {fmt_bytes(peak)}")
    except Exception as e:
        note.append(f"eager: {failure(e)}")
    finally:
        if caches is not None:
            caches.release()
    return eager, graph, note


def engine_steps(model, pool, caches, args) -> list[float]:
    """Timed steps as the engine runs them with --cuda-graphs: decode and greedy sampling on the device,
    replayed as one captured step per bucket (`step_graphs.decode_and_sample`), and the one download of the
    sampled ids. On a CPU dry run the recorder is `step_graphs.EagerReplay` (the logic, not a timing)."""
    from reformer_infer.requests import SamplingParams
    from reformer_infer.sampling import SlotSampler, download, unpack
    from reformer_infer.step_graphs import EagerReplay, decode_and_sample

    dev = model.device
    graphs = model.use_step_graphs(pool, capture=None if dev.type == "cuda" else EagerReplay)
    slots = [s.slot for s in caches.sequences]
    sampler = SlotSampler(len(slots) + 1, model.config.vocab_size, dev)
    rows = [sampler.take_row() for _ in slots]
    for r in rows:
        sampler.join(r, SamplingParams(temperature=0.0), [])
        sampler.set_next(r, 65)

    def step() -> None:
        unpack(download(decode_and_sample(model, pool, slots, sampler, rows, graphs)), [0] * len(rows))

    return timed_steps(step, args.steps, args.warmup, dev)


def engine_cell(model, B: int, prompt_len: int, new_tokens: int, overlap: bool) -> tuple[float, int]:
    """The engine as served (captured steps on CUDA, `overlap_steps` as given): B greedy streams of `new_tokens`
    after `prompt_len`-token prompts, all submitted at once; tokens/s of the round after a warm-up round (which
    records the buckets), wall time from submission to the last token, prefill included. Also a hash of the
    tokens: overlap must not change them."""
    import asyncio

    from reformer_infer.engine import Engine, EngineConfig
    from reformer_infer.requests import SamplingParams, TokenEvent

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 258, (prompt_len,), generator=gen).tolist() for _ in range(B)]
    budget = int(1.25 * B * model.cache_bytes(prompt_len + new_tokens + 64))

    async def go() -> tuple[float, int]:
        engine = Engine(model, EngineConfig(max_batch=B, max_queue=B, cache_memory_bytes=budget,
                                            overlap_steps=overlap))
        engine.start()

        async def one(p: list[int]) -> tuple[int, ...]:
            stream = engine.add_request(p, SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True))
            return tuple([t async for ev in stream if isinstance(ev, TokenEvent) for t in ev.token_ids])

        try:
            for _ in range(2):  # the first round records every bucket the batch passes through
                t0 = time.perf_counter()
                got = await asyncio.gather(*(one(p) for p in prompts))
                wall = time.perf_counter() - t0
        finally:
            await engine.shutdown()
        return sum(map(len, got)) / wall, hash(tuple(got))

    return asyncio.run(go())


def run(args, budget: Budget) -> tuple[str, list[str]]:
    from reformer_infer import load_model

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    spec = TINY if args.small else ENWIK8
    max_ctx = spec["max_position_embeddings"]
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    hf_dir = model_dir(spec, "tiny" if args.small else "enwik8", tmp)
    model = load_model(hf_dir, device=dev, dtype=dt).eval()
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    free_after_weights = torch.cuda.mem_get_info()[0] if cuda else None
    name = torch.cuda.get_device_name() if cuda else "CPU"
    total = torch.cuda.get_device_properties(dev).total_memory if cuda else None
    header = (f"bench_gpu: {name}{f' ({fmt_bytes(total)})' if total else ''}, torch {torch.__version__}, "
              f"{args.dtype}, {'tiny widths (--small)' if args.small else 'enwik8 shape'} "
              f"({n_params / 1e6:.1f}M params, random init), decode: {args.steps} timed steps per cell after "
              f"{args.warmup} warm-up, each between two synchronizes; ms per step = per token of every stream")
    rows = ["| measure | batch | context | reformer-serve eager | reformer-serve CUDA graphs | transformers | note |",
            "|---|---|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(0)

    # ---- prefill at the longest context ----------------------------------------------------------
    Tp = args.prefill_context or max_ctx
    try:
        with torch.inference_mode():
            warm = torch.randint(3, 258, (1, min(Tp, 4096)), generator=gen).to(dev)
            model.prefill(warm, last_only=True)[1].release()  # kernels loaded, allocator warm
            ids = torch.randint(3, 258, (1, Tp), generator=gen).to(dev)
            free_device(dev)
            peak_reset(dev)
            sync(dev)
            t0 = time.perf_counter()
            _, cache = model.prefill(ids, last_only=True)
            sync(dev)
            ours_prefill = f"{time.perf_counter() - t0:.2f} ({fmt_bytes(peak_bytes(dev))})"
            cache.release()
            del cache
    except Exception as e:  # reported in the table: a failure is a finding
        ours_prefill = f"failed: {failure(e)}"
    free_device(dev)
    print(f"  ours prefill {Tp}: {ours_prefill}", file=sys.stderr, flush=True)
    prefill_row = [f"prefill s (peak {'GPU memory' if cuda else 'memory'})", "1", str(Tp), ours_prefill, "–"]

    # ---- our decode cells ------------------------------------------------------------------------
    contexts = args.contexts or ([256, 1024] if args.small else [1024, 16384, 65536])
    extra = 2 * (args.steps + args.warmup) + 8
    decode_rows: dict[tuple[int, int], list[str]] = {}
    for B in args.batches:
        for T in contexts:
            Td = min(T, max_ctx - extra)
            key = (B, T)
            if budget.left() < args.reserve_s:
                decode_rows[key] = ["skipped (time budget)", "skipped (time budget)"]
                continue
            eager, graph, note = ours_cell(model, B, Td, extra, args)
            free_device(dev)
            g_cell = fmt_ms(graph) if graph else ("off" if args.no_graphs else "failed")
            if graph and not cuda:
                g_cell += " (EagerReplay, CPU)"
            decode_rows[key] = [fmt_ms(eager) if eager else "failed", g_cell, "; ".join(note)]
            print(f"  ours B={B} T={Td}: eager {fmt_ms(eager)} graph {g_cell} {'; '.join(note)}", file=sys.stderr,
                  flush=True)

    # ---- transformers ----------------------------------------------------------------------------
    from transformers import ReformerConfig as HFConfig
    from transformers import ReformerModelWithLMHead

    hf_prefill = "not run (time budget)"
    hf_decode: dict[tuple[int, int], str] = {}
    hf_cfg = HFConfig.from_pretrained(hf_dir)
    hf = None
    if budget.left() > args.reserve_s / 2:
        try:
            # from_pretrained(dtype=...) keeps some parameters in fp32 (seen with transformers 5.23): cast them all
            hf = ReformerModelWithLMHead.from_pretrained(hf_dir).to(device=dev, dtype=dt).eval()
        except Exception as e:
            hf_prefill = f"failed to load: {failure(e)}"
    elt = torch.empty((), dtype=dt).element_size()
    if hf is not None and budget.left() > args.reserve_s + args.hf_prefill_s:
        try:
            with torch.no_grad():
                ids = torch.randint(3, 258, (1, Tp), generator=gen).to(dev)
                free_device(dev)
                peak_reset(dev)
                sync(dev)
                t0 = time.perf_counter()
                past = hf(ids, use_cache=True).past_buckets_states
                sync(dev)
                hf_prefill = f"{time.perf_counter() - t0:.2f} ({fmt_bytes(peak_bytes(dev))})"
                del past
        except Exception as e:
            hf_prefill = f"failed: {failure(e)}"
        free_device(dev)
    prefill_row.append(hf_prefill)
    for B in args.batches:
        for T in contexts:
            key = (B, T)
            need = hf_cache_bytes(hf_cfg, B, T, elt)
            room = torch.cuda.mem_get_info()[0] if cuda else None
            # the cache, and per step about four copies of one layer's states (concatenation, projections)
            if room is not None and need + 4 * need // len(hf_cfg.attn_layers) > room:
                hf_decode[key] = f"not run (cache {fmt_bytes(need)} does not fit)"
                continue
            if hf is None or budget.left() < args.reserve_s / 2:
                hf_decode[key] = "not run (time budget)"
                continue
            try:
                with torch.no_grad():
                    state = {"past": hf_synthetic_cache(hf, B, T, dev, dt)}
                    tok = torch.full((B, 1), 65, device=dev)

                    def hf_step(state=state, tok=tok):
                        state["past"] = hf(tok, past_buckets_states=state["past"], use_cache=True).past_buckets_states

                    ms = timed_steps(hf_step, args.hf_steps, 2, dev)
                    hf_decode[key] = fmt_ms(ms)
                    print(f"  transformers B={B} T={T}: {fmt_ms(ms)}", file=sys.stderr, flush=True)
                    del state
            except Exception as e:
                hf_decode[key] = f"failed: {failure(e)}"
            free_device(dev)

    # ---- the engine as served, overlapped steps off and on (last: it gets the time the cells above left) --
    engine_rows = []
    eB, eP, eN = (4, 64, 16) if args.small else (64, 1024, 128)
    if budget.left() > args.reserve_s + (5 if args.small else 30):
        try:
            (off, h_off), (on, h_on) = (engine_cell(model, eB, eP, eN, False),
                                        engine_cell(model, eB, eP, eN, True))
            same = "same tokens" if h_off == h_on else "TOKENS DIFFER"
            engine_rows.append(f"| engine tok/s, {eN} greedy tokens per stream, prefill included | {eB} | {eP} | "
                               f"overlap off: {off:.0f} | overlap on: {on:.0f} ({on / off:.2f}x) | – | "
                               f"`EngineConfig.overlap_steps`; {same} |")
        except Exception as e:
            engine_rows.append(f"| engine tok/s | {eB} | {eP} | failed: {failure(e)} | | – | |")
        print(f"  engine: {engine_rows[-1]}", file=sys.stderr, flush=True)
        free_device(dev)
    else:
        engine_rows.append(f"| engine tok/s | {eB} | {eP} | not run (time budget) | | – | |")

    # ---- the table -------------------------------------------------------------------------------
    rows.append("| " + " | ".join(prefill_row) + " | last_only prefill, random ids |")
    for B in args.batches:
        for T in contexts:
            eager, graph, *note = decode_rows[(B, T)]
            hf_cell = hf_decode.get((B, T), "not run (time budget)")
            Td = min(T, max_ctx - extra)
            rows.append(f"| decode ms/step, median (mean) | {B} | {Td} | {eager} | {graph} | {hf_cell} | "
                        f"{'; '.join(n for n in note if n)} |")
    rows.extend(engine_rows)
    cb = model.cache_bytes(max_ctx)
    hf_cb = hf_cache_bytes(hf_cfg, 1, max_ctx, elt)
    rows.append(f"| cache bytes per stream | 1 | {max_ctx} | {fmt_bytes(cb)} ({cb} B) | – | {fmt_bytes(hf_cb)} | "
                f"ours: `model.cache_bytes`; transformers: hidden states of every layer + bucket ids |")
    fits = (NOMINAL_GPU_BYTES - weight_bytes) // cb
    hf_fits = (NOMINAL_GPU_BYTES - weight_bytes) // hf_cb
    here = f"; this GPU, free after loading the weights: {free_after_weights // cb}" if cuda else ""
    rows.append(f"| streams of {max_ctx} that fit in 80 GB | – | {max_ctx} | {fits} | – | {hf_fits} | "
                f"(80e9 B - {fmt_bytes(weight_bytes)} weights) / cache bytes{here} |")
    free_device(dev)
    return header, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny widths and contexts (dry runs on a CPU)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="same as --device cpu --small with few steps")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--contexts", type=int, nargs="+", help="default 1K 16K 64K (--small: 256 1024)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prefill-context", type=int, help="default: the model's max context (64K)")
    ap.add_argument("--steps", type=int, default=136, help="timed decode steps per cell (136: one merge each)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--hf-steps", type=int, default=8)
    ap.add_argument("--hf-prefill-s", type=float, default=30.0, help="time kept for transformers' prefill")
    ap.add_argument("--no-graphs", action="store_true", help="skip the captured-steps (CUDA graph) column")
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip cells still to run after this long")
    ap.add_argument("--reserve-s", type=float, default=20.0, help="time a cell needs to be started")
    ap.add_argument("--out", type=Path, help="write the table here too")
    args = ap.parse_args()
    if args.cpu_dry_run:
        args.device, args.small = "cpu", True
        args.steps, args.warmup, args.hf_steps = min(args.steps, 6), 1, 3
        args.batches = [b for b in args.batches if b <= 16][:2] or [1]
        args.batches = [min(b, 4) for b in args.batches]
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device (use --cpu-dry-run for a CPU dry run)")
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    budget = Budget(args.budget_s)
    signal.signal(signal.SIGTERM, budget.stop)
    header, rows = run(args, budget)
    text = header + "\n\n" + "\n".join(rows) + "\n"
    print(text, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
