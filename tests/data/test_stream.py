import json

import numpy as np
import pytest

from core.errors import ConfigError, DatasetError
from data.shards import list_shards, write_shard
from data.stream import (DistributedTokenLoader, TokenStream, load_validation_tokens,
                         validation_batches)


@pytest.fixture
def train_files(tmp_path, make_shards):
    # Shard sizes 37, 0 (an empty shard is skipped), 50, 29: 116 tokens of values 0..115.
    make_shards(tmp_path, "t", [37, 0, 50, 29], [])
    return list_shards(tmp_path, "train")


def test_take_reads_shards_in_order_and_wraps_around(train_files):
    stream = TokenStream(train_files)
    got = np.concatenate([stream.take(n) for n in (5, 40, 0, 71, 30)])  # 146 tokens: wraps once
    expected = np.concatenate([np.arange(116), np.arange(30)])
    assert got.dtype == np.uint16 and got.tolist() == expected.tolist()
    assert stream.take(300).tolist() == [(30 + i) % 116 for i in range(300)]  # several wraps in one take


def _span(x, y):
    """The span a rank trained on: x = span[:-1], y = span[1:]."""
    x, y = x.ravel(), y.ravel()
    assert np.array_equal(x[1:], y[:-1])
    return np.concatenate([x, y[-1:]])


@pytest.mark.parametrize("world_size, accum", [(1, 1), (2, 1), (1, 3), (4, 2)])
def test_ranks_and_micro_steps_partition_the_single_stream(train_files, world_size, accum):
    global_tokens, seq_len, steps = 48, 2, 3
    loaders = [DistributedTokenLoader(train_files, r, world_size) for r in range(world_size)]
    consumed = []
    for _ in range(steps * accum):
        spans = []
        for loader in loaders:
            x, y = loader.next_batch(global_tokens // (world_size * accum), seq_len)
            assert x.dtype == np.int64 and y.dtype == np.int64
            assert x.shape == y.shape == (global_tokens // (world_size * accum) // seq_len, seq_len)
            spans.append(_span(x, y))
        consumed.append(np.concatenate(spans))  # rank r holds the r-th span of the micro-step's chunk
    per_step = world_size * (global_tokens // (world_size * accum) + 1)
    assert all(len(c) == per_step for c in consumed)
    reference = TokenStream(train_files).take(per_step * steps * accum)  # wraps: more than 116 tokens
    assert np.concatenate(consumed).tolist() == reference.tolist()
    assert len({json.dumps(loader.state()) for loader in loaders}) == 1  # every rank at the same place


def test_a_rank_outside_the_world_is_refused(train_files):
    with pytest.raises(ConfigError, match="rank 2 of world size 2"):
        DistributedTokenLoader(train_files, 2, 2)


def test_state_restore_resumes_at_the_exact_position(train_files):
    a = DistributedTokenLoader(train_files, 1, 2)
    for _ in range(7):  # 7 x 2 x 13 = 182 tokens: past a wrap-around
        a.next_batch(12, 4)
    state = json.loads(json.dumps(a.state()))  # survives a JSON checkpoint
    expected = [a.next_batch(12, 4) for _ in range(9)]
    b = DistributedTokenLoader(train_files, 1, 2)
    b.next_batch(12, 4)  # somewhere else first
    b.restore(state)
    for (ex, ey), (gx, gy) in zip(expected, [b.next_batch(12, 4) for _ in range(9)]):
        assert np.array_equal(ex, gx) and np.array_equal(ey, gy)


def test_restore_rejects_a_position_of_another_dataset(train_files):
    stream = TokenStream(train_files)
    with pytest.raises(DatasetError, match="shard 0 was other_train_000000.bin"):
        stream.restore({"file_index": 0, "offset": 3, "file": "other_train_000000.bin"})
    with pytest.raises(DatasetError, match="out of range"):
        stream.restore({"file_index": 9, "offset": 0, "file": "t_train_000009.bin"})
    with pytest.raises(DatasetError, match="offset 38 is outside"):
        stream.restore({"file_index": 0, "offset": 38, "file": "t_train_000000.bin"})
    with pytest.raises(DatasetError, match="expected keys"):
        stream.restore({"offset": 3})


def test_stream_of_empty_shards_is_an_error(tmp_path):
    write_shard(tmp_path / "e_train_000000.bin", [])
    with pytest.raises(DatasetError, match="hold no tokens"):
        TokenStream([tmp_path / "e_train_000000.bin"])


def test_validation_tokens_are_cut_to_whole_windows_plus_one(tmp_path, make_shards):
    make_shards(tmp_path, "v", [1], [20, 15])  # val values 1..35
    files = list_shards(tmp_path, "val")
    tokens = load_validation_tokens(files, seq_len=8)
    assert tokens.tolist() == list(range(1, 34))  # 35 tokens -> 4 windows of 8, plus 1
    with pytest.raises(DatasetError, match="hold 35 tokens, fewer than TRAIN_SEQ_LEN\\+1 = 36"):
        load_validation_tokens(files, seq_len=35)


def test_val_max_tokens_keeps_the_first_targets_then_whole_windows(tmp_path, make_shards):
    make_shards(tmp_path, "v", [1], [20, 15])  # val values 1..35
    files = list_shards(tmp_path, "val")
    assert load_validation_tokens(files, seq_len=8, max_tokens=16).tolist() == list(range(1, 18))   # 2 windows
    assert load_validation_tokens(files, seq_len=8, max_tokens=23).tolist() == list(range(1, 18))   # still 2
    assert load_validation_tokens(files, seq_len=8, max_tokens=1000).tolist() == list(range(1, 34))  # all there is


@pytest.mark.parametrize("world_size, batch_seqs", [(1, 3), (3, 2), (4, 1), (2, 100)])
def test_validation_batches_cover_every_window_once(world_size, batch_seqs):
    seq_len = 4
    tokens = np.arange(10 * seq_len + 1, dtype=np.uint16)  # 10 windows
    single = [(x, y) for x, y in validation_batches(tokens, seq_len, 10)]
    assert len(single) == 1
    assert single[0][0].ravel().tolist() == tokens[:-1].tolist()
    assert single[0][1].ravel().tolist() == tokens[1:].tolist()
    xs, ys = [], []
    for rank in range(world_size):
        rank_x = []
        for x, y in validation_batches(tokens, seq_len, batch_seqs, rank, world_size):
            assert x.dtype == np.int64 and 1 <= len(x) <= batch_seqs and x.shape == y.shape
            rank_x.append(x)
            xs.append(x)
            ys.append(y)
        if rank_x:  # a rank's share is contiguous
            starts = np.concatenate(rank_x)[:, 0]
            assert np.all(np.diff(starts) == seq_len)
    assert np.concatenate(xs).tolist() == single[0][0].tolist()
    assert np.concatenate(ys).tolist() == single[0][1].tolist()


def test_leading_shards_stop_at_the_first_shard_that_reaches_the_count(train_files):
    from data.stream import leading_shards
    assert [t.size for t in leading_shards(train_files, 37)] == [37]            # exactly reached: no more
    assert [t.size for t in leading_shards(train_files, 38)] == [37, 0, 50]
    assert [t.size for t in leading_shards(train_files, 10**6)] == [37, 0, 50, 29]
