"""`make check-submission RUN=runs/<id>` (or RUN=<a log.txt>): what this tool can know of the
Parameter Golf rules for one run, as a verdict table.

    training time     the run's train_time (its last logged value) within TRAIN_CAP_SECONDS (600)
    evaluation time   the time of the evaluation that gives the final score (test-time training when
                      it ran, else the sliding or the standard roundtrip evaluation) within EVAL_CAP_SECONDS (600)
    submission bytes  the artifact plus the code that runs it (the .py files of core, data, interop,
                      trainer and the run's backend, measured in this checkout) under 16,000,000
    score first       the TTT evaluation's own legality record (trainer/ttt.py): every update read only
                      scored tokens, adapters reset at each document, each target scored once, no
                      context from another document (rows "no TTT" when the run had none)

Everything is read from the run's log (so a log alone is enough). Exit status 0 when every row
passes, 1 when one fails, 2 on a bad input (no such run, a log without a training run).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from core.artifact import ARTIFACT_BUDGET_BYTES
from core.config import parse_settings, setting
from core.errors import ConfigError, exit_on_user_error

REPO_ROOT = Path(__file__).resolve().parent.parent
CODE_FOLDERS = ("core", "data", "interop", "trainer")
LEGALITY = {
    "score_before_update": "score before update",
    "adapters_reset_per_document": "adapters reset per document",
    "each_target_scored_once": "each target scored once",
    "context_within_document": "context within its document",
}


@dataclass(frozen=True)
class CheckSettings:
    run: str = setting("", "run folder (runs/<id>) or its log.txt")
    train_cap_seconds: float = setting(600.0, "the training time cap")
    eval_cap_seconds: float = setting(600.0, "the evaluation time cap")


def code_bytes(backend: str) -> int:
    """Bytes of the Python code that trains and evaluates with `backend`."""
    folders = CODE_FOLDERS + (f"backend_{backend}",)
    return sum(p.stat().st_size for folder in folders for p in (REPO_ROOT / folder).glob("*.py"))


def _last(pattern: str, text: str) -> re.Match | None:
    matches = list(re.finditer(pattern, text, re.MULTILINE))
    return matches[-1] if matches else None


def read_log(path: Path) -> dict:
    """The figures the checks need, from a run's log."""
    text = path.read_text(errors="replace")
    head = _last(r"^twingpt run (\S+) backend:(\w+)", text)
    train = _last(r"train_time:(\d+)ms", text)
    if head is None or train is None:
        raise ConfigError(f"RUN={path}: not the log of a twingpt training run (no 'twingpt run' or train_time line)")
    facts = {"run_id": head.group(1), "backend": head.group(2), "train_time_s": int(train.group(1)) / 1000.0}
    art = _last(r"^serialized_model_int8_zlib:(\d+) bytes", text)
    facts["artifact_bytes"] = int(art.group(1)) if art else None
    for kind, pattern in (("ttt", r"^final_int8_zlib_roundtrip_ttt .*eval_time:(\d+)ms"),
                          ("sliding", r"^final_int8_zlib_roundtrip_sliding .*eval_time:(\d+)ms"),
                          ("standard", r"^final_int8_zlib_roundtrip val_loss.*eval_time:(\d+)ms")):
        if m := _last(pattern, text):
            facts["eval"] = (kind, int(m.group(1)) / 1000.0)
            break
    if m := _last(r"^final_int8_zlib_roundtrip_ttt error: (.*)$", text):
        facts["eval_error"] = m.group(1)
    if m := _last(r"^ttt_legality (.*)$", text):
        facts["legality"] = {k: int(v) for k, v in (item.split(":") for item in m.group(1).split())}
    return facts


def verdicts(facts: dict, settings: CheckSettings) -> list[tuple[str, str, str, bool]]:
    """(check, value, limit, passed) rows."""
    rows = [("training time", f"{facts['train_time_s']:.1f} s", f"{settings.train_cap_seconds:g} s",
             facts["train_time_s"] <= settings.train_cap_seconds)]
    if "eval_error" in facts:
        rows.append(("evaluation time", "over (" + facts["eval_error"][:60] + "...)", f"{settings.eval_cap_seconds:g} s", False))
    elif "eval" in facts:
        kind, seconds = facts["eval"]
        rows.append((f"evaluation time ({kind})", f"{seconds:.1f} s", f"{settings.eval_cap_seconds:g} s",
                     seconds <= settings.eval_cap_seconds))
    else:
        rows.append(("evaluation time", "no final evaluation in the log", f"{settings.eval_cap_seconds:g} s", False))
    code = code_bytes(facts["backend"])
    if facts["artifact_bytes"] is None:
        rows.append(("artifact + code bytes", "no artifact in the log", f"{ARTIFACT_BUDGET_BYTES:,}", False))
    else:
        total = facts["artifact_bytes"] + code
        rows.append(("artifact + code bytes", f"{facts['artifact_bytes']:,} + {code:,} = {total:,}",
                     f"{ARTIFACT_BUDGET_BYTES:,}", total < ARTIFACT_BUDGET_BYTES))
    record = facts.get("legality")
    if record is None:
        rows += [(label, "no TTT" if "eval_error" not in facts else "no record", "held", "eval_error" not in facts)
                 for label in LEGALITY.values()]
        rows.append(("validation tokens used before scored", "no TTT", "0", "eval_error" not in facts))
    else:
        rows += [(label, "held" if record.get(key) else "VIOLATED", "held", bool(record.get(key)))
                 for key, label in LEGALITY.items()]
        unscored = record.get("unscored_tokens_used", 1)
        rows.append(("validation tokens used before scored", f"{unscored:,} update(s)", "0", unscored == 0))
    return rows


def format_table(rows, title: str) -> list[str]:
    width = [max(len(str(r[i])) for r in rows + [("check", "value", "limit")]) for i in range(3)]
    lines = [title, f"{'check':<{width[0]}}  {'value':<{width[1]}}  {'limit':<{width[2]}}  verdict"]
    for check, value, limit, passed in rows:
        lines.append(f"{check:<{width[0]}}  {value:<{width[1]}}  {limit:<{width[2]}}  {'PASS' if passed else 'FAIL'}")
    failed = sum(not r[3] for r in rows)
    lines.append("verdict: PASS (every check held)" if not failed else f"verdict: FAIL ({failed} check(s) failed)")
    return lines


@exit_on_user_error
def main(argv=None, environ=None) -> int:
    import os

    settings = parse_settings(CheckSettings, sys.argv[1:] if argv is None else argv,
                              os.environ if environ is None else environ, prog="make check-submission",
                              description=__doc__.split("\n\n")[0])
    if not settings.run:
        raise ConfigError("give RUN=runs/<id> (a run folder) or RUN=<path to a run's log.txt>")
    path = Path(settings.run)
    log = path / "log.txt" if path.is_dir() else path
    if not log.is_file():
        raise ConfigError(f"RUN={settings.run}: no such run folder or log file")
    facts = read_log(log)
    rows = verdicts(facts, settings)
    for line in format_table(rows, f"check-submission {facts['run_id']} ({log})"):
        print(line)
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
