"""Experiment trackers (REPORT_TO=tensorboard,wandb): every record of metrics.jsonl, also sent elsewhere.

One interface, one small class per tracker:
    config(dict)    the run's settings, once at the start
    record(dict)    one metrics.jsonl record: kind ("train" or "val"), step, and numbers; each number
                    but the step becomes the scalar "<kind>/<name>" at that step
    summary(dict)   the final figures of summary.json, once at the end
    close()
Only rank 0 tracks (trainer.reporters.Trackers, one of the default reporters, owns the trackers).

TensorBoard: the event files (<run>/tensorboard/events.out.tfevents.*) are written with tensorboard's
own event writer and protos, which need neither torch nor TensorFlow (tensorboardX would import torch).
Weights & Biases: always offline here (WANDB_MODE=offline: nothing leaves the machine), its run
folder under <run>/wandb; upload it later with `wandb sync <run>/wandb/offline-run-*`.
The packages are the optional extra `tracking` (pip install -e ".[tracking]"); they are imported
only when REPORT_TO names them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

from core.config import TRACKERS, parse_report_to
from core.errors import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}   # tracker -> the module it needs
assert set(PACKAGES) == set(TRACKERS)


def scalars(record: dict) -> dict[str, float]:
    """"<kind>/<name>" -> value for every finite number of a record but its kind and step."""
    kind = record.get("kind", "metric")
    return {f"{kind}/{name}": float(value) for name, value in record.items()
            if name not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, run_id: str):
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self.pb = (event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2)
        self.writer = EventFileWriter(str(run_dir / "tensorboard"))

    def _write(self, step: int, values: list) -> None:
        event_pb2, summary_pb2 = self.pb[:2]
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                              summary=summary_pb2.Summary(value=values)))

    def _text(self, tag: str, value: dict) -> None:
        """A dict as JSON in TensorBoard's Text tab (a string tensor of the "text" plugin)."""
        _, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2 = self.pb
        text = "```\n" + json.dumps(value, indent=2, default=str) + "\n```"
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        self._write(0, [summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)])

    def config(self, config: dict) -> None:
        self._text("config", config)

    def record(self, record: dict) -> None:
        summary_pb2 = self.pb[1]
        self._write(int(record["step"]), [summary_pb2.Summary.Value(tag=tag, simple_value=value)
                                          for tag, value in scalars(record).items()])
        self.writer.flush()   # a record is seen in TensorBoard as soon as it is in metrics.jsonl

    def summary(self, summary: dict) -> None:
        self._text("summary", summary)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, run_id: str):
        os.environ["WANDB_MODE"] = "offline"   # never the network, whatever the environment says
        import wandb
        self.wandb = wandb
        # No console capture, code, git or system-metrics sampling: the records of metrics.jsonl only.
        self.run = wandb.init(project="twingpt", name=run_id, dir=str(run_dir), mode="offline",
                              settings=wandb.Settings(silent=True, console="off", save_code=False, disable_git=True,
                                                      x_disable_stats=True, x_disable_meta=True,
                                                      x_disable_machine_info=True))

    def config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def record(self, record: dict) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def summary(self, summary: dict) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if v is not None})

    def close(self) -> None:
        self.run.finish()
        # finish() returns before wandb's service has written the run's last records to disk;
        # teardown waits for it, so the offline run is complete when the training call returns.
        self.wandb.teardown()


CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_trackers(report_to: str) -> list[str]:
    """The trackers REPORT_TO names; a ConfigError naming the extra to install when a package is missing."""
    names = parse_report_to(report_to)
    for name in names:
        if not installed(PACKAGES[name]):
            raise ConfigError(f"REPORT_TO={report_to}: {name} needs the package {PACKAGES[name]}; "
                              f"install the extra: pip install -e \".[tracking]\"")
    return names


def open_trackers(report_to: str, run_dir: Path, run_id: str) -> list:
    return [CLASSES[name](run_dir, run_id) for name in check_trackers(report_to)]
