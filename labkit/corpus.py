"""The training text: Jane Austen's six novels, read from Debian's ``r-cran-janeaustenr`` without R.

The R package keeps each novel as a character vector (one element per printed line) inside a
*lazy-load database*: ``data/Rdata.rdx`` is a gzipped R serialisation of an index
``list(variables = list(emma = c(offset, length), ...), compressed = TRUE)`` and ``data/Rdata.rdb``
is a run of blobs, one per object, each

    | 4-byte big-endian uncompressed length | zlib stream of an R XDR serialisation |

R's XDR serialisation (R Internals, "Serialization formats") is a header
(``X\\n``, version, writer version, min reader version[, native encoding]) then one item:
a 32-bit *flags* word (type in bits 0-7, has-attributes bit 9, has-tag bit 10, CHARSXP encoding in
bits 12+) followed by the item's payload, all big-endian. ``unserialize`` below reads the handful of
types that data files use; anything else fails loudly.

``python -m labkit.corpus`` writes ``data/austen/{train,heldout}.txt.gz`` and ``manifest.json``.
The split (``SPLIT_RULE``) is deterministic: whole final chapters of every novel are held out.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import pathlib
import re
import struct
import subprocess
import tempfile
import zlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
AUSTEN_DIR = ROOT / "data" / "austen"
DEB_PACKAGE = "r-cran-janeaustenr"
RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
DOC_SEPARATOR = "<|endoftext|>"  # also the tokenizer's one special token
HELDOUT_FRACTION = 0.05
SPLIT_RULE = (
    "In each novel the held-out part starts at the last chapter heading at or before 95% of the novel's "
    "characters (so it holds the final whole chapters, at least 5%); everything before it is training text. "
    "Printed lines are unwrapped into paragraphs (runs of spaces become one space; a blank line between "
    "paragraphs); the six novels are joined by the separator line " + DOC_SEPARATOR + "."
)

# --- R XDR unserialisation ------------------------------------------------------------------------
# SEXP types (R Internals 1.1) and the pseudo-types used only in serialisations.
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
NA_INTEGER = -(2**31)
UTF8_MASK, LATIN1_MASK = 1 << 3, 1 << 2


class _XdrReader:
    """Reads one serialised R object from bytes. Vectors become Python lists; a list or vector with a
    ``names`` attribute becomes a dict; NA becomes None. Other attributes are read and dropped."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"R serialisation truncated: wanted {n} bytes at offset {self.pos} of {len(self.data)}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.bytes(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: the length follows as two 32-bit halves
            hi, lo = self.int(), self.int()
            n = (hi << 32) | (lo & 0xFFFFFFFF)
        return n

    def header(self) -> None:
        fmt = self.bytes(2)
        if fmt != b"X\n":
            raise ValueError(f"not an R XDR serialisation (format {fmt!r}; only 'X\\n' binary-XDR is supported)")
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            self.bytes(self.int())  # native encoding name, e.g. b"UTF-8"
        elif version != 2:
            raise ValueError(f"R serialisation version {version} is not supported (2 or 3 are)")

    def item(self):
        flags = self.int()
        sxp, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sxp == NILVALUE_SXP:
            return None
        if sxp in (GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP):
            return f"<environment {sxp}>"
        if sxp == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if sxp == SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if sxp == LISTSXP:  # pairlist: attributes, tag, CAR, then the CDR continues the list
            out = {}
            while sxp == LISTSXP:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else str(len(out))
                out[tag] = self.item()
                flags = self.int()
                sxp, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
            if sxp != NILVALUE_SXP:
                raise ValueError(f"pairlist ends in type {sxp}, expected NILVALUE_SXP")
            return out
        if sxp == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.bytes(n)
            return raw.decode("latin-1" if flags >> 12 & LATIN1_MASK and not flags >> 12 & UTF8_MASK else "utf-8")
        if sxp in (LGLSXP, INTSXP):
            n = self.length()
            ints = struct.unpack(f">{n}i", self.bytes(4 * n))
            value = [None if v == NA_INTEGER else (bool(v) if sxp == LGLSXP else v) for v in ints]
        elif sxp == REALSXP:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.bytes(8 * n)))
        elif sxp in (STRSXP, VECSXP):
            value = [self.item() for _ in range(self.length())]
        else:
            raise NotImplementedError(
                f"R type {sxp} at offset {self.pos - 4} is not supported by this reader "
                "(it reads NULL, symbols, pairlists, logical/integer/double/character vectors and lists)"
            )
        if has_attr:
            names = self.item().get("names")
            if names is not None:
                return dict(zip(names, value))
        return value


def unserialize(data: bytes):
    """Read an R XDR serialisation (what ``serialize(x, NULL)`` / ``saveRDS`` write, uncompressed)."""
    reader = _XdrReader(data)
    reader.header()
    value = reader.item()
    if reader.pos != len(data):
        raise ValueError(f"{len(data) - reader.pos} bytes left after the serialised object")
    return value


def read_lazyload_db(rdx: bytes, rdb: bytes) -> dict:
    """All objects of an R lazy-load database (``name.rdx`` gzipped index + ``name.rdb`` blobs)."""
    index = unserialize(gzip.decompress(rdx))
    if index.get("compressed") not in ([True], [1]):
        raise NotImplementedError(
            f"only zlib-compressed lazy-load databases are supported, got compressed={index.get('compressed')}")
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[offset:offset + length]
        (size,) = struct.unpack(">I", blob[:4])
        raw = zlib.decompress(blob[4:])
        if len(raw) != size:
            raise ValueError(f"{name}: blob says {size} bytes, zlib gave {len(raw)}")
        out[name] = unserialize(raw)
    return out


# --- from the .deb to text ------------------------------------------------------------------------
def download_deb(dest: pathlib.Path) -> pathlib.Path:
    """``apt-get download`` the package into ``dest`` (needs ``apt-get update`` to have run once)."""
    subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=dest, check=True)
    (deb,) = dest.glob(f"{DEB_PACKAGE}_*.deb")
    return deb


def read_deb(deb: pathlib.Path) -> tuple[dict[str, list[str]], dict]:
    """The novels (name -> list of lines) and provenance (package version, sha256) from the .deb."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        data = pathlib.Path(tmp) / RDATA_DIR
        db = read_lazyload_db((data / "Rdata.rdx").read_bytes(), (data / "Rdata.rdb").read_bytes())
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True,
                                 capture_output=True, text=True).stdout.strip()
    missing = set(NOVELS) - set(db)
    if missing:
        raise ValueError(f"{deb.name} lacks novels {sorted(missing)}; it holds {sorted(db)}")
    provenance = {"package": DEB_PACKAGE, "version": version, "deb": deb.name,
                  "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
                  "licence": "janeaustenr: MIT (Julia Silge); the novels are in the public domain"}
    return {name: db[name] for name in NOVELS}, provenance


CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\b", re.IGNORECASE)


def paragraphs(lines: list[str]) -> list[str]:
    """Unwrap printed lines into paragraphs: lines between blank lines, joined by single spaces."""
    out, current = [], []
    for line in lines + [""]:
        line = " ".join((line or "").split())  # Gutenberg's double spaces after a full stop -> one
        if line:
            current.append(line)
        elif current:
            out.append(" ".join(current))
            current = []
    return out


def split_novel(paras: list[str], heldout_fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str], int]:
    """(train, held-out, chapters held out): held-out starts at the last chapter heading at or before
    ``1 - heldout_fraction`` of the novel's characters, so it holds whole chapters."""
    total = sum(len(p) for p in paras)
    seen, cut = 0, None
    for i, p in enumerate(paras):
        if seen > (1 - heldout_fraction) * total:
            break
        if CHAPTER.match(p):
            cut = i
        seen += len(p)
    if not cut:
        raise ValueError("no chapter heading after the first paragraph: cannot split the novel on a chapter")
    return paras[:cut], paras[cut:], sum(1 for p in paras[cut:] if CHAPTER.match(p))


def build(novels: dict[str, list[str]]) -> tuple[str, str, dict]:
    """Train text, held-out text, and per-novel counts for the manifest."""
    train_docs, heldout_docs, counts = [], [], {}
    for name in NOVELS:
        train, heldout, chapters = split_novel(paragraphs(novels[name]))
        train_docs.append("\n\n".join(train))
        heldout_docs.append("\n\n".join(heldout))
        counts[name] = {"train_chars": len(train_docs[-1]), "heldout_chars": len(heldout_docs[-1]),
                        "heldout_chapters": chapters, "heldout_starts_with": heldout[0]}
    sep = f"\n{DOC_SEPARATOR}\n"
    return sep.join(train_docs) + "\n", sep.join(heldout_docs) + "\n", counts


def write(train: str, heldout: str, manifest: dict, out_dir: pathlib.Path = AUSTEN_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("heldout", heldout)):
        # mtime=0 and no file name in the header: the same text always gives the same bytes
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
            f.write(text.encode("utf-8"))
        (out_dir / f"{name}.txt.gz").write_bytes(buf.getvalue())
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def load_text(split: str, data_dir: pathlib.Path = AUSTEN_DIR) -> str:
    """The shipped ``train`` or ``heldout`` text."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    path = data_dir / f"{split}.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m labkit.corpus` to build it from the .deb")
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deb", type=pathlib.Path,
                        help=f"a downloaded {DEB_PACKAGE}_*.deb (default: apt-get download it)")
    parser.add_argument("--out", type=pathlib.Path, default=AUSTEN_DIR)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb or download_deb(pathlib.Path(tmp))
        novels, provenance = read_deb(deb)
    train, heldout, counts = build(novels)
    manifest = {"source": provenance, "split": SPLIT_RULE,
                "doc_separator": DOC_SEPARATOR, "heldout_fraction": HELDOUT_FRACTION,
                "train_chars": len(train), "heldout_chars": len(heldout), "novels": counts}
    write(train, heldout, manifest, args.out)
    print(f"wrote {args.out}: train {len(train):,} chars, held-out {len(heldout):,} chars "
          f"from {provenance['deb']} (sha256 {provenance['sha256'][:12]}...)")


if __name__ == "__main__":
    main()
