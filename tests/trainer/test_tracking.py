"""REPORT_TO=tensorboard,wandb: the trackers get exactly the records of metrics.jsonl, the config and
the summary, read back from TensorBoard's event files and from the offline wandb run's transaction log."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.config import load_config
from core.errors import ConfigError
from trainer import tracking
from trainer_helpers import make_session, tiny_env, train


def wandb_records(path: Path) -> list:
    """The protobuf Records of a .wandb file: a 7-byte header (":W&B", 2-byte id, version), then
    LevelDB-log chunks (crc32, 2-byte length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2
    data, records, pending, pos = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:          # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_every_metrics_record_reaches_tensorboard_and_wandb(tiny_dataset, tmp_path):
    result = train("mlx", tiny_env(tiny_dataset, tmp_path, RUN_ID="tracked", REPORT_TO="tensorboard,wandb",
                                   ITERATIONS=6, VAL_LOSS_EVERY=3))
    run = tmp_path / "runs" / "tracked"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("val") == 2 and [r["kind"] for r in records].count("train") == 6
    expected = {}   # tag -> [(step, value)], in the order metrics.jsonl has them
    for r in records:
        for name, value in r.items():
            if name not in ("kind", "step"):
                expected.setdefault(f"{r['kind']}/{name}", []).append((r["step"], value))

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():   # TensorBoard stores float32
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(s, float(np.float32(v))) for s, v in points], tag
    config = json.loads(acc.Tensors("config")[0].tensor_proto.string_val[0].decode().strip("`\n"))
    assert config["report_to"] == "tensorboard,wandb" and config["run_id"] == "tracked"
    summary = json.loads(acc.Tensors("summary")[0].tensor_proto.string_val[0].decode().strip("`\n"))
    assert summary == json.loads((run / "summary.json").read_text())

    [log] = list((run / "wandb").glob("offline-run-*/run-*.wandb"))   # offline: the run stays on disk
    by_kind = {}
    for record in wandb_records(log):
        by_kind.setdefault(record.WhichOneof("record_type"), []).append(record)
    history = [wandb_items(r.history.item) for r in by_kind["history"]]
    got = {}
    for row in history:
        for tag, value in row.items():
            if not tag.startswith("_"):
                got.setdefault(tag, []).append((row["_step"], value))
    assert got == expected
    config = {}
    for r in by_kind["config"]:
        config.update(wandb_items(r.config.update))
    assert config["report_to"] == "tensorboard,wandb" and config["iterations"] == 6
    summary = {}
    for r in by_kind["summary"]:
        summary.update(wandb_items(r.summary.update))
    assert summary["val_bpb"] == result.val_bpb and summary["roundtrip_val_bpb"] == result.roundtrip_val_bpb


def test_unknown_tracker_is_refused_before_anything_is_written(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="REPORT_TO=tensorboard,mlflow: unknown tracker 'mlflow'; known: tensorboard, wandb"):
        load_config([], environ=tiny_env(tiny_dataset, tmp_path, REPORT_TO="tensorboard,mlflow"))
    assert not (tmp_path / "runs").exists()


def test_a_missing_package_names_the_extra_to_install(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "installed", lambda module: module != "wandb")   # as if wandb were not installed
    with pytest.raises(ConfigError, match=r'REPORT_TO=wandb: wandb needs the package wandb; install the extra: '
                                          r'pip install -e "\.\[tracking\]"'):
        train("mlx", tiny_env(tiny_dataset, tmp_path, REPORT_TO="wandb"))
    assert not (tmp_path / "runs").exists()


def test_only_rank_0_tracks(tiny_dataset, tmp_path):
    """Rank 1 stood in: it has no reporter (so opens no tracker), and its log writes nothing."""
    from trainer.loop import prepare

    cfg = load_config([], environ=tiny_env(tiny_dataset, tmp_path, REPORT_TO="tensorboard,wandb"))
    session = make_session("mlx", cfg)
    session.rank = 1
    run = prepare(cfg, session)
    run.metric(kind="train", step=1, train_loss=1.0)
    run.log.summary({"val_bpb": 1.0})
    run.close()
    assert run.reporters.reporters == [] and not (tmp_path / "runs").exists()
