"""Byte-level tokenizer (google/reformer-enwik8 convention) and streaming text helpers.

Token id = UTF-8 byte + 2; id 0 is padding, id 1 is unused and id 2 doubles as end-of-sequence (so the
NUL byte, which shares id 2, cannot be told apart from eos: `decode` treats id 2 as eos and drops it).

Streaming a generation needs two guarantees, both handled here:
- `IncrementalDetokenizer` never emits half a UTF-8 character: bytes of an incomplete sequence are held
  until the character completes (invalid bytes become U+FFFD, as `bytes.decode(errors="replace")` does).
- `StopStringMatcher` releases text only once it can no longer be the start of a stop string, so a client
  never sees a partial stop string that is later retracted.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

PAD_ID = 0
UNUSED_ID = 1
EOS_ID = 2
BYTE_OFFSET = 2
VOCAB_SIZE = 256 + BYTE_OFFSET


class ByteTokenizer:
    """Text <-> token ids, one token per UTF-8 byte (id = byte + 2). No BOS token is added."""

    vocab_size: int = VOCAB_SIZE
    pad_token_id: int = PAD_ID
    eos_token_id: int = EOS_ID

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text`, each shifted by 2."""
        return [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of `encode`; special ids (pad, unused, eos) are skipped, bad UTF-8 becomes U+FFFD."""
        return bytes(token_to_byte(i) for i in ids if is_byte_token(i)).decode("utf-8", errors="replace")

    def token_to_bytes(self, token_id: int) -> bytes:
        """The raw byte a token stands for (b"" for special ids)."""
        return bytes((token_to_byte(token_id),)) if is_byte_token(token_id) else b""


def is_byte_token(token_id: int) -> bool:
    """True for ids that stand for a byte (everything except pad, unused and eos)."""
    return BYTE_OFFSET < token_id < VOCAB_SIZE


def token_to_byte(token_id: int) -> int:
    return token_id - BYTE_OFFSET


class IncrementalDetokenizer:
    """Turns a stream of byte tokens into text deltas that never split a UTF-8 character."""

    def __init__(self) -> None:
        # The stdlib incremental decoder keeps the bytes of an unfinished character between calls.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: Sequence[int]) -> str:
        """Feed new token ids; return the text that is now complete (possibly "")."""
        data = bytes(token_to_byte(i) for i in token_ids if is_byte_token(i))
        return self._decoder.decode(data, final=False) if data else ""

    def flush(self) -> str:
        """End of stream: an unfinished character is released as U+FFFD."""
        return self._decoder.decode(b"", final=True)


class StopStringMatcher:
    """Holds back text that could still become a stop string; reports the first stop string found.

    `push(text)` returns `(released, stopped)`. When a stop string occurs, `released` is the text before
    the stop string that completes first and `stopped` is True (the stop string itself and anything after it are dropped).
    Otherwise `released` is everything except the longest suffix of the pending text that is a proper
    prefix of some stop string.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    @property
    def pending(self) -> str:
        return self._pending

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stop:
            return text, False
        buf = self._pending + text
        # The stop string that completes first wins (smallest end; at equal ends the one starting earlier),
        # as it would token by token: the result does not depend on how the text arrives in pieces.
        best: tuple[int, int] | None = None
        for s in self._stop:
            i = buf.find(s)
            if i != -1 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
        first = -1 if best is None else best[1]
        if first != -1:
            self._pending = ""
            self.stopped = True
            return buf[:first], True
        hold = self._held_suffix_len(buf)
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Generation ended for another reason: the held text can no longer complete a stop string."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out

    def _held_suffix_len(self, buf: str) -> int:
        # Longest k such that buf[-k:] is a proper prefix of some stop string. Stop strings are short,
        # so checking every candidate length is cheap (O(sum of stop lengths^2) per push at worst).
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if s.startswith(buf[len(buf) - k :]):
                    best = k
                    break
        return best
