"""The package's shape: one namespace, layers without cycles, the registry as the only truth
about model families, files split by concern. Static checks (no Ray) plus two subprocesses."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {
    "unusual": "unusual",
    "models": "unusual.models",
    "ray_jobs": "unusual.ray_jobs",
    "serving": "unusual.serving",
}


def modules() -> dict[str, Path]:
    """Every installed module by its dotted name."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join([package, *rel]).removesuffix(".__init__")
            out[name] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """Absolute names of everything a module imports, at any depth (lazy imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _hits(imported: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(i for i in imported if any(i == p or i.startswith(p + ".") for p in prefixes))


LAYER_RULES = [
    # (modules under, must not import, why)
    ("unusual.models", ("ray", "unusual.ray_jobs", "unusual.serving", "unusual.cli", "unusual.config"),
     "the detector core is pure PyTorch + numpy + pyarrow, usable without Ray"),
    ("unusual.ray_jobs", ("unusual.cli", "unusual.serving"), "job modules sit below the CLI and beside serving"),
    ("unusual.serving", ("unusual.ray_jobs", "unusual.cli"), "serving never imports the jobs or the CLI"),
    ("unusual.config", ("ray", "torch", "unusual.ray_jobs", "unusual.serving", "unusual.cli"),
     "the CLI builds every parser from the configs alone"),
    ("unusual.configbase", ("ray", "torch", "unusual.ray_jobs", "unusual.serving", "unusual.cli"), "as config"),
    ("unusual.runtime", ("unusual.ray_jobs", "unusual.serving", "unusual.cli"), "shared by jobs and serving"),
    ("unusual.demo", ("unusual.cli",), "the demo runs the jobs and the endpoint, under the CLI"),
]


@pytest.mark.parametrize("under,forbidden,why", LAYER_RULES, ids=[r[0] for r in LAYER_RULES])
def test_layers_have_no_upward_imports(under, forbidden, why):
    found = {
        name: _hits(imports_of(name, path), forbidden)
        for name, path in modules().items()
        if name == under or name.startswith(under + ".")
    }
    found = {k: v for k, v in found.items() if v}
    assert not found, f"{why}; but: {found}"


def test_nothing_imports_the_cli_but_its_entry_point():
    users = [n for n, p in modules().items() if n not in ("unusual.cli", "unusual.__main__")
             and _hits(imports_of(n, p), ("unusual.cli",))]
    assert users == []


def test_no_model_kind_strings_outside_the_registry():
    """A new family is one file plus one registry line: code asks the registry, never `kind == "lstm"`."""
    kinds = {"ae", "vae", "lstm"}
    # the demo picks which data each model gets; unusual.sklearn has one estimator class per family
    allowed = {"unusual.models.registry", "unusual.demo", "unusual.sklearn"}
    found = []
    for name, path in modules().items():
        if name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in kinds:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert found == []


MAX_FUNCTION_LINES = 60  # docstring included; ruff's C901 / PLR0915 (pyproject.toml) bound the rest


def test_no_library_function_is_longer_than_60_lines():
    """Functions split by what they do (ruff's complexity rules check their branches and statements);
    files hold one concern each, at whatever length it takes."""
    import ast

    long = []
    for p in modules().values():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)


def test_import_from_a_folder_holding_an_unrelated_models_package(tmp_path):
    """A user's own ./models (as the README's bundle paths make) must not shadow ours, in the driver."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('the user models package')\n")
    (tmp_path / "ray_jobs").mkdir()
    (tmp_path / "serving").mkdir()
    code = (
        "from unusual import Detector, Scorer; import unusual.serving.app, unusual.ray_jobs.score, unusual.cli; "
        "import numpy as np; x = np.random.default_rng(0).normal(size=(200, 4)).astype('float32'); "
        "print(Detector('ae', epochs=1).fit(x).score(x[:3]).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(3,)"


def test_a_checkout_that_is_not_installed_imports_too():
    """A Ray job whose runtime_env uploads the checkout as its working_dir imports ``unusual.*`` from it:
    ``python -S`` (no site-packages, so no installed or editable unusual) in the checkout's root."""
    code = "import unusual.models.registry as r, unusual.ray_jobs, unusual.serving; print(r.kinds())"
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['ae', 'lstm', 'vae']"


def test_the_wheel_installs_only_the_unusual_package(tmp_path):
    """``pip install .`` puts what the wheel holds into site-packages: only ``unusual`` (and its metadata)."""
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "artifacts", "runs", "__pycache__", "results")
    shutil.copytree(ROOT, src, ignore=skip)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), src],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("unusual-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"unusual", "unusual-0.1.0.dist-info"}
    for sub in ("models/detector.py", "ray_jobs/score.py", "serving/app.py", "config.py", "cli.py",
                "ray_jobs/sample_data/cardio.parquet", "serving/serve_config.yaml"):
        assert f"unusual/{sub}" in names, sub
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "unusual = unusual.cli:main" in entry
