"""Checkpoints that speak their own text: a SentencePiece BPE model (trained here on the Austen data, byte
fallback on) beside a random-init transformers ReformerModelWithLMHead of that vocab, the same tokenizer as a
tokenizer.json, a 320-vocab checkpoint without a tokenizer, and a tokenizer whose size disagrees.

The server runs in-process on a thread of its own (its event loop there), so the sync SDK and the CLI talk to
it from the test thread as a user would."""

from __future__ import annotations

import asyncio
import io
import logging
import random
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from reformer_client import Client, FailedPreconditionError
from reformer_client import cli as client_cli
from reformer_client.types import Finished, TextChunk
from reformer_server._proto import generation_pb2 as pb
from reformer_server._proto import generation_pb2_grpc as pb_grpc
from reformer_server.config import parse_config
from reformer_server.server import ReformerServer

from reformer_infer import CheckpointError, load_model, save_model
from reformer_infer.tokenizer import JsonTokenizer, SentencePieceTokenizer

spm = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"
VOCAB = 320
PROMPTS = ("Emma Woodhouse, handsome, clever, and rich", "Raskolnikov went — naïve café, €5, 日本語 🙂")


def train_spiece(out: Path, vocab_size: int = VOCAB) -> Path:
    """A SentencePiece BPE model with byte fallback, trained on two Austen novels (well under a second).
    Identity normalisation keeps text as typed, so the tokenizer.json built from it encodes the same."""
    text = "".join((AUSTEN / n).read_text(encoding="utf-8")[:150_000] for n in ("emma.txt", "persuasion.txt"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, pad_id=0, unk_id=1, eos_id=2, bos_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )
    out.write_bytes(model.getvalue())
    return out


def tokenizer_json_from_spiece(spiece: Path, out: Path) -> Path:
    """The same BPE as a tokenizer.json (what transformers' Llama converter builds for a byte-fallback model):
    the merges are read back from the pieces in rank order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    merges = []
    for i in range(n):
        if sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i):
            continue
        piece = sp.id_to_piece(i)
        merges += [(i, vocab[piece[:k]], piece[:k], piece[k:]) for k in range(1, len(piece))
                   if piece[:k] in vocab and piece[k:] in vocab]
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True) for i in range(n)
                            if sp.is_control(i) or sp.is_unknown(i)])
    tok.save(str(out))
    return out


def hf_checkpoint(d: Path, vocab_size: int) -> Path:
    """A random-init transformers ReformerModelWithLMHead (tiny; crime-and-punishment's special ids)."""
    torch.manual_seed(0)
    config = transformers.ReformerConfig(
        attn_layers=["local", "lsh", "local", "lsh"], hidden_size=32, num_attention_heads=2, attention_head_size=16,
        feed_forward_size=64, axial_pos_shape=[16, 16], axial_pos_embds_dim=[16, 16], max_position_embeddings=256,
        lsh_attn_chunk_length=8, local_attn_chunk_length=4, num_buckets=4, num_hashes=2, vocab_size=vocab_size,
        is_decoder=True, hash_seed=1234, eos_token_id=2, pad_token_id=0,
    )
    transformers.ReformerModelWithLMHead(config).eval().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    spiece = train_spiece(root / "spiece.model")
    base = hf_checkpoint(root / "none", VOCAB)
    out = {"none": base}
    for name in ("sentencepiece", "tokenizers"):
        out[name] = shutil.copytree(base, root / name)
    shutil.copyfile(spiece, out["sentencepiece"] / "spiece.model")
    tokenizer_json_from_spiece(spiece, out["tokenizers"] / "tokenizer.json")
    out["mismatch"] = hf_checkpoint(root / "mismatch", VOCAB + 16)
    shutil.copyfile(spiece, out["mismatch"] / "spiece.model")
    return out


def reference(kind: str, d: Path) -> tuple:
    """(encode, decode, piece) of the tokenizer library itself, the oracle."""
    if kind == "sentencepiece":
        sp = spm.SentencePieceProcessor(model_file=str(d / "spiece.model"))
        return (lambda t: list(sp.encode(t))), (lambda ids: sp.decode(list(ids))), sp.id_to_piece
    tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    return (lambda t: tok.encode(t, add_special_tokens=False).ids), (
        lambda ids: tok.decode(list(ids), skip_special_tokens=True)), tok.id_to_token


def past_prompt(whole: str, head: str) -> str:
    """The text of prompt + generated ids past the prompt's own text. Where the generated ids change how the
    prompt's last characters decode (they complete its unfinished character, or, with the `tokenizers` byte
    fallback, make its final byte run invalid), past the longest prefix the two decodes share."""
    k = 0
    while k < min(len(whole), len(head)) and whole[k] == head[k]:
        k += 1
    return whole[k:]


@contextmanager
def serving(model_dir: Path) -> Iterator[ReformerServer]:
    """A ReformerServer on its own thread and event loop (the SDK and the CLI block the test thread)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cfg = parse_config(["--model", str(model_dir), "--port", "0", "--metrics-port", "-1", "--cache-memory", "64MiB"],
                       env={})


    async def up() -> ReformerServer:  # built on its loop: grpc.aio binds to the loop it is created on
        srv = ReformerServer(cfg)
        await srv.start()
        await srv.load()
        return srv

    srv = asyncio.run_coroutine_threadsafe(up(), loop).result(60)
    switch, threads = sys.getswitchinterval(), torch.get_num_threads()
    sys.setswitchinterval(0.0005)  # as reformer-server sets it: three threads here take turns with the GIL
    torch.set_num_threads(1)  # the test machine is small and shared (as for the subprocess servers)
    try:
        yield srv
    finally:
        sys.setswitchinterval(switch)
        torch.set_num_threads(threads)
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# ---- the library: picking, refusing, saving ------------------------------------------------------------
def test_checkpoint_directory_picks_its_tokenizer(dirs: dict[str, Path], tmp_path: Path) -> None:
    for kind in ("sentencepiece", "tokenizers", "none"):
        tok = load_model(dirs[kind]).tokenizer
        assert (tok.kind, tok.vocab_size) == (kind, VOCAB)
    both = shutil.copytree(dirs["tokenizers"], tmp_path / "both")
    shutil.copyfile(dirs["sentencepiece"] / "spiece.model", both / "spiece.model")
    assert load_model(both).tokenizer.kind == "tokenizers"  # tokenizer.json comes first


def test_tokenizer_whose_size_disagrees_with_the_vocab_is_refused_at_load(dirs: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match=rf"spiece.model: the tokenizer has {VOCAB} tokens but the model's "
                                              rf"vocab_size is {VOCAB + 16}"):
        load_model(dirs["mismatch"])


def test_model_without_tokenizer_logs_a_warning_naming_the_missing_files(
    dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="reformer_infer.tokenizer"):
        load_model(dirs["none"])
    assert "tokenizer.json or spiece.model" in caplog.text and "FAILED_PRECONDITION" in caplog.text


def test_save_model_copies_the_tokenizer_files(dirs: dict[str, Path], tmp_path: Path) -> None:
    for kind, file in (("sentencepiece", "spiece.model"), ("tokenizers", "tokenizer.json")):
        save_model(load_model(dirs[kind]), tmp_path / kind)
        assert (tmp_path / kind / file).read_bytes() == (dirs[kind] / file).read_bytes()
        again = load_model(tmp_path / kind).tokenizer
        assert again.kind == kind and again.encode(PROMPTS[1]) == load_model(dirs[kind]).tokenizer.encode(PROMPTS[1])


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizers"])
def test_streamed_text_is_the_whole_decode_past_the_prompt(dirs: dict[str, Path], kind: str) -> None:
    """Any ids (byte pieces, specials, invalid UTF-8) fed in random slices stream exactly what the library's
    decode of prompt + generated gives past the prompt's own text."""
    path = dirs[kind] / ("spiece.model" if kind == "sentencepiece" else "tokenizer.json")
    tok = SentencePieceTokenizer(path) if kind == "sentencepiece" else JsonTokenizer(path)
    rng = random.Random(0)
    pieces = [tok.encode(s) for s in ("é", "€", " 日本", " the", "🙂", "a b")]
    text = (AUSTEN / "emma.txt").read_text(encoding="utf-8")[:20_000]
    for trial in range(400):
        if trial % 2:
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 10))]
        else:
            i = rng.randrange(len(text) - 60)
            prompt = tok.encode(text[i : i + rng.randrange(1, 40)] + rng.choice(["", "é", " €"]))
        generated: list[int] = []
        while len(generated) < rng.randrange(1, 25):
            generated += [rng.randrange(VOCAB)] if rng.random() < 0.6 else rng.choice(pieces)
        detok, out, i = tok.detokenizer(prompt), [], 0
        while i < len(generated):
            k = rng.randint(1, 3)
            out.append(detok.push(generated[i : i + k]))
            i += k
        out.append(detok.flush())
        whole = tok.decode(prompt + generated)
        assert "".join(out) == past_prompt(whole, tok.decode(prompt)), [tok.piece(t) for t in prompt + generated]


# ---- the server ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizers"])
def test_server_speaks_the_checkpoints_text(dirs: dict[str, Path], kind: str) -> None:
    encode, decode, piece = reference(kind, dirs[kind])
    sp_encode = reference("sentencepiece", dirs["sentencepiece"])[0]
    with serving(dirs[kind]) as srv, Client(f"127.0.0.1:{srv.port}") as client:
        info = client.model_info()
        assert (info.tokenizer.kind, info.tokenizer.vocab_size) == (kind, VOCAB)
        assert info.tokenizer.file == ("spiece.model" if kind == "sentencepiece" else "tokenizer.json")
        for text in (*PROMPTS, "  two  spaces\nand a line"):
            ids = client.tokenize(text)
            assert ids == encode(text) == sp_encode(text)  # the tokenizer.json is the same tokenizer
            assert client.detokenize(ids) == decode(ids)
        some = [5, 200, 17, 2, 298, 0, 131]  # byte pieces, pad and eos among them
        assert client.detokenize(some) == decode(some)
        for prompt in PROMPTS:
            head = decode(encode(prompt))
            for params in ({"temperature": 0.0}, {"temperature": 1.2, "seed": 11}):
                events = list(client.generate_stream(prompt, max_new_tokens=32, ignore_eos=True, logprobs=1,
                                                     **params))
                chunks = [e for e in events if isinstance(e, TextChunk)]
                finished = events[-1]
                assert isinstance(finished, Finished)
                ids = [t for c in chunks for t in c.token_ids]
                streamed = "".join(e.text for e in events if isinstance(e, TextChunk | Finished))
                assert streamed == past_prompt(decode(encode(prompt) + ids), head)
                assert finished.usage.prompt_tokens == len(encode(prompt))  # tokens, not bytes
                lps = [lp for c in chunks for lp in c.logprobs]
                assert [lp.token for lp in lps] == [piece(t) for t in ids]
                assert all(top.token == piece(top.token_id) for lp in lps for top in lp.top)
                unary = client.generate(prompt, max_new_tokens=32, ignore_eos=True, logprobs=1, **params)
                assert (list(unary.token_ids), unary.text) == (ids, streamed)  # greedy or seeded: the same run
                assert [lp.token for lp in unary.logprobs] == [lp.token for lp in lps]
        # stop strings match the streamed text, as for the byte-level model
        full = client.generate(PROMPTS[1], max_new_tokens=32, ignore_eos=True, temperature=1.2, seed=11).text
        stop = full[len(full) // 2 : len(full) // 2 + 2]
        cut = client.generate(PROMPTS[1], max_new_tokens=32, ignore_eos=True, temperature=1.2, seed=11, stop=[stop])
        assert cut.text == full[: full.index(stop)] and cut.finish_reason.value == "stop"


def test_model_without_tokenizer_serves_ids_and_refuses_text(
    dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with serving(dirs["none"]) as srv, Client(f"127.0.0.1:{srv.port}") as client:
        target = f"127.0.0.1:{srv.port}"
        assert client.model_info().tokenizer.kind == "none"
        calls = (
            lambda: client.generate("Raskolnikov went", max_new_tokens=3),
            lambda: list(client.generate_stream("Raskolnikov went", max_new_tokens=3)),
            lambda: client.tokenize("Raskolnikov"),
            lambda: client.detokenize([5, 6, 7]),
            lambda: client.generate([5, 6, 7], max_new_tokens=3, stop=["x"]),
        )
        for call in calls:
            with pytest.raises(FailedPreconditionError, match="tokenizer.json or spiece.model"):
                call()
        result = client.generate([5, 6, 7, 300], max_new_tokens=6, ignore_eos=True, temperature=0.0)
        assert len(result.token_ids) == 6 and result.text == "" and result.usage.prompt_tokens == 4
        with grpc.insecure_channel(target) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.TextGenerationStub(ch).Tokenize(pb.TokenizeRequest(text="x"))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert srv.engine.stats().cache_bytes_in_use == 0
        capsys.readouterr()
        assert client_cli.main(["--target", target, "generate", "Raskolnikov went"]) != 0
        err = capsys.readouterr().err
        assert "FAILED_PRECONDITION" in err and "spiece.model" in err
        assert client_cli.main(["--target", target, "info"]) == 0
        assert "tokenizer:    none, 320 tokens; token ids only" in capsys.readouterr().out


def test_info_reports_the_tokenizer(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with serving(dirs["sentencepiece"]) as srv:
        assert client_cli.main(["--target", f"127.0.0.1:{srv.port}", "info"]) == 0
    assert "tokenizer:    sentencepiece (spiece.model), 320 tokens\n" in capsys.readouterr().out


def test_reformer_export_copies_the_tokenizer_and_the_exported_backend_speaks_it(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    from reformer_server.backend import load_backend

    from reformer_infer.export import main as export_main

    out = tmp_path / "exported"
    assert export_main(["--model", str(dirs["sentencepiece"]), "--format", "torchscript", "--out", str(out),
                        "--no-verify"]) == 0
    assert (out / "spiece.model").read_bytes() == (dirs["sentencepiece"] / "spiece.model").read_bytes()
    tok = load_backend("torchscript", out, "cpu", "float32").tokenizer
    assert (tok.kind, tok.vocab_size) == ("sentencepiece", VOCAB)
    assert tok.encode(PROMPTS[1]) == load_model(dirs["sentencepiece"]).tokenizer.encode(PROMPTS[1])
