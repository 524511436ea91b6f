"""Byte tokenizer, UTF-8-safe incremental detokenisation and stop-string hold-back."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from reformer_infer.tokenizer import EOS_ID, ByteTokenizer, IncrementalDetokenizer, StopStringMatcher


def test_encode_is_bytes_plus_two_and_decode_inverts_it() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 258
    assert tok.encode("A") == [ord("A") + 2]
    text = "héllo wörld — 日本語 🙂"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_decode_skips_special_ids_and_replaces_bad_utf8() -> None:
    tok = ByteTokenizer()
    assert tok.decode([0, 1, EOS_ID] + tok.encode("ok") + [0]) == "ok"
    assert tok.decode([0xFF + 2]) == "\ufffd"


# NUL is excluded: byte 0 shares id 2 with eos (the enwik8 convention) and decodes as nothing.
# Lone surrogates cannot occur in text that arrives as UTF-8 (protobuf strings, files), so none are drawn.
# U+FFFD itself is excluded: the assertion below looks for it as the sign of a split character.
@given(
    st.text(st.characters(exclude_characters="\x00\ufffd", exclude_categories=("Cs",))),
    st.integers(min_value=0, max_value=2**32),
)
def test_incremental_detokenizer_never_splits_a_character(text: str, seed: int) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    rng = random.Random(seed)
    detok = IncrementalDetokenizer()
    out = []
    i = 0
    while i < len(ids):
        n = rng.randint(1, 4)
        delta = detok.push(ids[i : i + n])
        assert "\ufffd" not in delta  # valid UTF-8 split anywhere: no replacement char ever
        out.append(delta)
        i += n
    out.append(detok.flush())
    assert "".join(out) == text


def test_incremental_detokenizer_holds_partial_character_until_complete() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("€")  # 3 bytes
    detok = IncrementalDetokenizer()
    assert detok.push(ids[:1]) == ""
    assert detok.push(ids[1:2]) == ""
    assert detok.push(ids[2:]) == "€"


def test_incremental_detokenizer_flushes_truncated_character_as_replacement() -> None:
    detok = IncrementalDetokenizer()
    assert detok.push(ByteTokenizer().encode("€")[:2]) == ""
    assert detok.flush() == "\ufffd"


def test_stop_matcher_holds_back_possible_prefix_then_releases_it() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.push("abc ST") == ("abc ", False)
    assert m.pending == "ST"
    assert m.push("x") == ("STx", False)
    assert m.push("S") == ("", False)
    assert m.flush() == "S"


def test_stop_matcher_cuts_text_at_first_stop_string() -> None:
    m = StopStringMatcher(["END", "\n\n"])
    assert m.push("hello E") == ("hello ", False)
    released, stopped = m.push("ND and more")
    assert (released, stopped) == ("", True)
    assert m.push("later") == ("", True)
    assert m.flush() == ""


def test_stop_matcher_picks_earliest_of_several_stop_strings() -> None:
    m = StopStringMatcher(["world", "o w"])
    assert m.push("hello world") == ("hell", True)


@given(
    st.text(alphabet="abcST", max_size=40),
    st.lists(st.text(alphabet="abcST", min_size=1, max_size=4), min_size=1, max_size=3),
    st.integers(min_value=0, max_value=2**32),
)
def test_stop_strings_never_leak_a_partial_match(text: str, stops: list[str], seed: int) -> None:
    """Streaming in random pieces releases exactly the text before the first stop, never a stop prefix."""
    rng = random.Random(seed)
    m = StopStringMatcher(stops)
    released = ""
    stopped = False
    i = 0
    while i < len(text) and not stopped:
        n = rng.randint(1, 3)
        out, stopped = m.push(text[i : i + n])
        released += out
        i += n
        if not stopped:
            # Nothing released may end in a way that the unreleased text could still complete a stop.
            for s in stops:
                assert s not in released
    if not stopped:
        released += m.flush()
    # the stop that completes first (smallest end, then earliest start) cuts the text, however it arrived
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    first = min(ends)[1] if ends else -1
    assert released == (text[:first] if first != -1 else text)


def test_byte_tokenizer_spells_tokens_as_characters_or_byte_pieces() -> None:
    tok = ByteTokenizer()
    assert [tok.piece(i) for i in tok.encode("A €")] == ["A", " ", "<0xE2>", "<0x82>", "<0xAC>"]
    assert [tok.piece(i) for i in (0, 1, EOS_ID)] == ["<pad>", "<unused>", "</s>"]
    assert tok.kind == "byte" and tok.has_text and tok.files == ()


def _first_stop_by_brute_force(text: str, stops: list[str]) -> tuple[str, bool]:
    """Reference: feed `text` one character at a time and cut at the first end position where any stop string
    ends (the longest one there); what is released overall is the text before it."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if s and text[:end].endswith(s)]
        if ending:
            return text[: end - max(map(len, ending))], True
    return text, False


@given(st.text(alphabet="abc€", max_size=40), st.lists(st.text(alphabet="abc€", min_size=1, max_size=5), max_size=6),
       st.integers(0, 2**16))
def test_stop_automaton_equals_a_character_by_character_search(text: str, stops: list[str], seed: int) -> None:
    rng = random.Random(seed)
    m = StopStringMatcher(stops)
    released, stopped, pos = "", False, 0
    while pos < len(text) and not stopped:
        k = rng.randint(0, 5)
        out, stopped = m.push(text[pos : pos + k])
        released += out
        pos += k
        # what is held back is exactly the longest suffix that could still start a stop string
        if not stopped:
            seen = text[:pos]
            hold = max((k for s in stops for k in range(1, len(s)) if seen.endswith(s[:k])), default=0)
            assert m.pending == seen[len(seen) - hold :] if hold else m.pending == ""
    if not stopped:
        released += m.flush()
    assert (released, stopped) == _first_stop_by_brute_force(text, stops)


def test_many_long_stop_strings_build_one_automaton_over_their_total_length() -> None:
    stops = [f"{i:05d}" + "x" * 250 for i in range(16)]  # the server's default limits: 16 x 256 bytes
    m = StopStringMatcher(stops)
    assert len(m._goto) <= 1 + sum(map(len, stops))
    out, stopped = m.push("abc 00007" + "x" * 250 + " tail")
    assert (out, stopped) == ("abc ", True)
