"""labkit.corpus: the R XDR reader on blobs built here byte by byte, the split, and the shipped files."""
import gzip
import struct
import zlib

import pytest

from labkit import corpus

# --- a tiny R serialiser, written from R Internals' description, for the reader to read back -------


def _int(v):
    return struct.pack(">i", v)


def _flags(sxp, attr=False, tag=False, levels=0):
    return _int(sxp | (attr << 9) | (tag << 10) | (levels << 12))


def _charsxp(s, levels=1 << 3):  # UTF8_MASK
    if s is None:
        return _flags(corpus.CHARSXP) + _int(-1)
    raw = s.encode("utf-8" if levels & (1 << 3) else "latin-1")
    return _flags(corpus.CHARSXP, levels=levels) + _int(len(raw)) + raw


def _strsxp(items, names=None):
    body = _int(len(items)) + b"".join(_charsxp(s) for s in items)
    return _flags(corpus.STRSXP, attr=names is not None) + body + (_names_attr(names) if names else b"")


def _intsxp(values):
    return _flags(corpus.INTSXP) + _int(len(values)) + b"".join(_int(v) for v in values)


def _names_attr(names):
    # pairlist (names = <character vector>) ; the symbol is written in full once
    return (_flags(corpus.LISTSXP, tag=True) + _flags(corpus.SYMSXP) + _charsxp("names", levels=1 << 6)
            + _strsxp(names) + _int(corpus.NILVALUE_SXP))


def _header(version=3):
    head = b"X\n" + _int(version) + _int(0x040201) + _int(0x030500)
    return head + (_int(5) + b"UTF-8" if version == 3 else b"")


def test_reads_a_character_vector_with_na_latin1_and_utf8():
    blob = _header() + _strsxp(["It is a truth", "", None, "caf\u00e9 \u2014 na\u00efve"])
    assert corpus.unserialize(blob) == ["It is a truth", "", None, "caf\u00e9 \u2014 na\u00efve"]
    latin = _header(2) + _flags(corpus.STRSXP) + _int(1) + _charsxp("d\u00e9j\u00e0", levels=1 << 2)
    assert corpus.unserialize(latin) == ["d\u00e9j\u00e0"]


def test_named_list_becomes_dict_and_na_integer_is_none():
    names = ["a", "b"]
    blob = (_header() + _flags(corpus.VECSXP, attr=True) + _int(2) + _intsxp([1, -(2**31)]) + _strsxp(["x"])
            + _names_attr(names))
    assert corpus.unserialize(blob) == {"a": [1, None], "b": ["x"]}


def test_rejects_other_formats_and_trailing_bytes():
    with pytest.raises(ValueError, match="not an R XDR"):
        corpus.unserialize(b"A\n" + _int(3))
    with pytest.raises(ValueError, match="left after"):
        corpus.unserialize(_header() + _strsxp(["x"]) + b"\0")
    with pytest.raises(NotImplementedError, match="R type 3"):  # CLOSXP
        corpus.unserialize(_header() + _flags(3))
    with pytest.raises(ValueError, match="truncated"):
        corpus.unserialize(_header() + _strsxp(["abc"])[:-1])


def test_lazyload_database_round_trip():
    """An .rdx index and .rdb blobs laid out as R's makeLazyLoadDB writes them."""
    novels = {"emma": ["EMMA", "", "CHAPTER I"], "persuasion": ["PERSUASION", "Chapter 1"]}
    rdb, offsets = b"", {}
    for name, lines in novels.items():
        raw = _header() + _strsxp(lines)
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        offsets[name] = [len(rdb), len(blob)]
        rdb += blob
    variables = (_flags(corpus.VECSXP, attr=True) + _int(len(novels))
                 + b"".join(_intsxp(v) for v in offsets.values()) + _names_attr(list(offsets)))
    logical_true = _flags(corpus.LGLSXP) + _int(1) + _int(1)
    index = (_header() + _flags(corpus.VECSXP, attr=True) + _int(2) + variables + logical_true
             + _names_attr(["variables", "compressed"]))
    assert corpus.read_lazyload_db(gzip.compress(index), rdb) == novels


def test_paragraphs_and_chapter_split():
    lines = ["TITLE", ""] + sum(([f"CHAPTER {i}", "", "Some  words", "wrapped here.", ""] for i in range(1, 21)), [])
    paras = corpus.paragraphs(lines)
    assert paras[:3] == ["TITLE", "CHAPTER 1", "Some words wrapped here."]
    train, heldout, chapters = corpus.split_novel(paras, heldout_fraction=0.1)
    assert train + heldout == paras and heldout[0].startswith("CHAPTER") and chapters >= 2
    held_chars = sum(map(len, heldout))
    assert held_chars >= 0.1 * sum(map(len, paras))


def test_shipped_corpus_matches_its_manifest():
    import json

    manifest = json.loads((corpus.AUSTEN_DIR / "manifest.json").read_text())
    train, heldout = corpus.load_text("train"), corpus.load_text("heldout")
    assert (len(train), len(heldout)) == (manifest["train_chars"], manifest["heldout_chars"])
    assert manifest["source"]["package"] == corpus.DEB_PACKAGE
    assert train.count(corpus.DOC_SEPARATOR) == heldout.count(corpus.DOC_SEPARATOR) == len(corpus.NOVELS) - 1
    for novel in manifest["novels"].values():
        assert novel["heldout_starts_with"] in heldout and novel["heldout_starts_with"].lower().startswith("chapter")
    assert "It is a truth universally acknowledged" in train
