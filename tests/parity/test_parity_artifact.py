"""docs/spec.md §10, artifact row: core.artifact.pack of the weights exported by either backend (fp32 or
bf16 compute) is byte-identical given the same weights, on every device pair (the weights go to the
device and back unchanged), and so is the COMPRESSOR=pergroup artifact of their integer codes; and the
roundtrip val_bpb agrees (on the CPU)."""

import numpy as np
import pytest

from core import artifact
from core.checkpoint import load_checkpoint
from core.config import TrainConfig
from core.init import random_weights
from core.params import param_table
from core.quantize import quantize_model
from trainer.plan import eval_geometry
from trainer.validation import evaluate
from parity_lib import BACKENDS, CASE_BY_NAME, CASES, make_session, open_session, rel, train_config


def differing_bytes(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    diff = np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8)
    return int(diff.sum()) + abs(len(a) - len(b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case_name", [c.name for c in CASES])
def test_artifact_of_either_backend_is_byte_identical(case_name, dtype, pair, parity):
    case = CASE_BY_NAME[case_name]
    w = case.weights()
    expected = artifact.pack(w)
    schemes = {t.scheme for t in artifact.quantize(w).values()}
    # Every storage path of docs/spec.md §9 is exercised: int8 rows in the default spec, fp16 in the small ones.
    assert schemes == ({"int8_per_row", "fp32"} if case.name == "default-spec" else {"fp16", "fp32"})
    cfg = train_config(case.spec, compute_dtype=dtype)
    # lrzip is slow: pergroup in one case (untied: every role of the layout) and one dtype
    expected_pergroup = pergroup_artifact(case.spec, w) if (case.name, dtype) == PERGROUP_CASE else None
    for b in BACKENDS:
        with open_session(pair.of(b), cfg) as session:
            session.load_weights(w)
            assert session.compute_dtype == dtype
            exported = session.export_weights()
        assert all(exported[k].dtype == np.float32 for k in exported)
        blob = artifact.pack(exported)
        parity.check("artifact", differing_bytes(blob, expected), f"{case.name} {dtype} {b} export", devices=pair.label)
        assert blob == expected
        if expected_pergroup is not None:
            got = pergroup_artifact(case.spec, exported)
            parity.check("artifact", differing_bytes(got, expected_pergroup), f"{case.name} {dtype} {b} export, pergroup",
                         devices=pair.label)
            assert got == expected_pergroup


PERGROUP_CASE = ("untied-mha-L4-cap5", "float32")


def pergroup_artifact(spec, weights) -> bytes:
    """COMPRESSOR=pergroup of the round-to-nearest 6-bit codes (QUANT=gptq without statistics)."""
    cfg = TrainConfig(**spec.to_dict(), quant="gptq", lqer_top_k=1)
    return artifact.pack_tensors(quantize_model(weights, param_table(spec), {}, cfg), "pergroup")


# Roundtrip weights: the torch run's trained weights (every tensor small: fp16/fp32 storage), and
# random weights of a wider model whose embedding (512 x 160 > 65,536) is stored as int8 rows.
WIDE = dict(model_dim=160, num_heads=4, num_kv_heads=2, num_layers=2)


@pytest.mark.parametrize("weights_from", ["torch-trained", "wide-random"])
def test_roundtrip_val_bpb_agrees(weights_from, trained_runs, validation, parity):
    cfg, val_tokens, tables = validation
    if weights_from == "torch-trained":
        run = trained_runs["torch"]
        weights = load_checkpoint(run.run_dir / "checkpoints" / f"step_{run.step:06d}.safetensors").weights
    else:
        cfg = cfg.replace(**WIDE)
        weights = random_weights(cfg.model_spec(), seed=23)
    blob = artifact.pack(weights)
    if weights_from == "wide-random":
        assert artifact.quantize(weights)["tok_emb.weight"].scheme == "int8_per_row"
    else:   # the trainers' own artifact of these weights is this very blob
        assert (run.run_dir / "model.int8.zlib").read_bytes() == blob
    restored = artifact.unpack(blob)
    results = {}
    for b in BACKENDS:
        session = make_session(b, cfg)
        session.load_weights(restored)
        results[b] = evaluate(session, val_tokens, tables, cfg.train_seq_len, eval_geometry(cfg, 1).val_batch_seqs)
        session.close()
    (loss_t, bpb_t), (loss_m, bpb_m) = results["torch"], results["mlx"]
    parity.check("val", rel(loss_t, loss_m), f"roundtrip val_loss, {weights_from} weights")
    parity.check("val", rel(bpb_t, bpb_m), f"roundtrip val_bpb, {weights_from} weights")
    if weights_from == "torch-trained":
        assert abs(trained_runs["torch"].roundtrip_val_bpb - bpb_t) <= 1e-12 * bpb_t


def test_trainers_roundtrip_val_bpb_agree(trained_runs, parity):
    """The two 20-step runs' own roundtrip figures (weights differing by the rounding of training)."""
    t, m = trained_runs["torch"], trained_runs["mlx"]
    parity.check("trained_roundtrip", rel(t.roundtrip_val_loss, m.roundtrip_val_loss), "roundtrip val_loss after 20 steps")
    parity.check("trained_roundtrip", rel(t.roundtrip_val_bpb, m.roundtrip_val_bpb), "roundtrip val_bpb after 20 steps")
