"""Run by tests/mlx/test_mlx_ring.py under `mlx.launch -n 2`: each rank checks the ring's collectives
and the session's gradient averaging, and writes what it found to $PROBE_OUT/rank<r>.json.

Every rank holds its own half of a batch; the mean of the ranks' gradients must be the gradient of
the whole batch on one rank, to float32 rounding (a sum instead of a mean is off by a factor 2,
which Muon's orthogonalization and Adam's normalization would hide from the losses)."""

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from backend_mlx.session import MLXSession
from core.config import TrainConfig
from core.errors import ConfigError
from core.init import random_weights


def main() -> None:
    out = Path(os.environ["PROBE_OUT"])
    files = [Path(f) for f in os.environ["PROBE_RESUME_FILES"].split(",")]   # a, a's copy, b
    cfg = TrainConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, train_seq_len=8,
                      train_batch_tokens=64, device="cpu", compute_dtype="float32", compile="0")
    session = MLXSession()
    rank, world = session.rank, session.world_size
    session.setup(cfg.model_spec(), cfg)
    session.load_weights(random_weights(cfg.model_spec(), seed=3))
    ring = session.ring
    found = {"rank": rank, "world_size": world}

    # The ring's mean of known values: rank r holds r + 1 everywhere.
    grads = {"a.w": mx.full((5, 3), rank + 1.0), "b": mx.arange(7, dtype=mx.float32) * (rank + 1)}
    averaged = ring.average_gradients(grads)
    found["average_a"] = np.array(averaged["a.w"]).tolist()
    found["average_b"] = np.array(averaged["b"]).tolist()
    found["sum"] = ring.all_reduce([rank + 1.0, 10.0], "sum")
    found["max"] = ring.all_reduce([rank + 1.0, -rank], "max")

    # The session's mean over ranks against the whole batch on this rank alone.
    rng = np.random.default_rng(0)
    halves = [rng.integers(0, 64, size=(4, 9)) for _ in range(world)]
    batch = [(h[:, :-1], h[:, 1:]) for h in halves]
    whole_loss, whole = session.gradients(batch)                 # every half as a micro-batch, one rank
    loss, mine = session._mean_over_ranks(*session.gradients([batch[rank]]), 0)
    found["loss_rel"] = abs(float(loss) - float(whole_loss)) / abs(float(whole_loss))
    found["grad_rel"] = max(float(mx.linalg.norm(mine[k] - whole[k]) / mx.linalg.norm(whole[k]))
                            for k in whole if float(mx.linalg.norm(whole[k])) > 0)

    # The replica check: one resume file's content at two paths passes, another content or seed fails.
    settings = cfg.to_dict()
    outcomes = {}
    for case, changed in (("same content, other path", {"resume_from": str(files[rank])}),
                          ("other content", {"resume_from": str(files[2 * rank])}),
                          ("other seed", {"seed": cfg.seed + rank})):
        try:
            ring.check_same_settings(settings | changed)
            outcomes[case] = "accepted"
        except ConfigError as err:
            outcomes[case] = str(err)
    found["settings"] = outcomes
    (out / f"rank{rank}.json").write_text(json.dumps(found))
    session.close()


if __name__ == "__main__":
    sys.exit(main())
