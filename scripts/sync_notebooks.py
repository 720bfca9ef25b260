"""Rewrite each notebook's .ipynb from its .py (the .py is the source of truth).

Also copies the repository address from pyproject.toml ([project.urls] Repository) into every
notebook's set-up cell, so it is written in one place. Outputs are never kept.

    python scripts/sync_notebooks.py        # what `make sync` runs
"""

import re
import sys
from pathlib import Path

import jupytext
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    for py in sorted((ROOT / "notebooks").glob("[0-9]*.py")):
        text = py.read_text()
        stamped = re.sub(r'^REPO = "[^"]*"', f'REPO = "{repo}"', text, flags=re.M)
        if stamped != text:
            py.write_text(stamped)
        notebook = jupytext.read(py)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        jupytext.write(notebook, py.with_suffix(".ipynb"))
        print(f"synced {py.name} -> {py.with_suffix('.ipynb').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
