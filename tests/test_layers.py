"""The package layering of docs/architecture.md §2, enforced by import-linter
(`[tool.importlinter]` in pyproject.toml): cli > bench > server > engines >
export > ediffi, each importing only the layers below it, and the API process
(server.app) never importing torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "bench", "server", "engines", "export", "ediffi")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail(f"{exe} not found: import-linter is a dev dependency (pip install -e '.[dev]')")
    return subprocess.run([str(exe), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """The packages' Python sources and pyproject.toml, to break on purpose."""
    root = tmp_path_factory.mktemp("layers")
    shutil.copy(REPO / "pyproject.toml", root)
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "static", "configs"))
    return root


def test_the_layer_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "bad_import", "contract"), [
    ("ediffi/edm.py", "import server.settings", "Layers"),
    ("export/manifest.py", "import engines.backend", "Layers"),
    ("server/schemas.py", "import torch", "never imports torch"),
])
def test_a_wrong_way_import_breaks_a_contract(tree_copy, module, bad_import, contract):
    path = tree_copy / module
    original = path.read_text()
    path.write_text(original + f"\n{bad_import}  # deliberately wrong\n")
    try:
        result = lint_imports(tree_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout
