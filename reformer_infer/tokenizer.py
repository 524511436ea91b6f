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
from collections import deque
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

    Matching is an Aho-Corasick automaton over characters (Aho & Corasick 1975, "Efficient string
    matching"): its state is exactly that longest suffix (a node of the trie of stop strings), so a pushed
    character costs amortised O(1) and at most the longest stop string's length, whatever the number of
    stop strings; building it costs their total length. (Scanning every stop string per token let a
    request with 200,000 of them stall the engine for everyone, issue 18.)
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._goto: list[dict[str, int]] = [{}]  # trie edges
        self._fail: list[int] = [0]  # longest proper suffix of a node's string that is also a node
        self._depth: list[int] = [0]
        self._match: list[int] = [0]  # length of the longest stop string ending at a node (0: none)
        for s in self._stop:
            node = 0
            for ch in s:
                nxt = self._goto[node].get(ch)
                if nxt is None:
                    nxt = len(self._goto)
                    self._goto[node][ch] = nxt
                    self._goto.append({})
                    self._fail.append(0)
                    self._depth.append(self._depth[node] + 1)
                    self._match.append(0)
                node = nxt
            self._match[node] = len(s)
        queue = deque(self._goto[0].values())  # breadth first: a node's fail link is shallower than it
        while queue:
            node = queue.popleft()
            for ch, child in self._goto[node].items():
                f = self._fail[node]
                while f and ch not in self._goto[f]:
                    f = self._fail[f]
                g = self._goto[f].get(ch, 0)
                self._fail[child] = g if g != child else 0
                self._match[child] = max(self._match[child], self._match[self._fail[child]])
                queue.append(child)
        self._state = 0
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
        goto, fail, match = self._goto, self._fail, self._match
        state = self._state
        for i, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if match[state]:
                # The first end position with a match; at that end the longest stop string (the one starting
                # earliest) wins, as it would token by token: the result does not depend on the pieces.
                end = len(buf) - len(text) + i + 1
                self._pending = ""
                self.stopped = True
                return buf[: end - match[state]], True
        self._state = state
        hold = self._depth[state]
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Generation ended for another reason: the held text can no longer complete a stop string."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out
