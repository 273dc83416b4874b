"""Mutation testing: can the suite fail? python -m commands.mutants [--only core-3,data-1] (make mutants).

Each mutant of commands/mutants_list.py is one line of one file replaced by a plausible bug (a sign
flip, an off-by-one, a swapped constant, a dropped term, a wrong dtype). For each, the tracked source
tree (`git ls-files`, as it is in the work tree) is copied into a fresh temporary folder, the line is
replaced there, and the mutant's few test files run against that copy (PYTHONPATH = the copy,
`pytest -x`, no bytecode written). The mutant is killed when a test fails, and the first failing
test is named; it survives when they all pass. A mutant whose original line is not found exactly
once in its file is STALE: an error, since it no longer tests anything. Before the mutants, the
union of their test files runs once on an unmutated copy: a test that fails there proves nothing.

Prints a markdown table (id, file:line, change, tests, result) and the kill rate over the
non-equivalent mutants; exits 1 on a survivor, a stale mutant, a mutant argued equivalent that a
test kills, or a failing baseline.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from commands.mutants_list import MUTANTS, Mutant

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600   # a mutant that hangs its tests is killed by the timeout


@dataclass
class Outcome:
    mutant: Mutant
    line: int | None          # 1-based line number of the original, None when stale
    status: str               # "killed", "SURVIVED", "STALE", "TIMEOUT"
    detail: str               # first failing test, or why stale
    seconds: float


class StaleMutant(Exception):
    """The mutant's original line is not in its file exactly once."""


def tracked_files(repo: Path) -> list[str]:
    """The files git tracks, and new ones it does not ignore (so work not yet committed is tested too)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def copy_tree(repo: Path, dest: Path) -> None:
    """The source files of `repo`, as they are in its work tree (edits included), into `dest`;
    symlinks (the shared .venv and datasets) and ignored files stay behind."""
    for name in tracked_files(repo):
        src = repo / name
        if src.is_file() and not src.is_symlink():   # a tracked file deleted in the work tree is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def indentation(line: str) -> int:
    return len(line) - len(line.lstrip())


def block(lines: list[str], opener: str, path: str) -> tuple[int, int]:
    """[start, stop) of the lines from the one that starts with `opener` (stripped) to the next
    non-blank line indented no deeper than it: a function's or a class's body."""
    starts = [i for i, line in enumerate(lines) if line.strip().startswith(opener.strip())]
    if len(starts) != 1:
        raise StaleMutant(f"block opener found {len(starts)} times in {path}: {opener!r}")
    start = starts[0]
    stop = start + 1
    while stop < len(lines) and (not lines[stop].strip() or indentation(lines[stop]) > indentation(lines[start])):
        stop += 1
    return start, stop


def apply(mutant: Mutant, root: Path) -> int:
    """Replace the mutant's line in the tree at `root`; returns its 1-based line number."""
    path = root / mutant.path
    if not path.is_file():
        raise StaleMutant(f"{mutant.path} does not exist")
    lines = path.read_text().splitlines(keepends=True)
    start, stop = block(lines, mutant.within, mutant.path) if mutant.within else (0, len(lines))
    found = [i for i in range(start, stop) if lines[i].strip() == mutant.original.strip()]
    if len(found) != 1:
        where = f"{mutant.path} (in {mutant.within.strip()!r})" if mutant.within else mutant.path
        raise StaleMutant(f"original line found {len(found)} times in {where}: {mutant.original!r}")
    i = found[0]
    line = lines[i]
    indent = line[:indentation(line)]
    ending = line[len(line.rstrip("\r\n")):]
    lines[i] = indent + mutant.replacement.strip() + ending
    path.write_text("".join(lines))
    return i + 1


def first_failure(output: str) -> str:
    """The first failing test id in pytest's short summary (-ra), or the first error line."""
    for line in output.splitlines():
        m = re.match(r"(FAILED|ERROR) (\S+)", line)
        if m:
            return m.group(2)
    for line in output.splitlines():
        if "Error" in line or "error" in line:
            return line.strip()[:80]
    return output.strip().splitlines()[-1][:80] if output.strip() else "pytest failed without output"


def run_tests(root: Path, tests: tuple[str, ...], timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """(passed, first failing test) of `pytest -x -q tests` run in `root` against `root`'s code."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-ra", "-p", "no:cacheprovider", *tests]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 0:
        return True, ""
    return False, first_failure(proc.stdout + proc.stderr)


def run_mutant(mutant: Mutant, repo: Path = REPO, timeout: float = TIMEOUT_S) -> Outcome:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.id}-") as folder:
        root = Path(folder)
        copy_tree(repo, root)
        try:
            line = apply(mutant, root)
        except StaleMutant as err:
            return Outcome(mutant, None, "STALE", str(err), time.perf_counter() - t0)
        try:
            passed, failure = run_tests(root, mutant.tests, timeout)
        except subprocess.TimeoutExpired:
            return Outcome(mutant, line, "TIMEOUT", f"tests ran past {timeout:.0f} s", time.perf_counter() - t0)
    status = "SURVIVED" if passed else "killed"
    return Outcome(mutant, line, status, failure, time.perf_counter() - t0)


def is_problem(o: Outcome) -> bool:
    """A stale mutant; a survivor not argued equivalent; a mutant argued equivalent that was killed."""
    if o.status == "STALE":
        return True
    killed = o.status in ("killed", "TIMEOUT")
    return killed == bool(o.mutant.equivalent)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(outcomes: list[Outcome]) -> str:
    rows = ["| id | file:line | change | tests | result |", "|---|---|---|---|---|"]
    for o in outcomes:
        m = o.mutant
        where = f"{m.path}:{o.line}" if o.line else m.path
        change = f"`{cell(m.original.strip())}` → `{cell(m.replacement.strip())}`"
        tests = ", ".join(dict.fromkeys(Path(t.split("::")[0]).name for t in m.tests))
        if o.status == "killed":
            result = f"killed by `{cell(o.detail)}`"
        elif o.status == "TIMEOUT":
            result = f"killed (timeout: {o.detail})"
        elif o.status == "STALE":
            result = f"**STALE**: {cell(o.detail)}"
        elif m.equivalent:
            result = "survived"
        else:
            result = "**SURVIVED**"
        if m.equivalent:
            result += f"; equivalent: {cell(m.equivalent)}"
            if o.status in ("killed", "TIMEOUT"):
                result += " (**but a test killed it**)"
        rows.append(f"| {m.id} | {where} | {change} | {tests} | {result} |")
    return "\n".join(rows)


def kill_rate(outcomes: list[Outcome]) -> tuple[int, int]:
    """(killed, total) over the mutants not argued equivalent; stale ones count as not killed."""
    scored = [o for o in outcomes if not o.mutant.equivalent]
    return sum(o.status in ("killed", "TIMEOUT") for o in scored), len(scored)


def select(mutants: list[Mutant], only: str) -> list[Mutant]:
    """The mutants whose ids are listed in `only` (comma-separated); all of them when it is empty."""
    ids = [m.id for m in mutants]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise SystemExit(f"error: mutant id(s) listed twice: {', '.join(twice)}")
    same = [m.id for m in mutants if m.original.strip() == m.replacement.strip()]
    if same:
        raise SystemExit(f"error: mutant(s) that change nothing: {', '.join(same)}")
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    if not wanted:
        return list(mutants)
    known = {m.id for m in mutants}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"error: MUTANTS: unknown mutant id(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [m for m in mutants if m.id in wanted]


def baseline(mutants: list[Mutant], repo: Path) -> tuple[bool, str]:
    """The union of the mutants' test files, run once on an unmutated copy."""
    tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as folder:
        copy_tree(repo, Path(folder))
        return run_tests(Path(folder), tests)


def check(mutants: list[Mutant], repo: Path) -> int:
    """Apply every mutant to one copy of the tree (each to the pristine file); 1 if any is stale."""
    stale = 0
    with tempfile.TemporaryDirectory(prefix="mutant-check-") as folder:
        root = Path(folder)
        copy_tree(repo, root)
        for m in mutants:
            pristine = (root / m.path).read_text() if (root / m.path).is_file() else None
            try:
                print(f"{m.id:10s} {m.path}:{apply(m, root)}")
            except StaleMutant as err:
                stale += 1
                print(f"{m.id:10s} STALE: {err}", file=sys.stderr)
            if pristine is not None:
                (root / m.path).write_text(pristine)
    return 1 if stale else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=os.environ.get("MUTANTS", ""),
                        help="comma-separated mutant ids (default: $MUTANTS, else all)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    parser.add_argument("--check", action="store_true", help="only apply each mutant (finds STALE ones), run no test")
    args = parser.parse_args(argv)
    chosen = select(MUTANTS, args.only)
    if args.check:
        return check(chosen, REPO)
    t0 = time.perf_counter()
    if not args.no_baseline:
        print(f"baseline: the tests of {len(chosen)} mutant(s) on the unmutated tree ...", flush=True)
        ok, failure = baseline(chosen, REPO)
        if not ok:
            print(f"error: baseline: {failure} fails without any mutant; fix the suite first", file=sys.stderr)
            return 1
    outcomes = []
    for m in chosen:
        o = run_mutant(m)
        flag = "  <-- problem" if is_problem(o) else ""
        print(f"{m.id:10s} {o.status:8s} {o.seconds:6.1f}s  {o.detail}{flag}", flush=True)
        outcomes.append(o)
    total_s = time.perf_counter() - t0
    killed, scored = kill_rate(outcomes)
    print()
    print(table(outcomes))
    print()
    rate = 100.0 * killed / scored if scored else 100.0
    n_equivalent = sum(bool(o.mutant.equivalent) for o in outcomes)
    print(f"kill rate: {killed}/{scored} non-equivalent mutants ({rate:.0f}%), {n_equivalent} argued equivalent; "
          f"total run time {total_s:.0f} s")
    problems = [o for o in outcomes if is_problem(o)]
    for o in problems:
        print(f"error: {o.mutant.id}: {o.status} {o.detail}".rstrip(), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
