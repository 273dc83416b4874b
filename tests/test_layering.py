"""The house's floors (docs/spec.md §1): every module imports only the layers below it.

    core  <  data  <  interop  <  trainer  <  backend_torch, backend_mlx  <  bench  <  commands

bench holds the measurements (make bench, the memory grid, ...); commands the commands a user runs
that use both backends (make doctor, the backend choice of make train, make ablate, make mutants),
which may time bench/run.py's rows; a benchmark never imports a command.

A backend never imports the other backend, and nothing below the backends imports torch or mlx,
with one exception: interop/torch_files.py imports torch, as the file format of the reference torch
script's files only (torch.load(weights_only=True) and torch.save), never to compute.
Imports are read from the source (every `import` and `from ... import`, including those inside
functions), so a late import cannot hide a climb.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "data": 1, "interop": 2, "trainer": 3, "backend_torch": 4, "backend_mlx": 4, "bench": 5,
          "commands": 6}
FRAMEWORKS = {"torch": "backend_torch", "mlx": "backend_mlx"}   # a framework and the one package that may use it
BOTH_BACKENDS = {"bench", "commands"}   # the floors above the backends may use either framework
# Files outside a framework's package allowed to import it, and why: torch as a file format only.
FRAMEWORK_FILES = {"torch": {"interop/torch_files.py"}}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in a Python file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def violations(root: Path) -> list[str]:
    """Every import under `root` that climbs a floor, crosses between backends, or uses a framework
    outside its backend (bench and commands may use both)."""
    problems = []
    for package, level in LAYERS.items():
        for path in sorted((root / package).rglob("*.py")):
            where = path.relative_to(root)
            for name, line in sorted(imported_packages(path)):
                if name in LAYERS and name != package:
                    if LAYERS[name] > level:
                        problems.append(f"{where}:{line} imports {name}, a higher layer")
                    elif LAYERS[name] == level:
                        problems.append(f"{where}:{line} imports {name}: a backend never imports the other")
                if (name in FRAMEWORKS and package != FRAMEWORKS[name] and package not in BOTH_BACKENDS
                        and where.as_posix() not in FRAMEWORK_FILES.get(name, ())):
                    problems.append(f"{where}:{line} imports {name} outside {FRAMEWORKS[name]}")
    return problems


def test_every_layer_imports_only_the_layers_below_it():
    assert violations(REPO) == []


def test_every_package_is_a_known_layer():
    """A new top-level package must be given its floor here (tests/ and data folders aside)."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages <= set(LAYERS), f"packages without a layer: {sorted(packages - set(LAYERS))}"


@pytest.mark.parametrize("package, line, expected", [
    ("core", "from trainer.loop import run_training", "core/bad.py:2 imports trainer, a higher layer"),
    ("data", "import backend_torch.model", "data/bad.py:2 imports backend_torch, a higher layer"),
    ("trainer", "def f():\n    from bench import run", "trainer/bad.py:3 imports bench, a higher layer"),
    ("backend_mlx", "from backend_torch.optim import muon_update", "backend_mlx/bad.py:2 imports backend_torch: a backend never imports the other"),
    ("core", "import torch", "core/bad.py:2 imports torch outside backend_torch"),
    ("backend_torch", "import mlx.core as mx", "backend_torch/bad.py:2 imports mlx outside backend_mlx"),
    ("interop", "import torch", "interop/bad.py:2 imports torch outside backend_torch"),
    ("interop", "import mlx.core as mx", "interop/bad.py:2 imports mlx outside backend_mlx"),
    ("interop", "from trainer.loop import run_training", "interop/bad.py:2 imports trainer, a higher layer"),
    ("data", "from interop import read_reference_file", "data/bad.py:2 imports interop, a higher layer"),
    ("bench", "from commands.doctor import main", "bench/bad.py:2 imports commands, a higher layer"),
])
def test_a_forbidden_import_is_reported(tmp_path, package, line, expected):
    for name in LAYERS:
        (tmp_path / name).mkdir()
    (tmp_path / package / "bad.py").write_text('"""A module that climbs."""\n' + line + "\n")
    assert violations(tmp_path) == [expected]


def test_only_interop_torch_files_may_use_torch_as_a_file_format(tmp_path):
    """The one exception admits exactly that file, and only torch: mlx there is still refused."""
    for name in LAYERS:
        (tmp_path / name).mkdir()
    (tmp_path / "interop" / "torch_files.py").write_text('"""Format."""\nimport torch\nimport mlx.core\n')
    assert violations(tmp_path) == ["interop/torch_files.py:3 imports mlx outside backend_mlx"]


def test_the_readmes_layout_table_names_every_module_of_every_floor():
    """A reader finds each file of each floor in the README's layout table, under its own floor's row
    (the MLX row may say "the same for MLX" of the files that mirror torch's)."""
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("\n## Layout"):readme.index("\n## Training")]
    rows = {line.split("`")[1].rstrip("/"): line for line in table.splitlines() if line.startswith("| ") and "`" in line}
    missing = []
    for package in LAYERS:
        row = rows[package] + (rows["backend_torch"] if package == "backend_mlx" else "")
        missing += [f"{package}/{p.name}" for p in sorted((REPO / package).glob("*.py"))
                    if p.name != "__init__.py" and f"`{p.name}`" not in row]
    assert not missing, f"not in the README's layout table: {missing}"
