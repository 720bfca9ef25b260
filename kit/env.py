"""Where the kit is running and where its data and outputs live.

The notebooks call :func:`environment` once; everything else takes explicit paths.

Data is found in this order:

1. ``$HUBMAP_DATA`` (an explicit override; it must hold ``sample_submission.csv``);
2. on Kaggle, the competition folder found by globbing under ``/kaggle/input`` (both the classic
   ``/kaggle/input/<slug>`` mount and the newer ``/kaggle/input/competitions/<slug>`` one);
3. a local ``data/`` folder (in the working directory or the repository root);
4. the kit's synthetic dataset, generated once into a cache folder (``kit.synthetic``).

Outputs go under ``/kaggle/working`` on Kaggle and ``runs/`` elsewhere; on Kaggle, large
intermediate files (the tile cache) go outside it, to :func:`scratch_dir`. ``$KAGGLE_INPUT``,
``$KAGGLE_WORKING`` and ``$KAGGLE_TEMP`` replace the Kaggle folders (the offline test lays out a
fake ``/kaggle``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

COMPETITION = "hubmap-kidney-segmentation"
# Overridable so tests (and unusual mounts) can stand in for Kaggle's folders.
KAGGLE_INPUT = Path(os.environ.get("KAGGLE_INPUT", "/kaggle/input"))
KAGGLE_WORKING = Path(os.environ.get("KAGGLE_WORKING", "/kaggle/working"))
KAGGLE_TEMP = Path(os.environ.get("KAGGLE_TEMP", "/kaggle/temp"))
# A folder is the competition's data when it holds both of these.
DATA_MARKERS = ("sample_submission.csv", "train.csv")


@dataclass(frozen=True)
class Environment:
    """Where we run and which data we use."""

    kind: str  # "kaggle", "colab" or "local"
    data_dir: Path  # the competition layout: train.csv, train/, test/, sample_submission.csv
    data_source: str  # "env", "kaggle", "local" or "synthetic"
    out_dir: Path  # where runs, exports and submission.csv go
    scratch_dir: Path  # large intermediate files (the tile cache): out_dir, except on Kaggle

    @property
    def synthetic(self) -> bool:
        """True when the data is the kit's synthetic stand-in (pick the quick settings)."""
        return self.data_source == "synthetic"


def detect(modules=None, environ=None, kaggle_input: Path = KAGGLE_INPUT) -> str:
    """Return ``"kaggle"``, ``"colab"`` or ``"local"``."""
    modules = sys.modules if modules is None else modules
    environ = os.environ if environ is None else environ
    if "KAGGLE_KERNEL_RUN_TYPE" in environ or kaggle_input.is_dir():
        return "kaggle"
    if "google.colab" in modules:
        return "colab"
    return "local"


def is_dataset(path: Path) -> bool:
    """True if ``path`` looks like the competition's data folder."""
    return all((path / name).is_file() for name in DATA_MARKERS)


def find_competition_data(root: Path = KAGGLE_INPUT) -> Path | None:
    """Find the competition folder under a Kaggle input root, whichever mount layout is used.

    Prefers a folder named after the competition; searches up to three levels deep
    (``<root>/<slug>``, ``<root>/competitions/<slug>``, ``<root>/datasets/<owner>/<slug>``).
    """
    if not root.is_dir():
        return None
    found = []
    for depth in ("*", "*/*", "*/*/*"):
        found += [p.parent for p in sorted(root.glob(f"{depth}/{DATA_MARKERS[0]}"))]
    found = [p for p in found if is_dataset(p)]
    if not found:
        return None
    named = [p for p in found if p.name == COMPETITION]
    return (named or found)[0]


def find_data(
    *,
    environ=None,
    kaggle_input: Path = KAGGLE_INPUT,
    local: tuple[Path, ...] | None = None,
    synthetic: bool = True,
) -> tuple[Path, str]:
    """Locate the data folder; return ``(path, source)`` (see the module docstring for the order).

    Raises:
        FileNotFoundError: ``$HUBMAP_DATA`` is set but is not a competition folder, or nothing
            was found and ``synthetic`` is False.
    """
    environ = os.environ if environ is None else environ
    override = environ.get("HUBMAP_DATA")
    if override:
        path = Path(override).expanduser()
        if not (path / DATA_MARKERS[0]).is_file():
            raise FileNotFoundError(
                f"HUBMAP_DATA={override!r} does not contain {DATA_MARKERS[0]}; "
                "point it at the competition folder (train.csv, train/, test/, ...)"
            )
        return path, "env"
    found = find_competition_data(kaggle_input)
    if found is not None:
        return found, "kaggle"
    if local is None:
        local = (Path.cwd() / "data", Path(__file__).resolve().parents[1] / "data")
    for path in local:
        if is_dataset(path):
            return path, "local"
    if not synthetic:
        raise FileNotFoundError(
            f"no competition data: set HUBMAP_DATA, attach {COMPETITION} on Kaggle, or put it in "
            + " or ".join(str(p) for p in local)
        )
    from kit.synthetic import default_dataset

    return default_dataset(), "synthetic"


def environment(out_dir: str | os.PathLike | None = None) -> Environment:
    """Detect the environment, find the data and choose the output folder (created)."""
    kind = detect()
    data_dir, source = find_data()
    if out_dir is None:
        out_dir = KAGGLE_WORKING if kind == "kaggle" else Path("runs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scratch = scratch_dir(kind) or out
    return Environment(kind, data_dir, source, out, scratch)


def scratch_dir(kind: str | None = None, kaggle_temp: Path = KAGGLE_TEMP) -> Path | None:
    """The kit's folder for large intermediate files on Kaggle; None elsewhere (they go beside
    the outputs).

    On Kaggle everything under /kaggle/working is the notebook's output: at most 20 GB, saved
    with every version. The folder is ``hubmap-kit`` in ``kaggle_temp`` (``/kaggle/temp``, kept
    for the session only) where that exists, else in the system's temporary folder.

    Args:
        kind: ``"kaggle"``, ``"colab"`` or ``"local"``; default: `detect`.
    """
    if (detect() if kind is None else kind) != "kaggle":
        return None
    temp = kaggle_temp if kaggle_temp.is_dir() else Path(tempfile.gettempdir())
    return temp / "hubmap-kit"


# The third-party modules the kit imports -> what provides them (tests/test_env.py keeps this
# list complete by reading the kit's imports).
DEPENDENCIES = {
    "numpy": "numpy",
    "pandas": "pandas",
    "torch": "torch",
    "torchvision": "torchvision",
    "albumentations": "albumentations",
    "cv2": "OpenCV (installed with albumentations)",
    "rasterio": "rasterio",
    "tifffile": "tifffile",
    "numba": "numba",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
    "timm": "timm",
    "safetensors": "safetensors",
}


def check_imports(modules: dict[str, str] | None = None) -> None:
    """Import every dependency of the kit; ImportError listing each that fails, and why.

    The notebooks call this right after installing the kit: an offline ``pip install`` can
    succeed and a module still fail to import (a library built for another numpy, a missing
    shared library), and the failure should surface here, named, not in the middle of a run.

    Args:
        modules: module -> what provides it; default `DEPENDENCIES`.
    """
    import importlib

    failed = []
    for module, provider in (DEPENDENCIES if modules is None else modules).items():
        try:
            importlib.import_module(module)
        except Exception as err:  # ImportError, or whatever a broken extension raises
            failed.append(f"{module} (from {provider}): {type(err).__name__}: {err}")
    if failed:
        raise ImportError("the kit's dependencies do not import:\n  " + "\n  ".join(failed))


def find_files(pattern: str, roots: tuple[Path, ...] = (KAGGLE_INPUT,)) -> list[Path]:
    """All files matching ``pattern`` (a glob, e.g. ``"**/best.pt"``) under the given roots."""
    hits: list[Path] = []
    for root in roots:
        if root.is_dir():
            hits += sorted(p for p in root.glob(pattern) if p.is_file())
    return hits
