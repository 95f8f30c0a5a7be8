"""Retrieval over Jane Austen's chapters: passages, their embeddings, and a faiss index to search them.

    novels (data/austen) -> chapters (a "Chapter N" heading starts one) -> passages of whole paragraphs
    (at most ``max_chars`` each) -> SentenceEmbedder vectors (unit length) -> faiss.IndexFlatIP

Inner product of unit vectors is cosine similarity, so an exact flat index returns the passages closest
in meaning. faiss does the search (a vector database's core); at a few thousand passages an exact scan
is already fast, and faiss's IVF or HNSW indexes take over where it is not.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from labkit.corpus import CHAPTER, DOC_SEPARATOR, NOVELS, load_text


@dataclasses.dataclass(frozen=True)
class Passage:
    novel: str
    chapter: int  # 1-based, within the novel's chapters as printed (volumes restart their numbering)
    index: int  # passage number within the chapter
    text: str

    @property
    def ref(self) -> str:
        return f"{self.novel}, ch. {self.chapter}, passage {self.index}"


def austen_passages(split: str = "train", max_chapters_per_novel: int | None = None,
                    max_chars: int = 800) -> list[Passage]:
    """Passages of whole paragraphs, chapter by chapter, novel by novel (the order of ``NOVELS``).
    ``max_chapters_per_novel`` keeps the index small (tests, the notebook's live run)."""
    if max_chars < 100:
        raise ValueError(f"max_chars must be at least 100 (a passage holds whole paragraphs), got {max_chars}")
    docs = load_text(split).split(DOC_SEPARATOR)
    if len(docs) != len(NOVELS):
        raise ValueError(f"data/austen/{split}.txt.gz holds {len(docs)} documents, expected the {len(NOVELS)} novels")
    out = []
    for novel, doc in zip(NOVELS, docs):
        chapter, chunk, index = 0, [], 0

        def flush():
            nonlocal chunk, index
            if chunk and chapter:
                out.append(Passage(novel, chapter, index, "\n\n".join(chunk)))
                index += 1
            chunk = []

        for para in doc.strip().split("\n\n"):
            if CHAPTER.match(para):
                flush()
                if max_chapters_per_novel is not None and chapter >= max_chapters_per_novel:
                    break
                chapter, index = chapter + 1, 0
                continue
            if chunk and len("\n\n".join(chunk + [para])) > max_chars:
                flush()
            chunk.append(para)
        else:
            flush()
    return out


class PassageIndex:
    """Passages and a faiss inner-product index over their unit embeddings."""

    def __init__(self, embedder, passages: list[Passage], batch_size: int = 64):
        import faiss

        if not passages:
            raise ValueError("PassageIndex needs at least one passage")
        self.embedder, self.passages = embedder, list(passages)
        vectors = embedder.embed([p.text for p in passages], batch_size=batch_size).numpy().astype(np.float32)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def __len__(self) -> int:
        return self.index.ntotal

    def search_vectors(self, queries: np.ndarray, k: int = 1) -> list[list[tuple[float, Passage]]]:
        """The ``k`` nearest passages of each query vector (N, dim): [(cosine similarity, passage), ...]."""
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (the passages indexed), got {k}")
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return [[(float(s), self.passages[i]) for s, i in zip(row_s, row_i)] for row_s, row_i in zip(scores, ids)]

    def search(self, texts: list[str], k: int = 1) -> list[list[tuple[float, Passage]]]:
        return self.search_vectors(self.embedder.embed(texts).numpy(), k)
