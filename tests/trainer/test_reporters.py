"""A user's own reporter (trainer/reporters.py) passed to run_training: it sees every step, every
validation, every record of metrics.jsonl and the summary, beside the default ones."""

import json

from core.config import load_config
from trainer.loop import run_training
from trainer.reporters import Reporter
from trainer_helpers import make_session, tiny_env


class Recorder(Reporter):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, step):
        self.calls.append(("begin", step))

    def on_train_step(self, step, loss, tokens_per_s, eta_s):
        self.calls.append(("step", step, loss))

    def on_validation(self, step, val_loss, val_bpb):
        self.calls.append(("validation", step, val_loss, val_bpb))

    def on_metric(self, record):
        self.calls.append(("metric", record))

    def on_train_end(self, step):
        self.calls.append(("train_end", step))

    def on_end(self, summary):
        self.calls.append(("end", summary))

    def close(self):
        self.calls.append(("close",))


def test_a_users_reporter_sees_the_run_as_its_files_record_it(tiny_dataset, tmp_path):
    cfg = load_config([], environ=tiny_env(tiny_dataset, tmp_path, ITERATIONS=4, VAL_LOSS_EVERY=2, RUN_ID="r"))
    session = make_session("torch", cfg)
    recorder = Recorder()
    try:
        result = run_training(cfg, session, reporters=[recorder])
    finally:
        session.close()
    run_dir = tmp_path / "runs" / "r"
    calls = recorder.calls
    hooks = [c[0] for c in calls if c[0] != "metric"]
    assert hooks == ["begin", "step", "step", "validation", "step", "step", "validation", "train_end", "end", "close"]
    assert calls[0] == ("begin", 0)
    # every step's loss (all steps are log steps here), both validations, and the files' records and summary
    assert [c[2] for c in calls if c[0] == "step"] == result.train_losses
    assert [c[1:] for c in calls if c[0] == "validation"][-1] == (4, result.val_loss, result.val_bpb)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [c[1] for c in calls if c[0] == "metric"] == metrics
    assert [c[1] for c in calls if c[0] == "end"] == [json.loads((run_dir / "summary.json").read_text())]
    assert (run_dir / "loss.png").is_file()   # the default reporters ran too

