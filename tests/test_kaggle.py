"""kit.kaggle: metadata checks (mirroring the kaggle CLI), the user's name, wheels, model export."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from kit import checkpoint, kaggle, wheels
from kit.cli import main
from kit.env import COMPETITION

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "notebooks/03_submission.ipynb"


def write_json(path: Path, document) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    return path


def tiny_notebook() -> dict:
    return {
        "cells": [{"cell_type": "code", "metadata": {}, "source": "print(1)", "outputs": []}],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def good_kernel(user: str = "alice") -> dict:
    return {
        "id": f"{user}/hubmap-kit-submission",
        "title": "HuBMAP kit submission",
        "code_file": NOTEBOOK,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": True,
        "enable_tpu": False,
        "enable_internet": False,
        "machine_shape": "NvidiaTeslaT4",
        "dataset_sources": [f"{user}/hubmap-kit-wheels", f"{user}/hubmap-kit-model"],
        "competition_sources": [COMPETITION],
        "kernel_sources": [],
        "model_sources": [],
    }


@pytest.fixture
def kernel_dir(tmp_path) -> Path:
    """A push folder: kernel-metadata.json + the notebook at its relative path."""
    write_json(tmp_path / NOTEBOOK, tiny_notebook())
    write_json(tmp_path / kaggle.KERNEL_METADATA, good_kernel())
    return tmp_path


@pytest.fixture
def repo(tmp_path) -> Path:
    """A copy of the repository's metadata files (and a notebook stand-in) to rewrite freely."""
    root = tmp_path / "repo"
    for name in (kaggle.KERNEL_METADATA, kaggle.USER_FILE, "wheels/dataset-metadata.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    write_json(root / NOTEBOOK, tiny_notebook())
    return root


# --------------------------------------------------------------------------- kernel metadata


def test_slugify_matches_kaggle_urls():
    assert kaggle.slugify("HuBMAP kit submission") == "hubmap-kit-submission"
    assert kaggle.slugify("  Glomeruli: U-Net (v2)!  ") == "glomeruli-u-net-v2"


def test_repository_kernel_metadata_is_ready_to_push(repo):
    """The committed file, pushed with a stand-in notebook: every CLI rule and the policy."""
    assert (
        kaggle.validate_kernel_metadata(
            repo / kaggle.KERNEL_METADATA, offline_competition=COMPETITION
        )
        == []
    )
    meta = json.loads((ROOT / kaggle.KERNEL_METADATA).read_text())
    user = kaggle.read_user(ROOT)
    assert meta["code_file"] == NOTEBOOK
    assert meta["is_private"] is True and meta["enable_gpu"] is True
    assert meta["enable_internet"] is False and meta["enable_tpu"] is False
    assert meta["machine_shape"] == "NvidiaTeslaT4"
    assert meta["competition_sources"] == [COMPETITION]
    assert meta["id"] == f"{user}/hubmap-kit-submission"
    wheel_files = json.loads((ROOT / "wheels" / kaggle.DATASET_METADATA).read_text())
    assert meta["dataset_sources"] == [wheel_files["id"], f"{user}/{kaggle.MODEL_SLUG}"]


def test_repository_kernel_metadata_points_at_the_real_notebook():
    if not (ROOT / NOTEBOOK).is_file():
        pytest.skip(f"{NOTEBOOK} is missing")
    problems = kaggle.validate_kernel_metadata(
        ROOT / kaggle.KERNEL_METADATA, offline_competition=COMPETITION
    )
    assert problems == []


def test_good_kernel_metadata_has_no_problems(kernel_dir):
    path = kernel_dir / kaggle.KERNEL_METADATA
    assert kaggle.validate_kernel_metadata(path, offline_competition=COMPETITION) == []
    assert kaggle.check_kernel_metadata(path)["id"] == "alice/hubmap-kit-submission"


@pytest.mark.parametrize(
    "change, key",
    [
        ({"id": "hubmap-kit-submission"}, "id"),  # no owner
        ({"id": "alice/abcd", "title": "Abcd efgh"}, "id"),  # slug of 4 characters
        ({"id": "alice/"}, "id"),
        ({"id": None}, "id"),
        ({"title": "Subm"}, "title"),  # 4 characters
        ({"title": "HuBMAP kit inference"}, "title"),  # slugs to another id
        ({"code_file": ""}, "code_file"),
        ({"code_file": "notebooks/missing.ipynb"}, "code_file"),
        ({"language": "r"}, "language"),
        ({"kernel_type": "kernel"}, "kernel_type"),
        ({"enable_internet": "false"}, "enable_internet"),  # a string, truthy to the server
        ({"enable_gpu": 1}, "enable_gpu"),
        ({"is_private": "true"}, "is_private"),
        ({"enable_tpu": True}, "enable_tpu"),  # with enable_gpu true
        ({"dataset_sources": "alice/hubmap-kit-wheels"}, "dataset_sources"),  # not a list
        ({"dataset_sources": ["hubmap-kit-wheels"]}, "dataset_sources"),
        ({"dataset_sources": ["alice/hubmap kit wheels"]}, "dataset_sources"),
        ({"dataset_sources": ["alice/a/1/x"]}, "dataset_sources"),
        ({"dataset_sources": [7]}, "dataset_sources"),
        ({"kernel_sources": ["alice/abc"]}, "kernel_sources"),  # kernel slug < 5
        ({"model_sources": ["keras"]}, "model_sources"),
        ({"competition_sources": ["kaggle/hubmap-kidney-segmentation"]}, "competition_sources"),
        ({"competition_sources": ["HuBMAP Kidney"]}, "competition_sources"),
        ({"keywords": "gpu"}, "keywords"),
        ({"docker_image_pinning_type": "newest"}, "docker_image_pinning_type"),
        ({"machine_shape": None}, "machine_shape"),  # a GPU kernel may land on a P100
        ({"machine_shape": "NvidiaTeslaP100"}, "machine_shape"),  # no sm_60 kernels in torch
        ({"machine_shape": "NvidiaTeslaT4x2"}, "machine_shape"),  # not a documented value
        ({"enable_internets": False}, "enable_internets"),  # a typo the CLI would ignore
    ],
)
def test_broken_kernel_metadata_is_reported_by_key(kernel_dir, change, key):
    path = kernel_dir / kaggle.KERNEL_METADATA
    write_json(path, {**good_kernel(), **change})
    problems = kaggle.validate_kernel_metadata(path)
    assert problems, change
    assert all(p.startswith(key) for p in problems), problems
    with pytest.raises(ValueError, match=key):
        kaggle.check_kernel_metadata(path)


def test_missing_keys_are_each_reported(kernel_dir):
    path = write_json(kernel_dir / kaggle.KERNEL_METADATA, {"enable_internet": False})
    keys = {p.split(":")[0] for p in kaggle.validate_kernel_metadata(path)}
    assert keys == {"id", "title", "language", "kernel_type", "code_file"}


def test_notebook_kernel_needs_notebook_json(kernel_dir):
    path = kernel_dir / kaggle.KERNEL_METADATA
    (kernel_dir / NOTEBOOK).write_text("# %% a jupytext script, not notebook JSON\n")
    assert kaggle.validate_kernel_metadata(path)[0].startswith("code_file: ")
    write_json(kernel_dir / NOTEBOOK, {"nbformat": 4})
    assert "no 'cells'" in kaggle.validate_kernel_metadata(path)[0]
    (kernel_dir / "run.py").write_text("print(1)\n")
    write_json(path, {**good_kernel(), "code_file": "run.py"})
    assert "needs a .ipynb" in kaggle.validate_kernel_metadata(path)[0]
    write_json(path, {**good_kernel(), "code_file": "run.py", "kernel_type": "script"})
    assert kaggle.validate_kernel_metadata(path) == []


def test_code_file_resolves_against_the_metadata_folder(kernel_dir, monkeypatch, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert kaggle.validate_kernel_metadata(kernel_dir / kaggle.KERNEL_METADATA) == []


def test_offline_competition_policy(kernel_dir):
    path = kernel_dir / kaggle.KERNEL_METADATA
    meta = good_kernel()
    del meta["enable_internet"]  # the CLI's default is internet on
    write_json(path, {**meta, "competition_sources": []})
    assert kaggle.validate_kernel_metadata(path) == []
    problems = kaggle.validate_kernel_metadata(path, offline_competition=COMPETITION)
    assert [p.split(":")[0] for p in problems] == ["competition_sources", "enable_internet"]


def test_unreadable_metadata_files(tmp_path):
    assert "not found" in kaggle.validate_kernel_metadata(tmp_path / "nope.json")[0]
    (tmp_path / "bad.json").write_text("{'id': 1}")
    assert "not valid JSON" in kaggle.validate_kernel_metadata(tmp_path / "bad.json")[0]
    write_json(tmp_path / "list.json", [1, 2])
    assert "JSON object" in kaggle.validate_dataset_metadata(tmp_path / "list.json")[0]


# --------------------------------------------------------------------------- dataset metadata


def test_repository_wheels_metadata_is_valid():
    path = ROOT / "wheels" / kaggle.DATASET_METADATA
    assert kaggle.validate_dataset_metadata(path) == []
    meta = json.loads(path.read_text())
    assert meta["id"] == f"{kaggle.read_user(ROOT)}/{kaggle.WHEELS_SLUG}"


@pytest.mark.parametrize(
    "change, key",
    [
        ({"id": "hubmap-kit-model"}, "id"),
        ({"id": "alice/model"}, "id"),  # slug of 5 characters: the CLI wants 6 to 50
        ({"id": "alice/" + "m" * 51}, "id"),
        ({"id": "alice/HuBMAP-Model"}, "id"),
        ({"title": "Model"}, "title"),  # 5 characters
        ({"title": "M" * 51}, "title"),
        ({"title": 123456}, "title"),
        ({"licenses": []}, "licenses"),
        ({"licenses": [{"name": "CC0-1.0"}, {"name": "MIT"}]}, "licenses"),
        ({"licenses": [{"title": "CC0"}]}, "licenses"),
        ({"licenses": {"name": "CC0-1.0"}}, "licenses"),
        ({"subtitle": "too short"}, "subtitle"),
        ({"resources": [{"path": "best.pt"}]}, "resources"),  # not in the folder
    ],
)
def test_broken_dataset_metadata_is_reported_by_key(tmp_path, change, key):
    good = kaggle.dataset_metadata("alice", "hubmap-kit-model", "HuBMAP kit model")
    path = write_json(tmp_path / kaggle.DATASET_METADATA, good)
    assert kaggle.validate_dataset_metadata(path) == []
    write_json(path, {**good, **change})
    problems = kaggle.validate_dataset_metadata(path)
    assert problems and all(p.startswith(key) for p in problems), problems
    with pytest.raises(ValueError, match=key):
        kaggle.check_dataset_metadata(path)


def test_dataset_resources_must_exist_once(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"x")
    meta = kaggle.dataset_metadata("alice", "hubmap-kit-model", "HuBMAP kit model")
    meta["resources"] = [{"path": "best.pt"}, {"path": "best.pt"}]
    path = write_json(tmp_path / kaggle.DATASET_METADATA, meta)
    assert kaggle.validate_dataset_metadata(path) == ["resources: 'best.pt' listed twice"]


def test_check_lists_every_problem(tmp_path):
    path = write_json(tmp_path / kaggle.DATASET_METADATA, {"id": "x", "title": "y"})
    with pytest.raises(ValueError) as err:
        kaggle.check_dataset_metadata(path)
    assert "id:" in str(err.value) and "title:" in str(err.value) and "licenses:" in str(err.value)


# --------------------------------------------------------------------------- the user's name


def test_user_name_round_trip(tmp_path):
    assert kaggle.read_user(tmp_path) == kaggle.PLACEHOLDER_USER  # nothing recorded yet
    path = kaggle.write_user("  alice-01 \n", tmp_path)
    assert path == tmp_path / kaggle.USER_FILE
    assert kaggle.read_user(tmp_path) == "alice-01"
    assert path.read_text().splitlines()[-1] == "alice-01"
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [kaggle.USER_FILE]  # no temp file left


@pytest.mark.parametrize("name", ["", "a/b", "has space", "-dash", "x" * 51, None])
def test_bad_user_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="user name"):
        kaggle.write_user(name, tmp_path)
    assert not (tmp_path / kaggle.USER_FILE).exists()


def test_user_file_with_two_names_is_refused(tmp_path):
    (tmp_path / kaggle.USER_FILE).write_text("# comment\nalice\nbob\n")
    with pytest.raises(ValueError, match="found 2"):
        kaggle.read_user(tmp_path)


def test_repository_records_one_user_name():
    assert kaggle.validate_user(kaggle.read_user(ROOT)) == kaggle.read_user(ROOT)


def test_with_owner_keeps_other_owners_sources():
    meta = good_kernel(kaggle.PLACEHOLDER_USER)
    meta["dataset_sources"].append("bob/pretrained-resnet")
    meta["kernel_sources"] = ["your-kaggle-username/utility-kernel"]
    out = kaggle.with_owner(meta, "alice")
    assert out["id"] == "alice/hubmap-kit-submission"
    assert out["dataset_sources"] == [
        "alice/hubmap-kit-wheels",
        "alice/hubmap-kit-model",
        "bob/pretrained-resnet",
    ]
    assert out["kernel_sources"] == ["alice/utility-kernel"]
    assert meta["id"].startswith(kaggle.PLACEHOLDER_USER)  # the input is not modified
    again = kaggle.with_owner(out, "carol", previous=["alice"])
    assert again["dataset_sources"][:2] == ["carol/hubmap-kit-wheels", "carol/hubmap-kit-model"]
    assert again["dataset_sources"][2] == "bob/pretrained-resnet"


def test_kaggle_metadata_command_fills_every_file(repo, tmp_path, capsys):
    export = write_json(
        tmp_path / "export" / kaggle.DATASET_METADATA,
        kaggle.dataset_metadata(kaggle.PLACEHOLDER_USER, "hubmap-kit-model", "HuBMAP kit model"),
    ).parent
    kernel = repo / kaggle.KERNEL_METADATA
    meta = json.loads(kernel.read_text())
    write_json(kernel, {**meta, "dataset_sources": meta["dataset_sources"] + ["bob/weights-x"]})

    assert main(["kaggle-metadata", "--root", str(repo), "--user", "alice", str(export)]) == 0
    assert kaggle.read_user(repo) == "alice"
    meta = json.loads(kernel.read_text())
    assert meta["id"] == "alice/hubmap-kit-submission"
    assert meta["dataset_sources"] == [
        "alice/hubmap-kit-wheels",
        "alice/hubmap-kit-model",
        "bob/weights-x",
    ]
    wheel_files = json.loads((repo / "wheels" / kaggle.DATASET_METADATA).read_text())
    assert wheel_files["id"] == "alice/hubmap-kit-wheels"
    assert json.loads((export / kaggle.DATASET_METADATA).read_text())["id"] == (
        "alice/hubmap-kit-model"
    )
    assert "warning" not in capsys.readouterr().out

    # A second name replaces the first everywhere; without --user the recorded one is used.
    assert main(["kaggle-metadata", "--root", str(repo), "--user", "carol"]) == 0
    assert json.loads(kernel.read_text())["dataset_sources"][:2] == [
        "carol/hubmap-kit-wheels",
        "carol/hubmap-kit-model",
    ]
    assert main(["kaggle-metadata", "--root", str(repo), str(export)]) == 0
    assert json.loads((export / kaggle.DATASET_METADATA).read_text())["id"].startswith("carol/")
    assert main(["kaggle-metadata", "--root", str(repo), "--check", str(export)]) == 0


def test_kaggle_metadata_writes_nothing_when_a_file_is_broken(repo, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / kaggle.DATASET_METADATA).write_text("{not json")
    before = {p: p.read_bytes() for p in repo.rglob("*.json")}
    assert main(["kaggle-metadata", "--root", str(repo), "--user", "alice", str(broken)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert kaggle.read_user(repo) == kaggle.PLACEHOLDER_USER
    assert {p: p.read_bytes() for p in repo.rglob("*.json")} == before


def test_check_refuses_the_placeholder_user(repo, capsys):
    assert main(["kaggle-metadata", "--root", str(repo), "--check"]) == 2
    assert "no user name recorded" in capsys.readouterr().err


# --------------------------------------------------------------------------- requirements


def test_every_dependency_is_in_the_image_or_the_wheelhouse():
    """A new dependency in pyproject.toml must be either in the Kaggle image or pinned."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    # The installed kit's metadata: `make test` reinstalls it whenever pyproject.toml changes.
    deps = [Requirement(r) for r in importlib.metadata.requires(wheels.KIT_DISTRIBUTION)]
    pins = {p.key: p for p in wheels.read_requirements(ROOT / "wheels" / "requirements.txt")}
    for dep in (d for d in deps if d.marker is None):  # extras (dev) are not runtime needs
        key = canonicalize_name(dep.name)  # PEP 503, as kit.wheels keys its pins
        if key in pins:
            assert dep.specifier.contains(pins[key].version), (dep, pins[key])
        else:
            assert key in wheels.KAGGLE_IMAGE, f"{dep.name}: neither in the image nor pinned"
    assert {"rasterio", "tifffile"} <= set(pins)


def test_implied_image_packages_are_required_by_documented_ones():
    """KAGGLE_IMAGE_IMPLIED names a documented distribution that cannot be installed without it."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    for name, parent in wheels.KAGGLE_IMAGE_IMPLIED.items():
        assert parent in wheels.KAGGLE_IMAGE_DOCUMENTED, (name, parent)
        required = [Requirement(r) for r in importlib.metadata.requires(parent)]
        unconditional = {canonicalize_name(r.name) for r in required if r.marker is None}
        assert name in unconditional, f"{parent} does not require {name}"


def test_opencv_is_required_by_no_distribution_name_of_the_kits_own():
    """cv2 comes with albumentations; the image may hold it as opencv-python or -contrib, and an
    offline install fails on a requirement named otherwise than the installed distribution."""
    from packaging.requirements import Requirement

    deps = [Requirement(r).name for r in importlib.metadata.requires(wheels.KIT_DISTRIBUTION)]
    assert not [d for d in deps if d.lower().startswith("opencv")], deps
    assert not [d for d in wheels.KAGGLE_IMAGE if d.startswith("opencv")]
    albumentations = [Requirement(r).name for r in importlib.metadata.requires("albumentations")]
    assert any(d.startswith("opencv") for d in albumentations)  # so cv2 is still installed


def test_read_requirements_accepts_only_exact_pins(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\n\nrasterio == 1.4.4  # why\nclick_plugins==1.1.1.2\n")
    assert wheels.read_requirements(path) == [
        wheels.Pin("rasterio", "1.4.4"),
        wheels.Pin("click_plugins", "1.1.1.2"),
    ]
    assert str(wheels.Pin("rasterio", "1.4.4")) == "rasterio==1.4.4"
    path.write_text("rasterio==1.4.4\ntifffile>=2023\n")
    with pytest.raises(ValueError, match=r"requirements.txt:2: 'tifffile>=2023'"):
        wheels.read_requirements(path)
    path.write_text("click-plugins==1.1\nClick_Plugins==1.2\n")
    with pytest.raises(ValueError, match="pinned twice"):
        wheels.read_requirements(path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        wheels.read_requirements(tmp_path / "missing.txt")


def test_pip_target_args():
    args = wheels.pip_target_args("kaggle")
    assert args[:4] == ["--python-version", "3.12", "--implementation", "cp"]
    platforms = set(args[5::2])
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64"} <= platforms
    assert args[4::2] == ["--platform"] * len(platforms)
    assert wheels.pip_target_args("local") == []
    with pytest.raises(ValueError, match="'windows'"):
        wheels.pip_target_args("windows")


# --------------------------------------------------------------------------- wheelhouse (fake pip)

FAKE_PIP = textwrap.dedent(
    """
    import json, os, sys, zipfile
    args = sys.argv[1:]
    def wheel(folder, name, version):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name.replace('-', '_')}-{version}-py3-none-any.whl")
        requires = json.loads(os.environ.get("FAKE_PIP_REQUIRES", "{}")).get(name, [])
        metadata = "".join([f"Name: {name}\\n"] + [f"Requires-Dist: {r}\\n" for r in requires])
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"{name}-{version}.dist-info/METADATA", metadata)
    if args[0] == "wheel":
        wheel(args[args.index("--wheel-dir") + 1], "hubmap_kit", "0.1.0")
    elif args[0] == "download":
        req = args[-1]
        if req.split("==")[0] == os.environ.get("FAKE_PIP_FAIL"):
            print("Looking in indexes: https://user:s3cret@pypi.example/simple", file=sys.stderr)
            print(f"ERROR: No matching distribution found for {req}", file=sys.stderr)
            sys.exit(1)
        if req.split("==")[0] != os.environ.get("FAKE_PIP_NOTHING"):
            wheel(args[args.index("--dest") + 1], *req.split("=="))
    """
)


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Route kit.kaggle's pip calls to a stand-in that writes tiny wheels (no network)."""
    script = tmp_path / "fake_pip.py"
    script.write_text(FAKE_PIP)
    monkeypatch.setattr(wheels, "PIP_COMMAND", (sys.executable, str(script)))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("rasterio==1.4.4\ncligj==0.7.2\n")
    return requirements


def test_build_wheelhouse_replaces_the_wheel_set(fake_pip, tmp_path):
    dest = tmp_path / "wheels"
    dest.mkdir()
    (dest / "rasterio-1.3.0-py3-none-any.whl").write_bytes(b"stale")
    (dest / kaggle.DATASET_METADATA).write_text("{}")
    lines = []
    built = wheels.build_wheelhouse(
        dest, "kaggle", requirements=fake_pip, root=ROOT, log=lines.append
    )
    names = [f"{n}-py3-none-any.whl" for n in ("hubmap_kit-0.1.0", "rasterio-1.4.4", "cligj-0.7.2")]
    assert [w.name for w in built] == names
    assert sorted(p.name for p in dest.iterdir()) == sorted([*names, kaggle.DATASET_METADATA])
    assert len(lines) == 3 and lines[1].strip().startswith("rasterio-1.4.4")


def test_failed_download_names_the_requirement_and_changes_nothing(fake_pip, tmp_path, monkeypatch):
    dest = tmp_path / "wheels"
    dest.mkdir()
    (dest / "old-1.0-py3-none-any.whl").write_bytes(b"old")
    monkeypatch.setenv("FAKE_PIP_FAIL", "cligj")
    with pytest.raises(wheels.WheelError) as err:
        wheels.build_wheelhouse(dest, "local", requirements=fake_pip, root=ROOT)
    message = str(err.value)
    assert "cligj==0.7.2 (target local)" in message
    assert "No matching distribution" in message
    assert "s3cret" not in message  # index credentials are never echoed
    assert [p.name for p in dest.iterdir()] == ["old-1.0-py3-none-any.whl"]


def test_pip_saving_no_wheel_is_an_error(fake_pip, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PIP_NOTHING", "rasterio")
    with pytest.raises(wheels.WheelError, match=r"rasterio==1\.4\.4 \(target kaggle\).*saved \[\]"):
        wheels.build_wheelhouse(tmp_path / "w", "kaggle", requirements=fake_pip, root=ROOT)
    assert list((tmp_path / "w").iterdir()) == []


def test_a_dependency_nobody_ships_stops_the_build(fake_pip, tmp_path, monkeypatch):
    requires = {"cligj": ["click>=4.0", "numpy>=1.24"], "rasterio": ["cligj>=0.8"]}
    monkeypatch.setenv("FAKE_PIP_REQUIRES", json.dumps(requires))
    with pytest.raises(wheels.WheelError) as err:
        wheels.build_wheelhouse(tmp_path / "w", "kaggle", requirements=fake_pip, root=ROOT)
    lines = str(err.value).splitlines()[1:]
    assert lines == [
        "  rasterio-1.4.4-py3-none-any.whl needs cligj>=0.8 (the wheelhouse has 0.7.2; "
        "not in the Kaggle image list)",
        "  cligj-0.7.2-py3-none-any.whl needs click>=4.0 (not in the wheelhouse; "
        "not in the Kaggle image list)",
    ]
    assert list((tmp_path / "w").iterdir()) == []


def write_wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    """A minimal wheel: just its dist-info METADATA."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    metadata = f"Name: {name}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata)
    return path


def test_unmet_dependencies_evaluates_markers_for_the_target(tmp_path):
    wheel_files = [
        write_wheel(tmp_path, "click", "8.5.1"),
        write_wheel(
            tmp_path,
            "rasterio",
            "1.4.4",
            [
                "click!=8.2.*,>=4.0",  # in the set
                "numpy>=1.24",  # in the image
                'pytest; extra == "test"',  # an extra: not installed
                'tomli; python_version < "3.11"',  # not on Kaggle's 3.12
                'pywin32; sys_platform == "win32"',
                "Click>=9",  # too old in the set (names compare normalised)
                "shapely",
            ],
        ),
    ]
    assert wheels.unmet_dependencies(wheel_files, "kaggle") == [
        "rasterio-1.4.4-py3-none-any.whl needs Click>=9 (the wheelhouse has 8.5.1; "
        "not in the Kaggle image list)",
        "rasterio-1.4.4-py3-none-any.whl needs shapely (not in the wheelhouse; "
        "not in the Kaggle image list)",
    ]
    assert wheels.unmet_dependencies(wheel_files[:1], "local") == []


def test_wheels_command_writes_the_dataset_metadata(fake_pip, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["wheels", "--out", str(out), "--target", "both", "--requirements", str(fake_pip)]
    assert main([*args, "--root", str(ROOT)]) == 0
    assert kaggle.validate_dataset_metadata(out / kaggle.DATASET_METADATA) == []
    assert len(list(out.glob("*.whl"))) == 3 and len(list((out / "local").glob("*.whl"))) == 3
    assert "kaggle datasets create -p" in capsys.readouterr().out


# --------------------------------------------------------------------------- model export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run folder with a tiny random model's checkpoints."""
    from kit.checkpoint import checkpoint_dict, save_checkpoint
    from kit.model import build_model

    run = tmp_path_factory.mktemp("run")
    model = build_model("lraspp_mobilenet_v3_large")
    optimizer = torch.optim.AdamW(model.parameters())
    for name, epoch in (("last.pt", 3), ("best.pt", 2)):
        ckpt = checkpoint_dict(
            model,
            {"window": 512, "scale": 4},
            epoch,
            {"dice": 0.8125},
            optimizer_state=optimizer.state_dict(),
        )
        save_checkpoint(run / name, ckpt)
    (run / "config.json").write_text('{"train": {"window": 512}}')
    (run / "history.csv").write_text("epoch,lr\n1,0.001\n")
    return run


def test_export_writes_a_valid_model_dataset(run_dir, tmp_path):
    from kit.checkpoint import load_model

    out = checkpoint.export_model(run_dir, tmp_path / "model", user="alice")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["best.pt", "config.json", kaggle.DATASET_METADATA, "history.csv"]
    assert kaggle.validate_dataset_metadata(out / kaggle.DATASET_METADATA) == []
    meta = json.loads((out / kaggle.DATASET_METADATA).read_text())
    assert meta["id"] == "alice/hubmap-kit-model"
    assert meta["licenses"] == [{"name": "CC0-1.0"}]
    assert "epoch 2" in meta["description"]
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert "optimizer_state" not in ckpt and ckpt["epoch"] == 2
    model, _ = load_model(out / "best.pt")
    original = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original["model_state"][key]), key
    assert (out / "history.csv").read_bytes() == (run_dir / "history.csv").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_export_last_with_training_state_replaces_a_previous_export(run_dir, tmp_path):
    out = tmp_path / "model"
    checkpoint.export_model(run_dir, out, user="alice")
    checkpoint.export_model(
        run_dir, out, which="last", user="bob", slug="glom-last", keep_training_state=True
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        kaggle.DATASET_METADATA,
        "history.csv",
        "last.pt",
    ]
    assert (out / "last.pt").read_bytes() == (run_dir / "last.pt").read_bytes()
    assert json.loads((out / kaggle.DATASET_METADATA).read_text())["id"] == "bob/glom-last"


def test_export_refuses_bad_input(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.export_model(tmp_path / "nowhere", tmp_path / "m", user="alice")
    with pytest.raises(ValueError, match="which"):
        checkpoint.export_model(run_dir, tmp_path / "m", which="final", user="alice")
    with pytest.raises(ValueError, match="id: slug 'model'"):
        checkpoint.export_model(run_dir, tmp_path / "m", user="alice", slug="model")
    with pytest.raises(ValueError, match="title"):
        checkpoint.export_model(run_dir, tmp_path / "m", user="alice", title="Model")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a previous export"):
        checkpoint.export_model(run_dir, busy, user="alice")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]

    bad_run = tmp_path / "bad_run"
    bad_run.mkdir()
    (bad_run / "best.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="best.pt"):
        checkpoint.export_model(bad_run, tmp_path / "m", user="alice")
    with pytest.raises(FileNotFoundError, match="last.pt"):
        checkpoint.export_model(bad_run, tmp_path / "m", which="last", user="alice")
    torch.save({"format": "other", "weights": torch.zeros(2)}, bad_run / "best.pt")
    with pytest.raises(ValueError, match="not a kit checkpoint"):
        checkpoint.export_model(bad_run, tmp_path / "m", user="alice")
    assert not (tmp_path / "m").exists()


def test_export_command_uses_the_recorded_user(run_dir, repo, tmp_path, capsys):
    kaggle.write_user("alice", repo)
    out = tmp_path / "model"
    assert main(["export", "--run", str(run_dir), "--out", str(out), "--root", str(repo)]) == 0
    assert json.loads((out / kaggle.DATASET_METADATA).read_text())["id"] == (
        "alice/hubmap-kit-model"
    )
    printed = capsys.readouterr().out
    assert "does not attach alice/hubmap-kit-model" in printed  # kernel still names the old owner
    assert main(["kaggle-metadata", "--root", str(repo), str(out)]) == 0
    capsys.readouterr()
    assert main(["export", "--run", str(run_dir), "--out", str(out), "--root", str(repo)]) == 0
    assert "warning" not in capsys.readouterr().out
