"""Where score-first test-time training reads and scores (docs/spec.md §14): documents, their order,
their chunks and the global phases. Plain integers only; trainer/ttt.py runs the plan.

A document starts at a BOS token and runs to the next BOS, which it includes as its last target
(the model is asked where the document ends); the last document runs to the end of the tokens.
Tokens before the first BOS belong to no document and are not scored. A document of n tokens has
n - 1 targets, split into chunks of TTT_CHUNK_SIZE targets. Chunk c is scored by one forward over
the window of at most W tokens that ends at its last target, so every target sees as much of its
document as fits in W, and nothing of any other document.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Document:
    start: int     # index of its BOS in the validation tokens
    length: int    # tokens, the next document's BOS included; targets are start .. start + length - 2


@dataclass(frozen=True)
class Chunk:
    window_start: int   # first input token, counted from the document's start
    window_len: int     # inputs of the forward (targets: the next window_len tokens)
    offset: int         # the chunk's first target within the window
    count: int          # targets scored in this chunk
    train: bool         # whether the adapter trains on it once scored (every chunk but the last)


def find_documents(tokens: np.ndarray, bos_id: int) -> list[Document]:
    """Every document of `tokens`, in order; one of fewer than 2 tokens has no target and is left out."""
    starts = np.flatnonzero(np.asarray(tokens) == bos_id).tolist()
    docs = []
    for i, start in enumerate(starts):
        end = starts[i + 1] + 1 if i + 1 < len(starts) else len(tokens)
        if end - start >= 2:
            docs.append(Document(int(start), int(end - start)))
    return docs


def document_order(docs: list[Document], batch_size: int) -> list[int]:
    """The record's order of documents: sorted by length (shortest first, ties in file order), cut
    into batches of batch_size, the batch holding the longest document first. The global phases
    train on the first documents of this order."""
    by_length = sorted(range(len(docs)), key=lambda i: docs[i].length)
    batches = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    batches.sort(key=lambda b: -max(docs[i].length for i in b))   # stable: equal maxima keep their order
    return [i for batch in batches for i in batch]


def chunk_plan(num_targets: int, chunk_size: int, window: int) -> list[Chunk]:
    """The chunks of a document with `num_targets` targets."""
    n = -(-num_targets // chunk_size)
    chunks = []
    for c in range(n):
        first, end = c * chunk_size, min((c + 1) * chunk_size, num_targets)
        window_start = max(0, end - window)
        chunks.append(Chunk(window_start, end - window_start, first - window_start, end - first, c < n - 1))
    return chunks


def phase_boundaries(num_docs: int, prefix_docs: int, num_phases: int) -> list[int]:
    """After how many documents (in order) each global phase runs: equal steps up to the prefix."""
    prefix = max(0, min(num_docs, prefix_docs))
    if prefix == 0:
        return []
    return [prefix * (p + 1) // num_phases for p in range(num_phases)]


def global_batches(num_tokens: int, chunk_tokens: int, seq_len: int, batch_seqs: int):
    """The SGD steps of one global phase over a stream of num_tokens tokens (num_tokens - 1 targets):
    (chunk index, chunks in all, [(first token, sequences)]) for each trained chunk. Chunks of
    chunk_tokens targets; whole sequences of seq_len only; the last chunk is not trained (the
    record's rule: its lr would be 0 at the end of the cosine)."""
    targets = num_tokens - 1
    n = -(-targets // chunk_tokens) if targets > 0 else 0
    for c in range(n - 1):
        start, end = c * chunk_tokens, min((c + 1) * chunk_tokens, targets)
        seqs = (end - start) // seq_len
        if seqs <= 0:
            continue
        yield c, n, [(start + s * seq_len, min(batch_seqs, seqs - s)) for s in range(0, seqs, batch_seqs)]
