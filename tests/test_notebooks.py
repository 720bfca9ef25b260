"""The notebooks are jupytext pairs: same cells in the .py and the .ipynb, no outputs committed.

Pairs are compared by content, never by timestamps (a fresh clone scrambles those). Executing the
notebooks is `pytest --nbmake notebooks/` (see the Makefile).
"""

import re
from pathlib import Path

import jupytext
import nbformat
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("01_eda", "02_train", "03_submission")


def cells(notebook) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in notebook.cells]


@pytest.mark.parametrize("name", NAMES)
def test_pair_has_the_same_cells(name):
    py = jupytext.read(NOTEBOOKS / f"{name}.py")
    ipynb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert cells(py) == cells(ipynb), f"{name}.py and {name}.ipynb differ: run `make sync`"


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_is_committed_without_outputs(name):
    ipynb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for i, cell in enumerate(ipynb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{name}.ipynb cell {i} has outputs"
            assert cell.execution_count is None, f"{name}.ipynb cell {i} has an execution count"


def test_pairing_is_declared():
    assert 'formats = "ipynb,py:percent"' in (ROOT / "jupytext.toml").read_text()


def test_repository_address_is_written_in_one_place():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    repo = meta["project"]["urls"]["Repository"]
    for name in NAMES:
        text = (NOTEBOOKS / f"{name}.py").read_text()
        assert re.findall(r'^REPO = "([^"]+)"', text, re.M) == [repo], name
    readme = (ROOT / "README.md").read_text()
    for name in NAMES:
        assert f"colab.research.google.com/github/{repo.split('github.com/')[1]}" in readme
        assert f"notebooks/{name}.ipynb" in readme


def test_detector_catches_a_drifted_pair(tmp_path):
    py = jupytext.read(NOTEBOOKS / "01_eda.py")
    drifted = nbformat.v4.new_notebook(cells=list(py.cells))
    drifted.cells[-1] = nbformat.v4.new_code_cell("print('edited only in the ipynb')")
    assert cells(py) != cells(drifted)
