"""The offline wheelhouse: what the internet-less Kaggle notebook installs the kit from.

    python -m kit wheels [--target kaggle|local|both]     # what `make wheels` runs

Builds the kit's own wheel from this checkout and downloads, with ``pip download
--only-binary=:all: --no-deps``, one binary wheel per pin of ``wheels/requirements.txt`` for the
Kaggle image (CPython 3.12, manylinux x86_64) or for this interpreter. The set is assembled in a
hidden folder and moved into place only when complete, after checking that every dependency of
what is shipped is either in the Kaggle image (``KAGGLE_IMAGE``) or in the wheelhouse.
``kaggle datasets create -p wheels`` publishes it (see wheels/README.md).
"""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from kit import atomic
from kit.kaggle import (
    DATASET_METADATA,
    human_size,
    read_user,
    repo_root,
    wheels_dataset_metadata,
)

KIT_DISTRIBUTION = "hubmap-kit"

# The Kaggle image: CPython 3.12 on Ubuntu 22.04 (glibc 2.35, inferred from Colab's image), so any
# manylinux wheel up to manylinux_2_35 runs there. pip takes the first tag that has a wheel.
KAGGLE_PYTHON = "3.12"
KAGGLE_PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)),
    "manylinux2014_x86_64",
    "manylinux_2_12_x86_64",
    "manylinux2010_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
)
TARGETS = ("kaggle", "local")
# Environment-marker values of the Kaggle image's interpreter (for `python_version < "3.11"`...).
KAGGLE_MARKERS = {
    "python_version": KAGGLE_PYTHON,
    "python_full_version": f"{KAGGLE_PYTHON}.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
# The distributions the Kaggle image is known to hold (DOMAIN.md), by the exact name pip matches
# requirements against: never shipped as wheels. OpenCV is left out on purpose: cv2 is in the
# image, but under which distribution name (opencv-python, -headless, -contrib) is not known, so
# the kit must not require any of them by name (it arrives with albumentations).
KAGGLE_IMAGE_DOCUMENTED = frozenset(
    {"numpy", "pandas", "torch", "torchvision", "albumentations", "numba", "tqdm", "matplotlib"}
)
# Not named by DOMAIN.md, but unconditional requirements of what is: the image cannot hold those
# without these. name -> a documented distribution requiring it (tests/test_kaggle.py checks it).
KAGGLE_IMAGE_IMPLIED = {
    "pillow": "torchvision",
    "pyyaml": "albumentations",
    "filelock": "torch",
    "fsspec": "torch",
    "typing-extensions": "torch",
    "packaging": "matplotlib",
}
KAGGLE_IMAGE = KAGGLE_IMAGE_DOCUMENTED | frozenset(KAGGLE_IMAGE_IMPLIED)

_PIN = re.compile(r"([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)")
_URL_CREDENTIALS = re.compile(r"(://)[^/@\s]+@")
# How pip is run (tests substitute a stand-in).
PIP_COMMAND = (sys.executable, "-m", "pip")


# --------------------------------------------------------------------------- wheels


class WheelError(ValueError):
    """pip could not build or download a wheel; the message names the requirement."""


class Pin(NamedTuple):
    """One ``name==version`` line of wheels/requirements.txt."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def key(self) -> str:
        """The normalised project name (PEP 503), as wheel file names and pip compare it."""
        return _normalise(self.name)


def read_requirements(path: str | os.PathLike) -> list[Pin]:
    """The pinned requirements of a requirements file: ``name==version`` lines, ``#`` comments.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not an exact pin, or a project pinned twice (names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"requirements file not found: {path}")
    pins: list[Pin] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = _PIN.fullmatch(text.replace(" ", ""))
        if not match:
            raise ValueError(f"{path}:{number}: {text!r} is not an exact pin 'name==version'")
        pin = Pin(*match.groups())
        if any(p.key == pin.key for p in pins):
            raise ValueError(f"{path}:{number}: {pin.name} is pinned twice")
        pins.append(pin)
    return pins


def pip_target_args(target: str) -> list[str]:
    """pip download options selecting wheels for `target`: "kaggle" or "local" (this Python)."""
    if target == "local":
        return []
    if target == "kaggle":
        platforms = [arg for p in KAGGLE_PLATFORMS for arg in ("--platform", p)]
        return ["--python-version", KAGGLE_PYTHON, "--implementation", "cp", *platforms]
    raise ValueError(f"wheel target must be one of {list(TARGETS)}, got {target!r}")


def build_wheelhouse(
    dest: str | os.PathLike,
    target: str = "kaggle",
    *,
    requirements: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Put the kit's wheel and a binary wheel of every pinned requirement into `dest`.

    Args:
        dest: the wheelhouse folder (created). Its ``*.whl`` become exactly the new set; other
            files (dataset-metadata.json, README) stay.
        target: "kaggle" (CPython 3.12, manylinux x86_64) or "local" (the running interpreter).
        requirements: the pins (default ``<root>/wheels/requirements.txt``).
        root: the kit's source tree (default: the repository this kit runs from).
        log: called with one line per wheel as it arrives (e.g. ``print``).

    Returns:
        The wheel paths in `dest`, the kit's first.

    Everything is fetched into a hidden folder inside `dest` first and moved into place only when
    every wheel is there, so a failure leaves `dest` as it was.

    Raises:
        WheelError: pip failed or produced no wheel of a requirement (the message names it).
    """
    pip_target_args(target)  # reject a bad target before any work
    root = Path(root if root is not None else repo_root())
    pins = read_requirements(requirements or root / "wheels" / "requirements.txt")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    log = log or (lambda line: None)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=dest))
    try:
        built = _fetch_wheels(staging, root, pins, target, log)
        _replace_wheels(dest, built)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [dest / path.name for path in built]


def _fetch_wheels(
    staging: Path, root: Path, pins: list[Pin], target: str, log: Callable[[str], None]
) -> list[Path]:
    """The kit's wheel and one of each pin, in ``staging``; raises WheelError unless together
    they install offline."""
    built = [build_kit_wheel(staging, root)]
    log(f"  {built[0].name} ({human_size(built[0])})")
    for pin in pins:
        built.append(download_wheel(pin, staging, target))
        log(f"  {built[-1].name} ({human_size(built[-1])})")
    unmet = unmet_dependencies(built, target)
    if unmet:
        raise WheelError(
            "the wheelhouse would not install offline (add these to wheels/requirements.txt, "
            "or to kit.wheels.KAGGLE_IMAGE if the image has them):\n  " + "\n  ".join(unmet)
        )
    return built


def _replace_wheels(dest: Path, built: list[Path]) -> None:
    """Make ``built`` exactly the wheels in ``dest``: others are deleted, these moved in."""
    names = {path.name for path in built}
    for old in dest.glob("*.whl"):
        if old.name not in names:
            old.unlink()
    for path in built:
        os.replace(path, dest / path.name)


def build_kit_wheel(dest: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Build the kit's own wheel (pure Python) into `dest`; return its path.

    Built from a clean copy of the sources (pyproject.toml, README, LICENSE, kit/), so files left
    in an old build/ folder never slip into the wheel.
    """
    root = Path(root if root is not None else repo_root())
    if not (root / "pyproject.toml").is_file() or not (root / "kit").is_dir():
        raise FileNotFoundError(f"{root}: not the kit's source tree (pyproject.toml and kit/)")
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix=".kit-build-", dir=dest) as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        for path in sorted(root.glob("*")):
            if path.is_file() and (
                path.name == "pyproject.toml" or path.name.startswith(("README", "LICENSE"))
            ):
                shutil.copy2(path, src / path.name)
        shutil.copytree(root / "kit", src / "kit", ignore=shutil.ignore_patterns("__pycache__"))
        _run_pip(
            ["wheel", "--no-deps", "--wheel-dir", str(out), str(src)],
            what=f"building the kit's wheel ({KIT_DISTRIBUTION} from {root})",
        )
        wheels = sorted(out.glob("*.whl"))
        if len(wheels) != 1 or _wheel_key(wheels[0].name)[0] != _normalise(KIT_DISTRIBUTION):
            raise WheelError(
                f"building the kit's wheel: expected one {KIT_DISTRIBUTION} wheel, "
                f"got {[w.name for w in wheels]}"
            )
        _check_wheel_file(wheels[0], KIT_DISTRIBUTION)
        return Path(shutil.move(wheels[0], dest / wheels[0].name))


def download_wheel(pin: Pin, dest: str | os.PathLike, target: str = "kaggle") -> Path:
    """Download the binary wheel of one pinned requirement for `target` into `dest`.

    Raises:
        WheelError: pip failed (no wheel for that platform, unknown version, no registry), or
            what it saved is not a wheel of exactly that pin.
    """
    dest = Path(dest)
    what = f"{pin} (target {target})"
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        _run_pip(
            [
                "download",
                "--only-binary=:all:",
                "--no-deps",
                "--dest",
                tmp,
                *pip_target_args(target),
                str(pin),
            ],
            what=what,
        )
        saved = sorted(Path(tmp).iterdir())
        wheels = [p for p in saved if _wheel_key(p.name) == (pin.key, pin.version.lower())]
        if len(saved) != 1 or len(wheels) != 1:
            raise WheelError(f"{what}: pip saved {[p.name for p in saved]}, not one wheel of it")
        _check_wheel_file(wheels[0], pin.name)
        return Path(shutil.move(wheels[0], dest / wheels[0].name))


def unmet_dependencies(wheels: Iterable[str | os.PathLike], target: str = "kaggle") -> list[str]:
    """Dependencies of `wheels` that neither the Kaggle image nor the wheels themselves provide.

    The image is taken to hold `KAGGLE_IMAGE` (any version); a wheel of the set must match the
    requirement's version range. Markers are evaluated for `target` ("kaggle": `KAGGLE_MARKERS`;
    "local": this interpreter), extras are not installed.

    Returns:
        One line per unmet requirement: "<wheel file> needs <requirement> (...)".
    """
    from packaging.requirements import Requirement

    environment = {**(KAGGLE_MARKERS if target == "kaggle" else {}), "extra": ""}
    wheels = [Path(w) for w in wheels]
    provided = dict(filter(None, (_wheel_key(w.name) for w in wheels)))
    unmet = []
    for wheel in wheels:
        for line in _requires_dist(wheel):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(environment):
                continue
            key = _normalise(req.name)
            if key in KAGGLE_IMAGE:
                continue
            have = provided.get(key)
            if have is not None and req.specifier.contains(have, prereleases=True):
                continue
            found = f"the wheelhouse has {have}" if have else "not in the wheelhouse"
            unmet.append(f"{wheel.name} needs {req} ({found}; not in the Kaggle image list)")
    return unmet


def _requires_dist(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(name))
    return metadata.get_all("Requires-Dist") or []


def _run_pip(args: list[str], *, what: str) -> None:
    """Run ``python -m pip ARGS`` quietly; WheelError naming `what` with pip's last lines."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([*PIP_COMMAND, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-15:]
        # Index URLs may carry a token (https://user:token@host/): never echo one.
        text = _URL_CREDENTIALS.sub(r"\1***@", "\n".join(tail))
        raise WheelError(f"{what}: pip exited with status {proc.returncode}:\n{text}")


def _check_wheel_file(path: Path, name: str) -> None:
    """WheelError unless `path` is a readable zip with a ``*.dist-info/METADATA``."""
    try:
        with zipfile.ZipFile(path) as wheel:
            if not any(n.endswith(".dist-info/METADATA") for n in wheel.namelist()):
                raise WheelError(f"{name}: {path.name} has no .dist-info/METADATA")
    except zipfile.BadZipFile as err:
        raise WheelError(f"{name}: {path.name} is not a valid wheel ({err})") from None


def _wheel_key(filename: str) -> tuple[str, str] | None:
    """(normalised name, lowercase version) of a wheel file name, None if not a wheel's."""
    if not filename.endswith(".whl"):
        return None
    parts = filename[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        return None
    return _normalise(parts[0]), parts[1].lower()


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def build_target(
    out: str | os.PathLike, target: str, *, root: Path, requirements=None, log=print
) -> Path:
    """The wheelhouse of ``target``: ``out`` for kaggle (with its dataset-metadata.json, kept if
    present), ``out/local`` for local."""
    dest = Path(out) if target == "kaggle" else Path(out) / "local"
    log(f"{target} wheelhouse: {dest}")
    build_wheelhouse(dest, target, requirements=requirements, root=root, log=log)
    if target == "kaggle" and not (dest / DATASET_METADATA).is_file():
        atomic.write_json(dest / DATASET_METADATA, wheels_dataset_metadata(read_user(root)))
    return dest
