"""The training loop: it learns, and a resumed run continues exactly where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reformer_infer import load_model
from reformer_infer.train import heldout_bits_per_byte, lr_at, parse_args, read_bytes_as_ids, train

TINY_MODEL = {
    "attn_layers": ["local", "lsh"],
    "hidden_size": 32,
    "num_attention_heads": 2,
    "attention_head_size": 16,
    "feed_forward_size": 64,
    "axial_pos_shape": [8, 8],
    "axial_pos_embds_dim": [8, 24],
    "max_position_embeddings": 64,
    "lsh_attn_chunk_length": 8,
    "local_attn_chunk_length": 8,
    "num_buckets": 4,
    "num_hashes": 2,
    "chunk_size_feed_forward": 16,
}

# A small, very repetitive corpus: a tiny model can learn it within a few dozen steps.
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text(TEXT)
    (data / "heldout.txt").write_text(TEXT[7:2000])
    (tmp_path / "model.json").write_text(json.dumps(TINY_MODEL))
    return tmp_path


def tiny_args(workdir: Path, out: str, steps: int, *extra: str) -> list[str]:
    return [
        "--data-dir", str(workdir / "data"), "--out", str(workdir / out),
        "--model-config", str(workdir / "model.json"),
        "--steps", str(steps), "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--warmup", "5",
        "--eval-every", "1000", "--eval-windows", "8", "--ckpt-every", "3", "--log-every", "5",
        "--threads", "1", *extra,
    ]  # fmt: skip


def test_training_reduces_heldout_bits_per_byte(workdir: Path) -> None:
    args = parse_args(tiny_args(workdir, "run", 40, "--export", str(workdir / "export")))
    train(args)
    heldout = read_bytes_as_ids(workdir / "data" / "heldout.txt")
    trained = load_model(workdir / "export")
    untrained = load_model(workdir / "export")
    torch.manual_seed(1)
    for p in untrained.parameters():
        torch.nn.init.normal_(p, std=0.02)
    bpb_trained = heldout_bits_per_byte(trained, heldout, 32, 8)
    bpb_untrained = heldout_bits_per_byte(untrained, heldout, 32, 8)
    assert bpb_untrained > 7.5  # ~log2(258) for near-uniform predictions
    assert bpb_trained < bpb_untrained - 3.0


def test_resumed_run_matches_uninterrupted_run(workdir: Path) -> None:
    train(parse_args(tiny_args(workdir, "straight", 6)))
    # Same run interrupted after step 3 (the checkpoint interval), then resumed to step 6.
    train(parse_args(tiny_args(workdir, "split", 3)))
    state = train(parse_args(tiny_args(workdir, "split", 6, "--resume")))
    assert state.step == 6
    straight = torch.load(workdir / "straight" / "ckpt.pt", weights_only=False)
    split = torch.load(workdir / "split" / "ckpt.pt", weights_only=False)
    for key in ("step", "tokens_seen"):
        assert straight["state"][key] == split["state"][key]
    assert torch.equal(straight["rng"], split["rng"])  # same batches and rotations drawn
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(split["model"][name], tensor, rtol=0, atol=0, msg=name)


def test_axial_rows_stay_tied_so_long_positions_were_trained(workdir: Path) -> None:
    train(parse_args(tiny_args(workdir, "tied", 4)))
    ckpt = torch.load(workdir / "tied" / "ckpt.pt", weights_only=False)
    n1, d1 = TINY_MODEL["axial_pos_shape"][0], TINY_MODEL["axial_pos_embds_dim"][0]
    (table,) = [t for k, t in ckpt["model"].items() if "pos" in k and t.numel() == n1 * d1]
    rows = table.reshape(n1, d1)
    torch.testing.assert_close(rows, rows[:1].expand_as(rows), rtol=0, atol=0)


def test_schedule_warms_up_then_decays_to_floor() -> None:
    args = parse_args(["--steps", "100", "--warmup", "10", "--lr", "1e-3", "--min-lr-ratio", "0.1"])
    assert lr_at(0, args) == pytest.approx(1e-4)
    assert lr_at(9, args) == pytest.approx(1e-3)
    assert lr_at(55, args) < lr_at(20, args)
    assert lr_at(100, args) == pytest.approx(1e-4)
