"""COMPRESSOR=pergroup (core/pergroup.py, docs/spec.md §9.3): its layout as the spec defines it, rebuilt
here from the quantized tensors; the exact round trip of the payload; the similarity sort against a slow
definition; and one-line errors for a corrupt artifact or a missing lrzip."""

import brotli
import numpy as np
import pytest

from core import artifact, pergroup
from core.config import ModelSpec, TrainConfig
from core.errors import ArtifactError, ConfigError
from core.init import random_weights
from core.params import param_table
from core.quantize import quantize_model

UNTIED = ModelSpec(vocab_size=96, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, tie_embeddings=False)


def gptq_tensors(spec=UNTIED):
    cfg = TrainConfig(**spec.to_dict(), quant="gptq", lqer_top_k=2, lqer_rank=2, lqer_asym_group=16)
    return quantize_model(random_weights(spec, seed=4), param_table(spec), {}, cfg)


def slow_order(codes):
    """The nearest-neighbour path as the spec words it: from row 0, the closest unvisited row in L1, the
    lowest index on a tie."""
    rows = codes.astype(np.int64)
    path = [0]
    while len(path) < len(rows):
        rest = [j for j in range(len(rows)) if j not in path]
        path.append(min(rest, key=lambda j: (np.abs(rows[j] - rows[path[-1]]).sum(), j)))
    return path


def test_similarity_order_is_the_nearest_neighbour_path_with_ties_to_the_lowest_index():
    rng = np.random.default_rng(0)
    for codes in (rng.integers(-31, 32, (60, 12)), rng.integers(-1, 2, (40, 3)), np.zeros((5, 4))):
        codes = codes.astype(np.int8)   # the second and third have many ties
        order = pergroup.similarity_order(codes)
        assert order.dtype == np.dtype("<u2") and list(order) == slow_order(codes)


def test_the_artifact_is_the_specified_streams_and_reads_back_to_the_same_payload():
    tensors = gptq_tensors()
    payload = artifact.serialize(tensors)
    blob = artifact.pack_tensors(tensors, "pergroup")
    assert blob.startswith(b"twingpt-pergroup\n") and artifact.compressor_of(blob) == "pergroup"
    assert artifact.decompress(blob) == payload and artifact.pack_tensors(tensors, "pergroup") == blob
    streams = pergroup.unpack_streams(blob)
    roles = ["tok_emb.weight", "lm_head.weight", "attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight",
             "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"]
    assert len(streams) == 2 + len(roles)
    orders = []
    for role, stream in zip(roles, streams[2:]):
        names = [role] if role in ("tok_emb.weight", "lm_head.weight") else [f"blocks.{i}.{role}" for i in (0, 1)]
        expected = b""
        for name in names:
            codes = tensors[name].parts["q"]
            if role in ("tok_emb.weight", "lm_head.weight", "attn.c_q.weight", "mlp.fc.weight"):
                orders.append(np.array(slow_order(codes), dtype="<u2").tobytes())
                codes = codes[slow_order(codes)]
            expected += np.ascontiguousarray(codes.T).tobytes()
        assert pergroup.lrzip_decompress(stream) == expected, role
    assert brotli.decompress(streams[1]) == b"".join(orders)
    # the rest: the payload with every code matrix cut out (the header untouched)
    header, start = artifact.read_header(payload)
    data = np.frombuffer(payload[start:], dtype=np.uint8)
    kept = np.ones(len(data), dtype=bool)
    for name, t in tensors.items():
        if pergroup.role_of(name):
            offset = header["tensors"][name]["offset"]
            kept[offset:offset + t.parts["q"].size] = False
    assert brotli.decompress(streams[0]) == payload[:start] + data[kept].tobytes()


def test_int8_per_row_codes_are_grouped_too():
    spec = ModelSpec(vocab_size=512, num_layers=1, model_dim=160, num_heads=4, num_kv_heads=2)
    tensors = artifact.quantize(random_weights(spec, seed=3))
    assert tensors["tok_emb.weight"].scheme == "int8_per_row"
    blob = artifact.pack_tensors(tensors, "pergroup")
    assert len(pergroup.unpack_streams(blob)) == 3    # the rest, the row orders, the embedding
    back = artifact.unpack(blob)
    assert all(np.array_equal(back[n], artifact.dequantize_tensor(t)) for n, t in tensors.items())


def corrupted(blob: bytes, stream: int, edit) -> bytes:
    streams = pergroup.unpack_streams(blob)
    streams[stream] = edit(streams[stream])
    return pergroup.pack_streams(streams)


def test_a_corrupt_stream_or_row_order_is_an_artifact_error():
    blob = artifact.pack_tensors(gptq_tensors(), "pergroup")
    orders = brotli.decompress(pergroup.unpack_streams(blob)[1])
    repeated = orders[2:4] + orders[2:]      # the first row order's first entry repeated: not a permutation
    for bad in (corrupted(blob, 3, lambda s: s[:len(s) // 2]),
                corrupted(blob, 4, lambda s: s[:-30] + bytes(30)),
                corrupted(blob, 1, lambda s: brotli.compress(repeated)),
                corrupted(blob, 1, lambda s: brotli.compress(orders + b"\0\0")),
                corrupted(blob, 0, lambda s: s[:-1]),
                pergroup.pack_streams(pergroup.unpack_streams(blob)[:-1])):
        with pytest.raises(ArtifactError, match="corrupt or not a twingpt artifact \\(pergroup: "):
            artifact.unpack(bad)


def test_without_lrzip_writing_is_a_config_error_and_reading_an_artifact_error(monkeypatch, tmp_path):
    blob = artifact.pack_tensors(gptq_tensors(), "pergroup")
    monkeypatch.setenv("PATH", str(tmp_path))    # an empty folder: no lrzip on the PATH
    message = "COMPRESSOR=pergroup needs lrzip: apt-get install lrzip or brew install lrzip"
    with pytest.raises(ConfigError) as error:
        artifact.check_compressor("pergroup")
    assert str(error.value) == message
    with pytest.raises(ConfigError, match=message):
        artifact.pack_tensors(gptq_tensors(), "pergroup")
    with pytest.raises(ArtifactError) as error:
        artifact.unpack(blob, source="artifact m.bin")
    assert str(error.value) == f"artifact m.bin: {message}"
