"""Getting the kit onto Kaggle: the model dataset, the metadata files and the user's name.

The offline wheelhouse is ``kit.wheels``.

A competition notebook runs without internet and only its code file is pushed, so the kit, the
packages the Kaggle image lacks and the trained weights reach it as attached Kaggle Datasets
(mounted read-only under ``/kaggle/input/<slug>/``)::

    python -m kit kaggle-metadata --user NAME    # once: records NAME, fills every metadata file
    python -m kit wheels                         # wheels/*.whl: the kit + wheels/requirements.txt
    kaggle datasets create -p wheels
    python -m kit export --run runs/full --out export/model
    kaggle datasets create -p export/model
    kaggle kernels push -p .                     # kernel-metadata.json -> the submission notebook

(wheels/README.md has the whole path, training and submitting included.)

The user's Kaggle name lives in one place, ``kaggle-user.txt`` at the repository root; every
metadata file takes its owner from there. Credentials are never read here: they stay where the
kaggle CLI reads them (``~/.kaggle/``, ``KAGGLE_*`` environment variables), outside the repository.

The metadata checks mirror what the kaggle CLI (``kaggle/api/kaggle_api_extended.py``:
``kernels_push`` and ``dataset_create_new``) rejects before contacting the server, plus what it
lets through silently and then gets wrong: unknown keys (a typo in ``enable_internet`` leaves
internet on), booleans written as strings, a title that does not slug to the id.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from kit import atomic
from kit.env import COMPETITION

KERNEL_METADATA = "kernel-metadata.json"
DATASET_METADATA = "dataset-metadata.json"
USER_FILE = "kaggle-user.txt"
# What kaggle-user.txt holds until the user records a name: a well-formed owner, so every
# metadata file stays valid, but one that `kaggle-metadata --check` refuses.
PLACEHOLDER_USER = "your-kaggle-username"

WHEELS_SLUG = "hubmap-kit-wheels"
WHEELS_TITLE = "HuBMAP kit wheels"
MODEL_SLUG = "hubmap-kit-model"
MODEL_TITLE = "HuBMAP kit model"
# Run-folder files (kit.train) that go into a model dataset.
KERNEL_KEYS = frozenset(
    {
        "id",
        "id_no",
        "title",
        "code_file",
        "language",
        "kernel_type",
        "is_private",
        "enable_gpu",
        "enable_tpu",
        "enable_internet",
        "dataset_sources",
        "competition_sources",
        "kernel_sources",
        "model_sources",
        "keywords",
        "docker_image",
        "docker_image_pinning_type",
        "machine_shape",
    }
)
KERNEL_BOOLEANS = ("is_private", "enable_gpu", "enable_tpu", "enable_internet")
KERNEL_TYPES = ("notebook", "script")
# The accelerators `machine_shape` (or `kaggle kernels push --accelerator`) names, as the kaggle
# CLI documents them. NvidiaTeslaT4 is "GPU T4 x2"; without a machine_shape a GPU kernel may land on
# a P100, for which the image's torch (a cu128 build: sm_70 and newer) has no kernels.
GPU_SHAPES = ("NvidiaTeslaT4", "NvidiaTeslaP100")
TPU_SHAPES = ("TpuV5E8", "Tpu1VmV38")
UNUSABLE_SHAPES = {
    "NvidiaTeslaP100": "a P100 (sm_60): the Kaggle image's torch has no kernels for it"
}
PINNING_TYPES = ("original", "latest")

_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,49}")


def repo_root() -> Path:
    """The repository the kit runs from (editable install), else the working directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


# --------------------------------------------------------------------------- metadata checks


def slugify(title: str) -> str:
    """The URL slug Kaggle derives from a title: lowercase, runs of other characters -> "-"."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def validate_kernel_metadata(
    path: str | os.PathLike, *, offline_competition: str | None = None
) -> list[str]:
    """Problems that would make ``kaggle kernels push -p <folder of path>`` fail or misbehave.

    Args:
        path: a ``kernel-metadata.json``; ``code_file`` is resolved against its folder, as the
            CLI does.
        offline_competition: also require what a competition submission needs: this slug in
            ``competition_sources`` and ``enable_internet`` explicitly false (the CLI's default
            is true).

    Returns:
        One line per problem, each naming the key; empty when the file is fine.
    """
    path = Path(path)
    meta, problems = _load_json_object(path)
    if meta is None:
        return problems
    problems += _kernel_problems(meta, path.parent)
    if offline_competition is not None:
        if offline_competition not in (meta.get("competition_sources") or []):
            problems.append(f"competition_sources: must include {offline_competition!r}")
        if meta.get("enable_internet") is not False:
            problems.append(
                "enable_internet: must be false for a competition submission "
                f"(got {meta.get('enable_internet', '(absent: the CLI defaults it to true)')!r})"
            )
    return problems


def validate_dataset_metadata(path: str | os.PathLike) -> list[str]:
    """Problems that would make ``kaggle datasets create -p <folder of path>`` fail.

    Returns one line per problem, each naming the key; empty when the file is fine.
    """
    path = Path(path)
    meta, problems = _load_json_object(path)
    if meta is None:
        return problems
    return _dataset_problems(meta, path.parent)


def check_kernel_metadata(
    path: str | os.PathLike, *, offline_competition: str | None = None
) -> dict[str, Any]:
    """Read a kernel-metadata.json; ValueError listing every problem (see the validator)."""
    problems = validate_kernel_metadata(path, offline_competition=offline_competition)
    _raise_problems(path, problems)
    return json.loads(Path(path).read_text())


def check_dataset_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read a dataset-metadata.json; ValueError listing every problem (see the validator)."""
    _raise_problems(path, validate_dataset_metadata(path))
    return json.loads(Path(path).read_text())


def check_new_dataset_metadata(meta: Mapping[str, Any], where: str) -> None:
    """Raise ValueError naming ``where`` and listing why, unless ``meta`` is dataset metadata
    Kaggle accepts (for a document about to be written; the folder's files are not checked)."""
    _raise_problems(where, _dataset_problems(meta, None))


def _raise_problems(path: str | os.PathLike, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"{path}:\n  " + "\n  ".join(problems))


def _load_json_object(path: Path) -> tuple[dict | None, list[str]]:
    if not path.is_file():
        return None, [f"{path}: file not found"]
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        return None, [f"{path}: not valid JSON ({err})"]
    if not isinstance(meta, dict):
        return None, [f"{path}: expected a JSON object, got {type(meta).__name__}"]
    return meta, []


def _kernel_problems(meta: Mapping[str, Any], folder: Path) -> list[str]:
    """The kaggle CLI's ``kernels_push`` checks, and the silent failures it lets through."""
    problems = [
        f"{key}: not a key the kaggle CLI reads (a typo? it would be ignored)"
        for key in sorted(set(meta) - KERNEL_KEYS)
    ]
    problems += _id_and_title_problems(meta)
    language = meta.get("language")
    if language != "python":
        problems.append(f"language: must be 'python', got {language!r}")
    kernel_type = meta.get("kernel_type")
    if kernel_type not in KERNEL_TYPES:
        problems.append(f"kernel_type: must be one of {list(KERNEL_TYPES)}, got {kernel_type!r}")
    problems += _code_file_problems(meta.get("code_file"), folder, kernel_type)
    for key in KERNEL_BOOLEANS:
        if key in meta and not isinstance(meta[key], bool):
            problems.append(f"{key}: must be true or false, got {meta[key]!r}")
    if meta.get("enable_gpu") is True and meta.get("enable_tpu") is True:
        problems.append("enable_tpu: cannot be true with enable_gpu (one accelerator per kernel)")
    problems += _machine_shape_problems(meta)
    for key, check in (
        ("dataset_sources", lambda s: _ref_problem(s, max_parts=3)),
        ("kernel_sources", lambda s: _ref_problem(s, min_slug=5, max_parts=3)),
        ("model_sources", lambda s: _ref_problem(s, max_parts=5)),
        ("competition_sources", _competition_problem),
        ("keywords", lambda s: None if isinstance(s, str) else "must be a string"),
    ):
        problems += _list_problems(meta, key, check)
    pinning = meta.get("docker_image_pinning_type")
    if pinning is not None and pinning not in PINNING_TYPES:
        problems.append(
            f"docker_image_pinning_type: must be one of {list(PINNING_TYPES)}, got {pinning!r}"
        )
    return problems


def _id_and_title_problems(meta: Mapping[str, Any]) -> list[str]:
    """The kernel's id ('owner/slug', or an id_no) and a title that slugs to the id's slug."""
    problems, kernel_slug = [], None
    ref = meta.get("id")
    if ref is None and meta.get("id_no") is None:
        problems.append("id: missing ('owner/slug')")
    elif ref is not None:
        problem = _ref_problem(ref, min_slug=5)
        if problem:
            problems.append(f"id: {problem}")
        else:
            kernel_slug = ref.split("/")[1]
    title = meta.get("title")
    if not isinstance(title, str) or len(title) < 5:
        problems.append(f"title: must be a string of at least 5 characters, got {title!r}")
    elif kernel_slug is not None and slugify(title) != kernel_slug:
        problems.append(
            f"title: {title!r} slugs to {slugify(title)!r}, not to the id's slug "
            f"{kernel_slug!r} (Kaggle names the kernel after the title)"
        )
    return problems


def _machine_shape_problems(meta: Mapping[str, Any]) -> list[str]:
    """A GPU kernel must name a GPU the Kaggle image's torch can run on."""
    shape = meta.get("machine_shape")
    if meta.get("enable_gpu") is True and meta.get("enable_tpu") is True:
        return []  # reported under enable_tpu: which accelerator is meant is unclear
    if shape is None:
        if meta.get("enable_gpu") is True:
            return [
                "machine_shape: not set with enable_gpu: Kaggle may then give the kernel a P100, "
                "for which the image's torch has no kernels; set 'NvidiaTeslaT4'"
            ]
        return []
    known = TPU_SHAPES if meta.get("enable_tpu") is True else GPU_SHAPES
    if shape not in known:
        return [f"machine_shape: must be one of {list(known)} here, got {shape!r}"]
    if shape in UNUSABLE_SHAPES:
        return [f"machine_shape: {shape!r} is {UNUSABLE_SHAPES[shape]}; use 'NvidiaTeslaT4'"]
    return []


def _code_file_problems(code_file: Any, folder: Path, kernel_type: Any) -> list[str]:
    if not isinstance(code_file, str) or not code_file:
        return ["code_file: missing (path of the notebook, relative to the metadata's folder)"]
    path = folder / code_file
    if not path.is_file():
        return [f"code_file: {path} not found"]
    if kernel_type != "notebook":
        return []
    if path.suffix != ".ipynb":
        return [f"code_file: a notebook kernel needs a .ipynb file, got {code_file!r}"]
    try:
        notebook = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        return [f"code_file: {path} is not notebook JSON ({err})"]
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
        return [f"code_file: {path} is not a notebook (no 'cells' list)"]
    return []


def _list_problems(meta: Mapping[str, Any], key: str, check: Callable[[Any], str | None]):
    if key not in meta:
        return []
    value = meta[key]
    if not isinstance(value, list):
        return [f"{key}: must be a list, got {value!r}"]
    problems = []
    for item in value:
        problem = check(item) if isinstance(item, str) else "must be a string"
        if problem:
            problems.append(f"{key}: {item!r}: {problem}")
    return problems


def _ref_problem(ref: Any, *, min_slug: int = 1, max_parts: int = 2) -> str | None:
    """Why `ref` is not an "owner/slug" reference (extra "/parts" up to `max_parts`), or None."""
    if not isinstance(ref, str):
        return f"must be a string 'owner/slug', got {ref!r}"
    parts = ref.split("/")
    if len(parts) < 2 or len(parts) > max_parts or not all(parts):
        return f"must have the form 'owner/slug', got {ref!r}"
    if any(c.isspace() for c in ref):
        return f"must not contain spaces, got {ref!r}"
    if len(parts[1]) < min_slug:
        return f"slug {parts[1]!r} is shorter than {min_slug} characters"
    return None


def _competition_problem(slug: str) -> str | None:
    if _SLUG.fullmatch(slug):
        return None
    return "must be a competition's URL slug (lowercase words joined by '-', no owner)"


def _dataset_problems(meta: Mapping[str, Any], folder: Path | None) -> list[str]:
    """The kaggle CLI's ``dataset_create_new`` checks."""
    problems = []
    ref = meta.get("id")
    problem = _ref_problem(ref)
    if problem:
        problems.append(f"id: {problem}")
    else:
        slug = ref.split("/")[1]
        if not 6 <= len(slug) <= 50:
            problems.append(f"id: slug {slug!r} must be 6 to 50 characters long")
        if not _SLUG.fullmatch(slug):
            problems.append(f"id: slug {slug!r} must be lowercase words joined by '-'")
        if slug == "INSERT_SLUG_HERE":
            problems.append("id: still the template's placeholder")
    title = meta.get("title")
    if not isinstance(title, str) or not 6 <= len(title) <= 50:
        problems.append(f"title: must be a string of 6 to 50 characters, got {title!r}")
    elif title == "INSERT_TITLE_HERE":
        problems.append("title: still the template's placeholder")
    licenses = meta.get("licenses")
    if not isinstance(licenses, list) or len(licenses) != 1:
        problems.append(f"licenses: must hold exactly one license, got {licenses!r}")
    elif not isinstance(licenses[0], dict) or not isinstance(licenses[0].get("name"), str):
        problems.append(f"licenses: the license needs a 'name', got {licenses[0]!r}")
    subtitle = meta.get("subtitle")
    if subtitle is not None and (not isinstance(subtitle, str) or not 20 <= len(subtitle) <= 80):
        problems.append(f"subtitle: must be 20 to 80 characters, got {subtitle!r}")
    resources = meta.get("resources")
    if resources is not None and folder is not None:
        paths = [r.get("path") if isinstance(r, dict) else None for r in resources]
        problems += [
            f"resources: {p!r} not found in {folder}"
            for p in paths
            if not isinstance(p, str) or not (folder / p).is_file()
        ]
        problems += [f"resources: {p!r} listed twice" for p in sorted(_duplicates(paths))]
    return problems


def _duplicates(items: Iterable[Any]) -> set:
    seen, twice = set(), set()
    for item in items:
        (twice if item in seen else seen).add(item)
    return twice


# --------------------------------------------------------------------------- the user's name


def validate_user(name: str) -> str:
    """`name` stripped if it is a well-formed Kaggle user name; ValueError otherwise."""
    name = name.strip() if isinstance(name, str) else name
    if not isinstance(name, str) or not _USER.fullmatch(name):
        raise ValueError(
            f"Kaggle user name {name!r}: expected letters, digits, '-' or '_' (the name in your "
            "profile's URL, kaggle.com/NAME)"
        )
    return name


def read_user(root: str | os.PathLike | None = None) -> str:
    """The user's Kaggle name recorded in ``<root>/kaggle-user.txt`` (placeholder if absent)."""
    path = Path(root if root is not None else repo_root()) / USER_FILE
    if not path.is_file():
        return PLACEHOLDER_USER
    lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    names = [s for s in lines if s and not s.startswith("#")]
    if len(names) != 1:
        raise ValueError(f"{path}: expected one user name line, found {len(names)}")
    try:
        return validate_user(names[0])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def write_user(name: str, root: str | os.PathLike | None = None) -> Path:
    """Record the user's Kaggle name in ``<root>/kaggle-user.txt`` (atomically)."""
    name = validate_user(name)
    path = Path(root if root is not None else repo_root()) / USER_FILE
    text = (
        "# The Kaggle user name that owns the kit's kernel and datasets: the one place it lives.\n"
        "# Change it with `python -m kit kaggle-metadata --user NAME`, which also rewrites\n"
        "# kernel-metadata.json and wheels/dataset-metadata.json. Not a credential.\n"
        f"{name}\n"
    )
    atomic.write_text(path, text)
    return path


def with_owner(metadata: Mapping[str, Any], user: str, previous: Iterable[str] = ()) -> dict:
    """A copy of kernel or dataset metadata whose references belong to `user`.

    ``id`` always gets the new owner; a ``*_sources`` entry does when its owner is one of
    `previous` (the name recorded before, or the placeholder), so another user's dataset that a
    kernel attaches keeps its owner.
    """
    previous = set(previous) | {PLACEHOLDER_USER}
    out = dict(metadata)
    if isinstance(out.get("id"), str) and "/" in out["id"]:
        out["id"] = _swap_owner(out["id"], user)
    for key in ("dataset_sources", "kernel_sources", "model_sources"):
        if isinstance(out.get(key), list):
            out[key] = [
                _swap_owner(ref, user)
                if isinstance(ref, str) and ref.split("/")[0] in previous
                else ref
                for ref in out[key]
            ]
    return out


def _swap_owner(ref: str, user: str) -> str:
    return "/".join([user, *ref.split("/")[1:]])


def dataset_metadata(user: str, slug: str, title: str, description: str = "", **extra) -> dict:
    """A ``dataset-metadata.json`` document (license CC0-1.0 unless `extra` says otherwise)."""
    meta = {"id": f"{user}/{slug}", "title": title, "licenses": [{"name": "CC0-1.0"}]}
    if description:
        meta["description"] = description
    meta.update(extra)
    return meta


def wheels_dataset_metadata(user: str) -> dict:
    """The wheelhouse dataset's metadata: third-party wheels keep their own licenses."""
    return dataset_metadata(
        user,
        WHEELS_SLUG,
        WHEELS_TITLE,
        "Wheels for the offline HuBMAP kit submission notebook: hubmap-kit itself and the "
        "packages the Kaggle image lacks (wheels/requirements.txt). Install with "
        "`pip install --no-index --find-links <this folder> hubmap-kit`. Each wheel keeps its "
        "upstream license.",
        licenses=[{"name": "other"}],
    )


def fill_metadata(
    user: str | None = None,
    *,
    root: str | os.PathLike | None = None,
    datasets: Iterable[str | os.PathLike] = (),
) -> list[Path]:
    """Put the user's name into every metadata file; record it first when `user` is given.

    Args:
        user: the Kaggle name to record in kaggle-user.txt; None uses the recorded one.
        root: the repository (``kernel-metadata.json``, ``wheels/dataset-metadata.json``).
        datasets: further dataset folders (model exports) whose metadata gets the name too.

    Returns:
        The files rewritten (each atomically). Every file is read and rewritten in memory
        before the first is written, so an unreadable one leaves all of them untouched.
    """
    root = Path(root if root is not None else repo_root())
    previous = read_user(root)
    user = validate_user(user) if user is not None else previous
    updated = []
    for path in metadata_files(root, datasets):
        meta, problems = _load_json_object(path)
        if meta is None:
            raise (FileNotFoundError if not path.exists() else ValueError)(problems[0])
        updated.append((path, with_owner(meta, user, previous=[previous])))
    if user != previous or not (root / USER_FILE).is_file():
        write_user(user, root)
    for path, meta in updated:
        atomic.write_json(path, meta)
    return [path for path, _ in updated]


def human_size(path: Path) -> str:
    """The size of the file ``path`` in megabytes, as shown in logs ("12.3 MB")."""
    return f"{path.stat().st_size / 1e6:.1f} MB"


def check_all_metadata(
    root: str | os.PathLike, datasets: Iterable[str | os.PathLike] = (), user: str | None = None
) -> None:
    """ValueError listing every problem of every metadata file, an unset user name included."""
    root = Path(root)
    user = validate_user(user) if user is not None else read_user(root)
    problems = []
    if user == PLACEHOLDER_USER:
        problems.append(f"{root / USER_FILE}: no user name recorded (kaggle-metadata --user NAME)")
    for path in metadata_files(root, datasets):
        found = metadata_problems(path)
        if not found:
            owner = json.loads(path.read_text())["id"].split("/")[0]
            if owner != user:
                found = [f"id: owner {owner!r} is not the recorded user {user!r}"]
        problems += [f"{path}: {p}" for p in found]
    if problems:
        raise ValueError("metadata not ready:\n  " + "\n  ".join(problems))


def metadata_problems(path: Path) -> list[str]:
    """The problems of a kernel (as a competition submission) or dataset metadata file."""
    if path.name == KERNEL_METADATA:
        return validate_kernel_metadata(path, offline_competition=COMPETITION)
    return validate_dataset_metadata(path)


def metadata_files(root: Path, datasets: Iterable[str | os.PathLike]) -> list[Path]:
    return [root / KERNEL_METADATA, root / "wheels" / DATASET_METADATA] + [
        Path(d) / DATASET_METADATA for d in datasets
    ]
