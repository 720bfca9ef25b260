"""Proof that the submission notebook runs on Kaggle without internet, from the wheelhouse alone.

Built once per test session (1) and once per test (2, 3):

1. the wheelhouse for this interpreter (``kit.wheels.build_wheelhouse(target="local")``): the
   kit's own wheel and wheels/requirements.txt, nothing else;
2. a stand-in for the Kaggle image: a fresh virtual environment whose site-packages holds a
   ``.pth`` line naming a folder of symlinks to the development venv's site-packages (torch,
   numpy, pandas, albumentations, opencv, ipykernel... as the image preinstalls them) without the
   kit (its editable finder and its dist-info, so pip does not think it installed) and without
   rasterio, tifffile, segmentation_models_pytorch and the small dependencies of both, so only
   the wheelhouse can supply them;
3. a network guard in that venv (a ``.pth`` import hook, run by every Python process there) that
   refuses every non-loopback ``connect``/``getaddrinfo``/``sendto`` and records it to a file.

Each test lays out ``<tmp>/kaggle/input/{competition, <model slug>, <wheels slug>}`` and
``<tmp>/kaggle/working`` (handed to the notebook as ``$KAGGLE_INPUT`` / ``$KAGGLE_WORKING``),
then executes the notebook with nbclient under the venv's Python, inside ``unshare -n`` (a
network namespace with no interface up) where that is permitted, with the guard in any case.
The kernel talks to nbclient over ipc sockets, so it needs no network either.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from packaging.utils import canonicalize_name

from kit import kaggle, wheels
from kit.env import COMPETITION

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "03_submission.ipynb"

# Kept out of the Kaggle-image venv: the kit (editable install) and what the wheelhouse must bring.
HIDDEN = (
    "hubmap_kit",
    "kit",
    "rasterio",
    "tifffile",
    "affine",
    "cligj",
    "click",
    "click_plugins",
    "certifi",
    # segmentation_models_pytorch and what it brings (wheels/requirements.txt)
    "segmentation_models_pytorch",
    "timm",
    "safetensors",
    "huggingface_hub",
    "hf_xet",
    "requests",
    "urllib3",
    "idna",
    "charset_normalizer",
)
# Shipped modules the notebook must import from the wheels (a U-Net checkpoint needs smp's).
SHIPPED = ("kit", "rasterio", "tifffile", "segmentation_models_pytorch", "timm", "safetensors")

GUARD = '''
"""Offline-test network guard: refuse and record every non-loopback network attempt."""
import errno, ipaddress, os, socket, traceback

_LOG = os.environ.get("KIT_NET_LOG")
_OWN = {"localhost", "127.0.0.1", "::1", "", None, socket.gethostname()}


def _record(what, target):
    if _LOG:
        stack = "".join(traceback.format_stack(limit=30)[:-2])
        with open(_LOG, "a") as f:
            f.write(f"pid {os.getpid()} {what} {target!r}\\n{stack}\\n")


def _local(address):
    if not isinstance(address, tuple):  # AF_UNIX path or abstract name
        return True
    host = address[0]
    return host in _OWN or str(host).startswith("127.")


def _guard(name):
    original = getattr(socket.socket, name)

    def guarded(self, address, *args):
        target = args[-1] if name == "sendto" else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(target):
            _record(name, target)
            raise OSError(errno.ENETUNREACH, f"network disabled by the offline test ({name})")
        return original(self, address, *args)

    setattr(socket.socket, name, guarded)


for _name in ("connect", "connect_ex", "sendto"):
    _guard(_name)

_getaddrinfo = socket.getaddrinfo


def _numeric(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _guarded_getaddrinfo(host, *args, **kwargs):
    host_text = host.decode() if isinstance(host, bytes) else host
    # A numeric address needs no lookup: connect() decides about it.
    if host_text not in _OWN and not _numeric(host_text):
        _record("getaddrinfo", host_text)
        raise socket.gaierror(socket.EAI_NONAME, "network disabled by the offline test")
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _guarded_getaddrinfo
'''

RUNNER = '''
"""Execute a notebook with nbclient; the kernel is this interpreter, over ipc sockets."""
import sys

import nbformat
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

source, executed, cwd, ipc, timeout = sys.argv[1:6]
nb = nbformat.read(source, as_version=4)
km = KernelManager(kernel_name="python3", transport="ipc", ip=ipc)
client = NotebookClient(nb, km=km, timeout=int(timeout), resources={"metadata": {"path": cwd}})
try:
    client.execute()
finally:
    nbformat.write(nb, executed)
'''


def run(args, *, env=None, cwd=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with the tail of its output."""
    proc = subprocess.run(
        [str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"{args[:4]}... exited with {proc.returncode}:\n{output}")
    return proc


def stdout_of(cell: nbformat.NotebookNode) -> str:
    """Everything an executed cell printed to stdout.

    The kernel sends prints as they are flushed: one ``print`` after another may arrive as one
    stream output or as several, depending on timing, so all of them are joined.
    """
    return "".join(
        out["text"]
        for out in cell.get("outputs", [])
        if out["output_type"] == "stream" and out["name"] == "stdout"
    )


def network_cut_prefix() -> list[str]:
    """``unshare -n`` where this process may create a network namespace, else nothing."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


# --------------------------------------------------------------------------- session fixtures


@pytest.fixture(scope="session")
def local_wheelhouse(tmp_path_factory) -> Path:
    """The kit + wheels/requirements.txt as wheels for this interpreter (built once)."""
    dest = tmp_path_factory.mktemp("wheelhouse")
    wheels.build_wheelhouse(dest, "local", root=ROOT)
    return dest


@pytest.fixture
def image_venv(tmp_path_factory) -> Path:
    """A fresh venv seeing the development venv's packages, minus the kit and HIDDEN ones.

    One per test (a few seconds): a notebook run installs the kit into it, and the next run
    must start without (the notebook test runs once per model)."""
    base = tmp_path_factory.mktemp("image")
    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    where = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    site = Path(where.stdout.strip())
    # The development venv's site-packages, found from this interpreter, not hard-coded.
    dev_site = Path(sysconfig.get_paths(vars={"base": sys.prefix})["purelib"])
    farm = base / "image-site-packages"
    farm.mkdir()
    for entry in dev_site.iterdir():
        if entry.suffix != ".pth" and not _hidden(entry.name):
            (farm / entry.name).symlink_to(entry)
    # A plain path line: the folder joins sys.path, but its own .pth files are not processed.
    (site / "kaggle_image.pth").write_text(f"{farm}\n")
    (site / "_kit_netguard.py").write_text(GUARD)
    (site / "_kit_netguard.pth").write_text("import _kit_netguard\n")
    kernels = base / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Kaggle image stand-in",
                "language": "python",
            }
        )
    )
    (base / "run_notebook.py").write_text(RUNNER)
    # `!pip install ...` in a notebook cell must reach this venv's pip, as on Kaggle.
    pip = venv / "bin" / "pip"
    pip.write_text(f'#!/bin/sh\nexec "{python}" -m pip "$@"\n')
    pip.chmod(0o755)
    return venv


def _hidden(name: str) -> bool:
    stem = name.split("-")[0].split(".")[0].lower()
    return name.startswith("__editable__") or stem in HIDDEN


# --------------------------------------------------------------------------- the Kaggle stand-in


class KaggleStandIn:
    """The /kaggle folders, the venv and the environment a notebook run gets."""

    def __init__(self, tmp: Path, venv: Path) -> None:
        self.venv, self.python = venv, venv / "bin" / "python"
        self.base = venv.parent
        self.input = tmp / "kaggle" / "input"
        self.working = tmp / "kaggle" / "working"
        self.net_log = tmp / "network-attempts.log"
        self.prefix = network_cut_prefix()
        home = tmp / "home"
        for folder in (self.input, self.working, home, tmp / "runtime"):
            folder.mkdir(parents=True, exist_ok=True)
        self.ipc = tmp / "runtime" / "kernel-ipc"
        self.env = {
            "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "KAGGLE_INPUT": str(self.input),
            "KAGGLE_WORKING": str(self.working),
            "KAGGLE_KERNEL_RUN_TYPE": "Batch",
            "KIT_NET_LOG": str(self.net_log),
            # Only the wheelhouse may feed pip: no config file, no find-links or index from here.
            "PIP_CONFIG_FILE": os.devnull,
            "PYTHONNOUSERSITE": "1",
            "JUPYTER_PATH": str(self.base / "jupyter"),
            "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
            "JUPYTER_DATA_DIR": str(home / "jupyter"),
            "IPYTHONDIR": str(home / "ipython"),
            "MPLBACKEND": "Agg",
            "MPLCONFIGDIR": str(home / "mpl"),
            "TORCH_HOME": str(home / "torch"),
            "HUBMAP_KIT_CACHE": str(home / "kit-cache"),
        }

    def python_run(self, code: str, **kwargs) -> subprocess.CompletedProcess:
        """Run Python code in the venv, network cut."""
        args = [*self.prefix, self.python, "-c", code]
        return run(args, env=self.env, cwd=self.working, **kwargs)

    def pip(self, *args) -> subprocess.CompletedProcess:
        """Run the venv's pip, network cut."""
        return run([*self.prefix, self.python, "-m", "pip", *args], env=self.env, cwd=self.working)

    def find_spec(self, module: str) -> str | None:
        """Where the venv would import `module` from (None: not importable)."""
        code = f"import importlib.util as u; s = u.find_spec({module!r}); print(s and s.origin)"
        origin = self.python_run(code).stdout.strip()
        return None if origin == "None" else origin

    def execute(self, notebook: Path, timeout: int = 900) -> nbformat.NotebookNode:
        """Execute `notebook` as Kaggle would (cwd /kaggle/working, network cut); return it."""
        executed = self.working.parent / f"executed-{notebook.name}"
        runner = self.base / "run_notebook.py"
        args = [runner, notebook, executed, self.working, self.ipc, timeout]
        run(
            [*self.prefix, self.python, *args], env=self.env, cwd=self.working, timeout=timeout + 60
        )
        return nbformat.read(executed, as_version=4)

    def network_attempts(self) -> str:
        return self.net_log.read_text() if self.net_log.exists() else ""


@pytest.fixture
def kaggle_stand_in(tmp_path, image_venv) -> KaggleStandIn:
    return KaggleStandIn(tmp_path, image_venv)


def dataset_slugs() -> tuple[str, str]:
    """(wheels slug, model slug): the datasets kernel-metadata.json attaches."""
    sources = json.loads((ROOT / kaggle.KERNEL_METADATA).read_text())["dataset_sources"]
    wheels_id = json.loads((ROOT / "wheels" / kaggle.DATASET_METADATA).read_text())["id"]
    assert wheels_id in sources, f"kernel-metadata.json does not attach {wheels_id}"
    others = [s for s in sources if s != wheels_id]
    assert len(others) == 1, f"expected one model dataset besides the wheels, got {others}"
    return wheels_id.split("/")[1], others[0].split("/")[1]


def lay_out_inputs(stand_in: KaggleStandIn, wheelhouse: Path, tmp: Path, model_name: str) -> Path:
    """Competition data, the model dataset (a random `model_name`) and the wheels dataset under
    the input root."""
    from kit.checkpoint import checkpoint_dict, export_model, save_checkpoint
    from kit.model import build_model
    from kit.synthetic import make_dataset
    from kit.train import preset

    wheels_slug, model_slug = dataset_slugs()
    data = make_dataset(stand_in.input / COMPETITION, slides=3, test_slides=2, size=(1024, 1280))
    run_dir = tmp / "run"
    model = build_model(model_name)  # random weights
    ckpt = checkpoint_dict(model, preset("quick"), epoch=1, metrics={"dice": 0.5})
    save_checkpoint(run_dir / "best.pt", ckpt)
    (run_dir / "config.json").write_text(json.dumps({"train": ckpt["config"]}))
    export_model(run_dir, stand_in.input / model_slug, user="kit-offline-test")
    shutil.copytree(wheelhouse, stand_in.input / wheels_slug)
    return data


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_image_venv_lacks_the_kit_and_the_shipped_packages(kaggle_stand_in, local_wheelhouse):
    """Before anything is installed: no kit, no rasterio/tifffile; torch & co. are there; and
    the wheelhouse alone resolves the kit's whole install, offline."""
    for module in (*SHIPPED, "affine", "cligj", "huggingface_hub", "requests"):
        assert kaggle_stand_in.find_spec(module) is None, module
    for module in ("torch", "torchvision", "numpy", "pandas", "albumentations", "cv2", "ipykernel"):
        assert kaggle_stand_in.find_spec(module) is not None, module
    proc = kaggle_stand_in.pip(
        "install", "--dry-run", "--no-index", "--find-links", local_wheelhouse, "hubmap-kit"
    )
    # "name-version" each, the name as the wheel spells it (hubmap-kit, huggingface_hub)
    would = proc.stdout.split("Would install", 1)[-1].split()
    would = {canonicalize_name(w.rsplit("-", 1)[0]) for w in would}
    for name in (
        *("hubmap-kit", "rasterio", "tifffile", "affine", "cligj", "click-plugins"),
        *("segmentation-models-pytorch", "timm", "safetensors", "huggingface-hub", "requests"),
    ):
        assert name in would, (name, proc.stdout)
    assert kaggle_stand_in.network_attempts() == ""


def test_stdout_of_joins_every_stream_output():
    """Two prints may arrive as two stream outputs, with stderr and rich output in between."""
    out = nbformat.v4.new_output
    cell = nbformat.v4.new_code_cell("print(1); print(2)")
    cell.outputs = [
        out("stream", name="stdout", text="refused: a\n"),
        out("stream", name="stderr", text="refused: (a warning)\n"),
        out("display_data", data={"text/plain": "refused: (a repr)"}),
        out("stream", name="stdout", text="refused: b\n"),
    ]
    assert stdout_of(cell) == "refused: a\nrefused: b\n"
    assert stdout_of(nbformat.v4.new_markdown_cell("no outputs")) == ""


def test_network_guard_records_attempts(kaggle_stand_in, tmp_path):
    """The check that no connection was attempted can fail: an attempt is caught and logged."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            textwrap.dedent(
                """
                import socket, urllib.request
                for attempt in (lambda: socket.create_connection(("203.0.113.7", 443), timeout=2),
                                lambda: urllib.request.urlopen("https://pypi.org", timeout=2)):
                    try:
                        attempt()
                    except OSError as err:
                        print("refused:", err)
                    else:
                        raise AssertionError("a connection went through")
                """
            )
        )
    ]
    path = tmp_path / "connects.ipynb"
    nbformat.write(nb, path)
    executed = kaggle_stand_in.execute(path, timeout=120)
    assert stdout_of(executed.cells[0]).count("refused:") == 2
    attempts = kaggle_stand_in.network_attempts()
    assert "connect ('203.0.113.7', 443)" in attempts and "getaddrinfo 'pypi.org'" in attempts


def _missing_notebook() -> str:
    paired = " (its .py is there: run `make sync`)" if NOTEBOOK.with_suffix(".py").is_file() else ""
    return f"{NOTEBOOK.relative_to(ROOT)} is missing{paired}"


# Skipped only while the notebook does not exist (decided before the fixtures build anything).
@pytest.mark.skipif(not NOTEBOOK.is_file(), reason=_missing_notebook())
@pytest.mark.slow
# LRASPP-MobileNetV3 is small and quick on a CPU; unet_resnet18 is the smallest smp U-Net whose
# encoder takes torchvision's files, and needs smp, timm and huggingface-hub from the wheels.
@pytest.mark.parametrize("model_name", ["lraspp_mobilenet_v3_large", "unet_resnet18"])
def test_submission_notebook_runs_offline(kaggle_stand_in, local_wheelhouse, tmp_path, model_name):
    """notebooks/03_submission.ipynb on the Kaggle layout: installs the kit from the wheels
    dataset, predicts the test slides, writes a valid submission.csv, never touches the network."""
    run_offline(kaggle_stand_in, NOTEBOOK, local_wheelhouse, tmp_path, model_name)


def run_offline(
    stand_in: KaggleStandIn, notebook: Path, wheelhouse: Path, tmp: Path, model_name: str
) -> None:
    """Lay out the inputs, execute `notebook` offline, check what it installed and wrote."""
    from kit.submit import check_submission

    data = lay_out_inputs(stand_in, wheelhouse, tmp, model_name)
    assert stand_in.find_spec("kit") is None
    stand_in.execute(notebook)

    # The kit and the shipped packages now come from the venv itself: installed from the wheels.
    venv_site = str(stand_in.venv)
    for module in SHIPPED:
        origin = stand_in.find_spec(module)
        assert origin is not None and origin.startswith(venv_site), (module, origin)
    submission = stand_in.working / "submission.csv"
    check_submission(submission, data)
    ids = pd.read_csv(submission)["id"].tolist()
    assert ids == pd.read_csv(data / "sample_submission.csv")["id"].tolist()
    attempts = stand_in.network_attempts()
    assert attempts == "", f"the notebook tried to reach the network:\n{attempts}"
