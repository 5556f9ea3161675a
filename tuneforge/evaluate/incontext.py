"""In-context baselines: few-shot (k fixed examples from train) and RAG (the k training
examples most similar to each query), both as earlier chat turns of the conversation; or RAG
over a folder of documents (chunks in the system turn)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from tuneforge.models import zoo


def query_text(messages: list[dict]) -> str:
    """What a retriever matches on: the user turns before the final answer."""
    return "\n".join(m["content"] for m in messages[:-1] if m["role"] == "user")


def with_examples(messages: list[dict], examples: list[list[dict]]) -> list[dict]:
    """system (if any), then each example's turns, then the conversation itself."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    shots = [m for ex in examples for m in ex if m["role"] != "system"]
    return [*system, *shots, *messages[len(system):]]


def draw_shots(train: list[list[dict]], k: int, seed: int) -> list[list[dict]]:
    """k examples, seeded, the same for every test row (the classic k-shot prompt)."""
    return random.Random(seed).sample(train, min(k, len(train)))


class BM25Retriever:
    """Lexical retrieval (rank-bm25's Okapi BM25 over lower-cased word tokens)."""

    name = "bm25"

    def __init__(self, docs: list[str]):
        from rank_bm25 import BM25Okapi  # deferred: only the bm25 retriever needs it

        self.bm25 = BM25Okapi([d.lower().split() for d in docs])

    def top_k(self, queries: list[str], k: int) -> list[list[int]]:
        out = []
        for q in queries:
            scores = self.bm25.get_scores(q.lower().split())
            out.append(sorted(range(len(scores)), key=lambda i: -scores[i])[:k])
        return out


class MiniLMRetriever:
    """Dense retrieval with the embedded all-MiniLM-L6-v2 encoder (mean pooling, cosine)."""

    name = "minilm"

    def __init__(self, docs: list[str], batch_size: int = 64):
        # deferred: transformers takes seconds to import; only code that builds a model pays
        from transformers import AutoModel, AutoTokenizer

        path = zoo.ensure("all-minilm-l6-v2")
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size
        self.doc_emb = self.embed(docs)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        parts = []
        for s in range(0, len(texts), self.batch_size):
            b = self.tok(texts[s : s + self.batch_size], padding=True, truncation=True, max_length=256,
                         return_tensors="pt")
            hidden = self.model(**b).last_hidden_state  # (B, T, 384)
            mask = b["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            parts.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(parts)

    def top_k(self, queries: list[str], k: int) -> list[list[int]]:
        sims = self.embed(queries) @ self.doc_emb.T  # (Q, D) cosine similarities
        return sims.topk(min(k, sims.shape[1]), dim=1).indices.tolist()


RETRIEVERS = {"bm25": BM25Retriever, "minilm": MiniLMRetriever}


def rag_convs(convs: list[list[dict]], train: list[list[dict]], retriever, k: int) -> list[list[dict]]:
    """Each conversation preceded by its k most similar training examples."""
    hits = retriever.top_k([query_text(c) for c in convs], k)
    return [with_examples(c, [train[i] for i in idx]) for c, idx in zip(convs, hits)]


# --- retrieval from a folder of documents (compare --docs) --------------------------------------

DOC_SUFFIXES = (".txt", ".md")


def load_doc_chunks(folder: str | Path, max_words: int = 120) -> tuple[list[str], dict]:
    """Chunks of the .txt/.md files under ``folder`` (recursive, sorted): paragraphs (blank-line
    separated) merged up to ``max_words``, a longer paragraph cut into pieces of that size.
    Returns (chunks, report); files of other kinds are counted as skipped, never read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--docs {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    docs = [p for p in files if p.suffix.lower() in DOC_SUFFIXES]
    if not docs:
        raise ValueError(f"--docs {folder}: no .txt or .md files in it ({len(files)} other file(s))")
    chunks: list[str] = []
    for p in docs:
        current: list[str] = []
        for para in re.split(r"\n\s*\n", p.read_text(encoding="utf-8")):
            words = para.split()
            for s in range(0, len(words), max_words):
                piece = words[s : s + max_words]
                if current and len(current) + len(piece) > max_words:
                    chunks.append(" ".join(current))
                    current = []
                current += piece
        if current:
            chunks.append(" ".join(current))
    return chunks, {"dir": str(folder), "files": len(docs), "chunks": len(chunks), "max_words": max_words,
                    "skipped_files": [str(p.relative_to(folder)) for p in files if p not in docs]}


def with_context(messages: list[dict], passages: list[str]) -> list[dict]:
    """The conversation with retrieved passages in its system turn (added when it has none)."""
    context = "Use these passages where they help:\n\n" + "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages))
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{context}"}, *messages[1:]]
    return [{"role": "system", "content": context}, *messages]


def doc_rag_convs(convs: list[list[dict]], chunks: list[str], retriever, k: int) -> list[list[dict]]:
    """Each conversation with its k most similar document chunks as context."""
    hits = retriever.top_k([query_text(c) for c in convs], k)
    return [with_context(c, [chunks[i] for i in idx]) for c, idx in zip(convs, hits)]
