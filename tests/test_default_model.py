"""The bundled default model: it loads from the package, generates deterministically, and is trained."""

from __future__ import annotations

import pytest
import torch

from reformer_infer import default_model_path, load_model
from reformer_infer.generation import generate
from reformer_infer.tokenizer import ByteTokenizer
from reformer_infer.train import heldout_bits_per_byte

# From Persuasion, the novel held out of training (Project Gutenberg text, public domain).
HELDOUT_SNIPPET = (
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who,\n"
    "for his own amusement, never took up any book but the Baronetage; there\n"
    "he found occupation for an idle hour, and consolation in a distressed\n"
    "one; there his faculties were roused into admiration and respect, by\n"
    "contemplating the limited remnant of the earliest patents; there any\n"
    "unwelcome sensations, arising from domestic affairs changed naturally\n"
    "into pity and contempt as he turned over the almost endless creations\n"
    "of the last century; and there, if every other leaf were powerless, he\n"
    "could read his own history with an interest which never failed.\n"
)
# Untrained weights score about log2(258) = 8.0 bits/byte; a byte-level model that has learnt any
# English spelling is far below 4. (The bundled model's figure is in its MODEL_CARD.md.)
TRAINED_THRESHOLD_BITS_PER_BYTE = 3.0


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model(default_model_path())


def test_default_model_path_holds_a_checkpoint_and_card() -> None:
    path = default_model_path()
    for name in ("config.json", "model.safetensors", "MODEL_CARD.md"):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size <= 25 * 2**20


def test_default_model_covers_64k_positions_with_lsh_layers(model: torch.nn.Module) -> None:
    config = model.config
    assert config.max_context >= 65536
    assert config.attn_layers.count("lsh") >= 2 and "local" in config.attn_layers
    assert config.vocab_size == 258 and config.chunk_size_feed_forward > 0


def test_seeded_sampling_is_deterministic(model: torch.nn.Module) -> None:
    prompt = ByteTokenizer().encode("It is a truth universally acknowledged")
    first = list(generate(model, prompt, 24, temperature=0.8, top_k=40, seed=1234))
    second = list(generate(model, prompt, 24, temperature=0.8, top_k=40, seed=1234))
    assert len(first) == 24
    assert first == second


def test_heldout_bits_per_byte_is_far_below_untrained(model: torch.nn.Module) -> None:
    data = torch.frombuffer(bytearray(HELDOUT_SNIPPET.encode("utf-8")), dtype=torch.uint8)
    bpb = heldout_bits_per_byte(model, data, seq_len=len(HELDOUT_SNIPPET) - 1, max_windows=1)
    assert bpb < TRAINED_THRESHOLD_BITS_PER_BYTE, bpb


def test_untrained_weights_cannot_reach_the_threshold() -> None:
    untrained = load_model(default_model_path())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in untrained.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    data = torch.frombuffer(bytearray(HELDOUT_SNIPPET.encode("utf-8")), dtype=torch.uint8)
    bpb = heldout_bits_per_byte(untrained, data, seq_len=len(HELDOUT_SNIPPET) - 1, max_windows=1)
    assert bpb > 7.0, bpb
