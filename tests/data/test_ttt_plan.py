"""data/ttt_plan.py: documents found at BOS, chunks that score every target once inside its own
document, the record's document order and the global phases' boundaries and batches."""

import numpy as np
import pytest

from data.ttt_plan import Document, chunk_plan, document_order, find_documents, global_batches, phase_boundaries


def test_documents_start_at_bos_and_end_with_the_next_bos():
    tokens = np.array([7, 1, 5, 6, 1, 9, 1, 1, 4, 4])
    assert find_documents(tokens, 1) == [Document(1, 4), Document(4, 3), Document(6, 2), Document(7, 3)]
    assert find_documents(np.array([5, 6, 7]), 1) == []            # no BOS: nothing to score
    assert find_documents(np.array([3, 1]), 1) == []               # a lone final BOS has no target


@pytest.mark.parametrize("n,chunk,window", [(1, 4, 8), (4, 4, 8), (5, 4, 8), (37, 5, 12), (100, 48, 48), (9, 3, 3)])
def test_chunks_score_every_target_once_with_at_most_a_window_of_context(n, chunk, window):
    plan = chunk_plan(n, chunk, window)
    targets = [c.window_start + c.offset + j for c in plan for j in range(c.count)]
    assert targets == list(range(n))
    for c in plan:
        assert 0 <= c.window_start and c.window_len <= window and c.offset + c.count == c.window_len
        assert c.count <= chunk
    assert [c.train for c in plan] == [True] * (len(plan) - 1) + [False]


def test_document_order_is_the_records_longest_batch_first():
    docs = [Document(i * 10, length) for i, length in enumerate([5, 9, 2, 7, 3])]
    order = document_order(docs, batch_size=2)
    assert order == [1, 0, 3, 2, 4]      # by length: [2,3] [5,7] [9]; the batch of 9 first, then of 7
    assert sorted(document_order(docs, 1)) == list(range(5))


def test_phase_boundaries_split_the_prefix_in_equal_steps():
    assert phase_boundaries(100, 30, 3) == [10, 20, 30]
    assert phase_boundaries(12, 2500, 3) == [4, 8, 12]
    assert phase_boundaries(12, 0, 3) == []


def test_global_batches_take_whole_sequences_and_skip_the_last_chunk():
    got = list(global_batches(num_tokens=101, chunk_tokens=40, seq_len=8, batch_seqs=2))
    # 100 targets: chunks [0,40) [40,80) [80,100); the last is not trained; 5 sequences a chunk
    assert [(c, n) for c, n, _ in got] == [(0, 3), (1, 3)]
    assert got[0][2] == [(0, 2), (16, 2), (32, 1)] and got[1][2] == [(40, 2), (56, 2), (72, 1)]
