"""Prepare the training corpus: Jane Austen's six novels as plain UTF-8 text.

Source: the Debian package ``r-cran-janeaustenr`` (MIT, Julia Silge; the novels themselves are in
the public domain). The novels are stored there as R lazy-load data (``data/Rdata.rdx`` index and
``data/Rdata.rdb`` values): each value is a zlib-compressed R serialisation (XDR, format "X\\n") of
a character vector, one line of the novel per element. This script downloads the .deb with
``apt-get download``, unpacks it with ``dpkg-deb -x`` and decodes the R serialisation with the
standard library, so training is reproducible on any Debian-like machine without R.

Output (git-ignored): ``data/austen/<novel>.txt`` plus ``train.txt`` (five novels) and
``heldout.txt`` (one whole novel, never seen in training). When ``apt-get`` is unavailable the
script falls back to copying an existing extraction (``--fallback-dir``) and says so.

Usage::

    python scripts/prepare_data.py [--out data/austen] [--heldout persuasion]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

logger = logging.getLogger("prepare_data")

PACKAGE = "r-cran-janeaustenr"
DATA_DIR_IN_DEB = Path("usr/lib/R/site-library/janeaustenr/data")
NOVELS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
DEFAULT_FALLBACK = Path("/work/shared/data/austen")

# R serialisation type codes (R Internals, "Serialization Formats").
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
NA_INTEGER = -(2**31)


class RUnpickler:
    """Reads the subset of R's XDR serialisation that data objects use.

    Supports vectors (logical, integer, double, character, list), pairlists (attributes), symbols
    and back-references to symbols; anything else (closures, environments, ALTREP) raises, since
    a data package of plain character vectors never contains it.
    """

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError(f"not an XDR R serialisation (header {data[:2]!r})")
        self._buf = data
        self._pos = 2
        self._refs: list[Any] = []
        version = self._int()
        self._int()  # writer's R version
        self._int()  # minimal reader R version
        if version == 3:
            self._bytes(self._int())  # native encoding name, e.g. b"UTF-8"
        elif version != 2:
            raise ValueError(f"unsupported serialisation version {version}")

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self._buf, self._pos)
        self._pos += 4
        return value

    def _bytes(self, n: int) -> bytes:
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two more ints, upper and lower 32 bits
            upper, lower = self._int(), self._int()
            n = (upper << 32) | (lower & 0xFFFFFFFF)
        return n

    def read(self) -> Any:
        flags = self._int()
        sxp_type = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if sxp_type == NILVALUE_SXP:
            return None
        if sxp_type in (GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP):
            return f"<env {sxp_type}>"
        if sxp_type == REFSXP:
            index = flags >> 8  # packed reference index, 0 means "read it from the stream"
            if index == 0:
                index = self._int()
            return self._refs[index - 1]
        if sxp_type == SYMSXP:
            name = self.read()
            self._refs.append(name)
            return name
        if sxp_type == CHARSXP:
            n = self._int()
            if n == -1:
                return None  # NA_character_
            # Encoding bits live in the "levels" field (flags >> 12): LATIN1 = 1 << 2, UTF8 = 1 << 3.
            is_latin1 = bool((flags >> 12) & (1 << 2))
            return self._bytes(n).decode("latin-1" if is_latin1 else "utf-8")
        if sxp_type == LISTSXP:
            return self._pairlist(has_attr, has_tag)
        value: Any
        if sxp_type == STRSXP:
            value = [self.read() for _ in range(self._length())]
        elif sxp_type == VECSXP:
            value = [self.read() for _ in range(self._length())]
        elif sxp_type in (INTSXP, LGLSXP):
            n = self._length()
            value = list(struct.unpack_from(f">{n}i", self._buf, self._pos))
            self._pos += 4 * n
        elif sxp_type == REALSXP:
            n = self._length()
            value = list(struct.unpack_from(f">{n}d", self._buf, self._pos))
            self._pos += 8 * n
        else:
            raise ValueError(f"unsupported R object type {sxp_type} at byte {self._pos - 4}")
        if has_attr:
            attrs = self.read()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if names is not None and isinstance(value, list) and len(names) == len(value):
                return dict(zip(names, value, strict=True))
        return value

    def _pairlist(self, has_attr: bool, has_tag: bool) -> dict[str, Any]:
        # A pairlist is a chain of (attr?, tag?, car, cdr) cells; we read it as an ordered dict.
        out: dict[str, Any] = {}
        while True:
            if has_attr:
                self.read()
            tag = self.read() if has_tag else str(len(out))
            out[tag] = self.read()
            flags = self._int()
            if flags & 0xFF == NILVALUE_SXP:
                return out
            if flags & 0xFF != LISTSXP:
                raise ValueError("pairlist tail is not a pairlist")
            has_attr = bool(flags & (1 << 9))
            has_tag = bool(flags & (1 << 10))


def read_lazyload_db(rdx: Path, rdb: Path) -> dict[str, Any]:
    """Return every object of an R lazy-load database (``.rdx`` index + ``.rdb`` values)."""
    # The index is gzip- or zlib-wrapped; wbits=47 lets zlib detect which.
    index = RUnpickler(zlib.decompress(rdx.read_bytes(), 47)).read()
    blob = rdb.read_bytes()
    objects: dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        entry = blob[offset : offset + length]
        (raw_len,) = struct.unpack(">I", entry[:4])  # uncompressed length, then zlib stream
        payload = zlib.decompress(entry[4:])
        if len(payload) != raw_len:
            raise ValueError(f"{name}: length {len(payload)} != header {raw_len}")
        objects[name] = RUnpickler(payload).read()
    return objects


def extract_from_deb(work: Path) -> dict[str, str]:
    """Download and unpack the .deb in ``work``; return novel name -> text."""
    subprocess.run(["apt-get", "download", PACKAGE], cwd=work, check=True, capture_output=True)
    (deb,) = sorted(work.glob(f"{PACKAGE}_*.deb"))
    logger.info("downloaded %s (%d bytes)", deb.name, deb.stat().st_size)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
    data = work / "root" / DATA_DIR_IN_DEB
    objects = read_lazyload_db(data / "Rdata.rdx", data / "Rdata.rdb")
    texts: dict[str, str] = {}
    for novel in NOVELS:
        lines = objects[novel]
        # NA lines (None) would be R's missing values; the package has none, but keep them empty.
        texts[novel] = "\n".join("" if line is None else line for line in lines) + "\n"
    return texts


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_sums(out: Path, sums_file: Path) -> bool:
    """Compare written files to a SHA256SUMS file; return True when all listed files match."""
    ok = True
    for line in sums_file.read_text().splitlines():
        digest, name = line.split()
        if not (out / name).exists():
            continue
        got = sha256(out / name)
        if got != digest:
            logger.error("%s: sha256 %s does not match %s", name, got, digest)
            ok = False
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/austen"))
    parser.add_argument("--heldout", default="persuasion", choices=NOVELS)
    parser.add_argument("--fallback-dir", type=Path, default=DEFAULT_FALLBACK)
    parser.add_argument("--sums", type=Path, default=DEFAULT_FALLBACK / "SHA256SUMS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            texts = extract_from_deb(Path(tmp))
        source = f"Debian package {PACKAGE}"
    except (OSError, subprocess.CalledProcessError) as exc:
        logger.warning("apt-get/dpkg-deb failed (%s); FALLING BACK to copying %s", exc, args.fallback_dir)
        texts = {n: (args.fallback_dir / f"{n}.txt").read_text(encoding="utf-8") for n in NOVELS}
        source = f"copy of {args.fallback_dir}"

    for novel, text in texts.items():
        (args.out / f"{novel}.txt").write_text(text, encoding="utf-8")
        logger.info("%-18s %9d bytes", novel, len(text.encode("utf-8")))
    if args.sums.exists():
        if not check_sums(args.out, args.sums):
            return 1
        logger.info("all files match %s", args.sums)

    train = "".join(texts[n] for n in NOVELS if n != args.heldout)
    (args.out / "train.txt").write_text(train, encoding="utf-8")
    (args.out / "heldout.txt").write_text(texts[args.heldout], encoding="utf-8")
    logger.info(
        "source: %s; train.txt %d bytes, heldout.txt (%s) %d bytes",
        source,
        len(train.encode("utf-8")),
        args.heldout,
        len(texts[args.heldout].encode("utf-8")),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
