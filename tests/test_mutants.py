"""commands/mutants.py: a mutant changes one line of a copy (never the repo), a stale one is an error,
a killed one names its first failing test, and the curated list applies to today's code."""

import subprocess

import pytest

from commands.mutants import Outcome, StaleMutant, apply, check, copy_tree, is_problem, run_mutant, select
from commands.mutants_list import MUTANTS, Mutant
from trainer_helpers import REPO

SOURCE = "def double(x):\n    return 2 * x\n\n\ndef triple(x):\n    return 2 * x + x\n"
TEST = "from pkg.calc import double\n\n\ndef test_double():\n    assert double(3) == 6\n"


@pytest.fixture
def repo(tmp_path):
    """A tiny git repository: pkg/calc.py, its test, a new file and an ignored one."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "calc.py").write_text(SOURCE)
    (root / "tests" / "test_calc.py").write_text(TEST)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "pkg", "tests"], cwd=root, check=True)
    (root / ".gitignore").write_text("*.bin\n")
    (root / "ignored.bin").write_text("not source")
    (root / "pkg" / "new.py").write_text("NOT_YET_COMMITTED = 1\n")
    return root


def test_a_mutant_changes_its_line_in_the_copy_only(repo, tmp_path):
    copy = tmp_path / "copy"
    copy_tree(repo, copy)
    assert not (copy / "ignored.bin").exists() and (copy / "pkg" / "new.py").is_file()
    line = apply(Mutant("m", "pkg/calc.py", "return 2 * x + x", "return 3 * x + x", ()), copy)
    assert line == 6
    assert (copy / "pkg" / "calc.py").read_text() == SOURCE.replace("2 * x + x", "3 * x + x")
    assert (repo / "pkg" / "calc.py").read_text() == SOURCE


def test_a_line_not_found_exactly_once_is_stale(repo, tmp_path):
    copy = tmp_path / "copy"
    copy_tree(repo, copy)
    with pytest.raises(StaleMutant, match="found 0 times"):
        apply(Mutant("m", "pkg/calc.py", "return 4 * x", "return 5 * x", ()), copy)
    (copy / "pkg" / "calc.py").write_text(SOURCE + "\n\ndef again(x):\n    return 2 * x\n")
    with pytest.raises(StaleMutant, match="found 2 times"):
        apply(Mutant("m", "pkg/calc.py", "return 2 * x", "return 3 * x", ()), copy)
    # `within` picks the block when the line occurs twice
    assert apply(Mutant("m", "pkg/calc.py", "return 2 * x", "return 3 * x", (), within="def again("), copy) == 10
    stale = run_mutant(Mutant("m", "pkg/calc.py", "return 4 * x", "return 5 * x", ("tests",)), repo)
    assert stale.status == "STALE" and is_problem(stale)


def test_killed_names_the_failing_test_and_survivors_are_problems_unless_equivalent(repo):
    killed = run_mutant(Mutant("k", "pkg/calc.py", "return 2 * x", "return 2 + x", ("tests",), within="def double("), repo)
    assert killed.status == "killed" and killed.detail == "tests/test_calc.py::test_double"
    assert not is_problem(killed)
    survivor = Mutant("s", "pkg/calc.py", "return 2 * x + x", "return 3 * x", ("tests",))
    outcome = run_mutant(survivor, repo)
    assert outcome.status == "SURVIVED" and is_problem(outcome)
    argued = Mutant("s", "pkg/calc.py", "return 2 * x + x", "return 3 * x", ("tests",), equivalent="2x + x is 3x")
    assert not is_problem(Outcome(argued, outcome.line, outcome.status, "", 0.0))
    assert is_problem(Outcome(argued, killed.line, "killed", killed.detail, 0.0))   # argued, yet killed


def test_select_refuses_unknown_ids():
    assert [m.id for m in select(MUTANTS, "core-1, data-1")] == ["core-1", "data-1"]
    with pytest.raises(SystemExit, match="unknown mutant id"):
        select(MUTANTS, "core-1,nope-9")


def test_the_curated_list_applies_to_this_tree():
    """Every mutant's line is in today's code exactly once (the STALE check of `make mutants`)."""
    assert len(MUTANTS) >= 90
    assert check(MUTANTS, REPO) == 0


def test_every_layer_has_mutants():
    from test_layering import LAYERS
    layers = {m.path.split("/")[0] for m in MUTANTS}
    assert set(LAYERS) <= layers, f"layers without a mutant: {sorted(set(LAYERS) - layers)}"
