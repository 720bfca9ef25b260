"""The notebooks are jupytext pairs: same cells in the .py and the .ipynb, no outputs committed.

Pairs are compared by content, never by timestamps (a fresh clone scrambles those). Executing the
notebooks is `pytest --nbmake notebooks/` (see the Makefile).
"""

import ast
import os
import re
import shutil
from pathlib import Path

import jupytext
import nbformat
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("01_eda", "02_train", "03_submission")


def pair_differences(py: Path, ipynb: Path) -> list[int]:
    """Indices of the cells whose type or source differ between a .py and its .ipynb (content
    only: never the files' times), including cells that exist in one file only."""
    a = [(c.cell_type, c.source.strip()) for c in jupytext.read(py).cells]
    b = [(c.cell_type, c.source.strip()) for c in nbformat.read(ipynb, as_version=4).cells]
    return [i for i in range(max(len(a), len(b))) if a[i : i + 1] != b[i : i + 1]]


@pytest.mark.parametrize("name", NAMES)
def test_pair_has_the_same_cells(name):
    differ = pair_differences(NOTEBOOKS / f"{name}.py", NOTEBOOKS / f"{name}.ipynb")
    assert differ == [], f"{name}.py and {name}.ipynb differ in cells {differ}: run `make sync`"


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_is_committed_without_outputs(name):
    ipynb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for i, cell in enumerate(ipynb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{name}.ipynb cell {i} has outputs"
            assert cell.execution_count is None, f"{name}.ipynb cell {i} has an execution count"


def device_literals(source: str) -> list[str]:
    """The string constants in ``source`` that name a device ("cpu", "cuda", "cuda:1" ...)."""
    return [
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"cpu|cuda(:\d+)?|mps", node.value)
    ]


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_leave_the_device_to_the_kit(name):
    """No notebook picks a device itself (`cfg.device or "cpu"` evaluated on the CPU beside a
    GPU): the device is `kit.device.default_device()` or the model's."""
    cells = jupytext.read(NOTEBOOKS / f"{name}.py").cells
    found = [c.source for c in cells if c.cell_type == "code" and device_literals(c.source)]
    assert found == [], f"{name}.py names a device: {found}"


def test_device_literals_catch_a_hard_coded_device():
    assert device_literals('model.to(cfg.device or "cpu")') == ["cpu"]
    assert device_literals('x.to("cuda:1"); print("cpu time")') == ["cuda:1"]


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
    py, ipynb = tmp_path / "01_eda.py", tmp_path / "01_eda.ipynb"
    shutil.copy(NOTEBOOKS / py.name, py)
    shutil.copy(NOTEBOOKS / ipynb.name, ipynb)
    assert pair_differences(py, ipynb) == []
    notebook = nbformat.read(ipynb, as_version=4)
    code = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code"]
    notebook.cells[code[2]].source += "\nprint('edited only in the ipynb')"
    nbformat.write(notebook, ipynb)
    os.utime(py, (0, 0))  # the .py looks older: times must not decide
    assert pair_differences(py, ipynb) == [code[2]]
    notebook.cells.append(nbformat.v4.new_markdown_cell("an extra cell"))
    nbformat.write(notebook, ipynb)
    assert pair_differences(py, ipynb) == [code[2], len(notebook.cells) - 1]
