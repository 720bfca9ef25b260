"""The GPU path in one run: training and resuming across precisions, where inference time goes,
training throughput.

Run from the repository root, with the kit's environment, on a machine with a CUDA GPU (about 5
minutes on an H200 by estimate, under 8; not yet measured: the timings below are estimates)::

    python bench/gpu.py --out $OUT
    python bench/gpu.py --out $OUT --sections b        # one section again
    python bench/gpu.py --cpu-dry-run --out /tmp/dry   # every code path at toy sizes on the CPU

Without CUDA (and without ``--cpu-dry-run``) it prints one line and exits 0. Each section (and
each part of (b)) runs on its own: a failure prints its traceback and the run goes on. Results are
printed as they come and land in ``--out`` (default ``$OUT``, else a temporary folder):
``gpu.txt`` (everything printed) and ``gpu.json`` (the numbers, rewritten after each part).
Datasets, runs and tile caches go to ``--work`` (default a temporary folder); the synthetic TIFFs
to bench/predict.py's cache (``$TMPDIR/kit-bench``).

(a) CUDA smoke and parity (~1 min). The ``quick`` preset on the embedded mini synthetic dataset
    (`kit.synthetic.default_dataset`), twice: once in bf16 (native on Ampere and newer) and once
    in fp16 as on a T4, mimicked by making ``torch.cuda.get_device_capability`` report (7, 5)
    inside this script only (`kit.device.amp_dtype` then picks fp16 and the run uses a gradient
    scaler). Each run is a 3-epoch run that crashes at the start of epoch 3 (the bench raises
    from `kit.train.train_one_epoch`); the same command is then run again in the other
    precision and resumes from last.pt: the scaler state is loaded only when there is one.
    Then one held-out slide's whole-slide Dice (`kit.evaluate.evaluate_slides`) with each run's
    last.pt (`kit.checkpoint.load_model`) on CUDA (autocast bf16, autocast fp16, no autocast)
    and on the CPU; the target is |CUDA - CPU| <= 1e-3.
(b) Where inference time goes (~2 min), with the process held to 16 GB of GPU memory
    (``torch.cuda.set_per_process_memory_fraction``) as on a T4; the GPU is still an H200, so
    ratios carry over to a T4, absolute times do not (nor bf16's: a T4 emulates it). Three
    parts on a 6144 px synthetic slide (bench/predict.py's ``slide_path`` / ``layout_path``),
    windows of 1024 px seen at 256 px, overlap 256 (the ``full`` preset's):
    - reader: a `kit.windows.Splitter` iterated alone over the slide in each TIFF layout
      (Mpx/s, windows/s, ratio to tiled zlib RGB);
    - model: fcn_resnet50 and lraspp_mobilenet_v3_large (random init) alone on 256 px input,
      batch 8/32/64, autocast fp16 and bf16, channels_last off and on: windows/s and
      ``torch.cuda.max_memory_allocated``;
    - end to end: `kit.infer.predict_slide_rle` with fcn_resnet50, TTA off and on, inference
      batch 8, 16 (InferConfig's default) and 32 (Mpx/s), and the GPU's idle share: the
      model's calls timed between ``torch.cuda.synchronize`` calls (a wrapping predictor)
      against the wall time.
(c) Training throughput (~1 min): the quick preset's model stepped by `kit.train.train_one_epoch`
    (bf16 autocast, AdamW, warmup + cosine) on the mini dataset's tile cache, batch 16 and 32,
    scale 4 and 2 (the preset's 256 px windows: 64 and 128 px tiles), DataLoader workers 0, 2
    and 4: tiles/s over 50 steps after 10 warm-up steps, and the peak GPU memory allocated.

The dry run (``--cpu-dry-run``, ~30 s on 2 busy cores with ``OMP_NUM_THREADS=1``) runs the
same code at toy sizes: a 4-slide dataset of 512 x 640 px slides, 1 epoch before the crash,
batch 2, a 1024 px slide, lraspp alone at 64 px; its numbers mean nothing (on the CPU kit uses
no autocast, so both precisions are fp32 there).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's kit, not an install

# bench/predict.py (this script's folder is on sys.path): its synthetic slide and TIFF layouts.
from predict import LAYOUTS, layout_path, slide_path  # noqa: E402

import kit  # noqa: E402
import kit.train  # noqa: E402
from kit import atomic  # noqa: E402
from kit.checkpoint import load_model, read_checkpoint  # noqa: E402
from kit.data import TileDataset, seed_worker, train_transforms  # noqa: E402
from kit.device import amp_dtype, has_kernels  # noqa: E402
from kit.evaluate import evaluate_slides  # noqa: E402
from kit.infer import InferConfig, config_from_checkpoint, predict_slide_rle  # noqa: E402
from kit.losses import BCEDiceLoss  # noqa: E402
from kit.model import build_model  # noqa: E402
from kit.slides import Slide  # noqa: E402
from kit.synthetic import default_dataset, make_dataset  # noqa: E402
from kit.train import fit, preset, split, tile_caches, train_one_epoch, warmup_cosine  # noqa: E402
from kit.windows import Splitter  # noqa: E402

T4_CAPABILITY = (7, 5)
T4_MEMORY = 16 * 10**9  # bytes: the T4's 16 GB
DICE_TOLERANCE = 1e-3
GiB = 2**30


@dataclass(frozen=True)
class Sizes:
    """What the sections run on: the GPU run's sizes, or the dry run's toy ones."""

    epochs: int  # (a) epochs before the simulated crash; the resumed run adds one
    train_batch: int | None  # (a) training batch (None: the quick preset's)
    slide: int  # (b) side of the synthetic slide (px)
    window: int  # (b) inference window (px), seen at window // scale
    scale: int
    overlap: int
    repeat: int  # (b) reader and end to end: best of this many runs
    models: tuple[str, ...]  # (b) model alone
    e2e_model: str  # (b) end to end
    model_input: int  # (b) model alone: side of the input (px)
    model_batches: tuple[int, ...]
    min_seconds: float  # (b) model alone: each setting timed for at least this long
    infer_batches: tuple[int, ...]  # (b) end to end
    train_batches: tuple[int, ...]  # (c)
    train_scales: tuple[int, ...]
    train_workers: tuple[int, ...]
    warmup_steps: int
    steps: int


GPU_SIZES = Sizes(
    epochs=2, train_batch=None, slide=6144, window=1024, scale=4, overlap=256, repeat=2,
    models=("fcn_resnet50", "lraspp_mobilenet_v3_large"), e2e_model="fcn_resnet50",
    model_input=256, model_batches=(8, 32, 64), min_seconds=0.5, infer_batches=(8, 16, 32),
    train_batches=(16, 32), train_scales=(4, 2), train_workers=(0, 2, 4), warmup_steps=10,
    steps=50,
)  # fmt: skip
DRY_SIZES = Sizes(
    epochs=1, train_batch=2, slide=1024, window=512, scale=4, overlap=128, repeat=1,
    models=("lraspp_mobilenet_v3_large",), e2e_model="lraspp_mobilenet_v3_large",
    model_input=64, model_batches=(2,), min_seconds=0.0, infer_batches=(2,),
    train_batches=(2,), train_scales=(4, 2), train_workers=(0, 2, 4), warmup_steps=1, steps=2,
)  # fmt: skip


@dataclass
class Bench:
    """The run's settings, scratch folders and results (saved to ``out/gpu.json``)."""

    device: torch.device
    sizes: Sizes
    out: Path
    work: Path
    cache: Path  # bench/predict.py's TIFF cache
    dry: bool
    results: dict = field(default_factory=dict)
    _dataset: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def dataset(self) -> Path:
        """The mini synthetic dataset (the dry run: 4 slides of 512 x 640 px), built once."""
        if self._dataset is None:
            if self.dry:
                target = self.work / "tiny-dataset"
                self._dataset = (
                    target
                    if target.exists()
                    else make_dataset(target, slides=4, test_slides=1, size=(512, 640), patients=2)
                )
            else:
                self._dataset = default_dataset()
        return self._dataset

    def save(self) -> None:
        text = json.dumps(self.results, indent=1, default=str)
        atomic.write_text(self.out / "gpu.json", text)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        """Peak bytes allocated on the GPU since `reset_peak` (None on the CPU)."""
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None


def say(text: str = "") -> None:
    print(text, flush=True)


def gib(nbytes: int | None) -> str:
    return "n/a (CPU)" if nbytes is None else f"{nbytes / GiB:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# (a) CUDA smoke and parity


class SimulatedCrash(Exception):
    """Raised by the bench at the start of an epoch, as a killed job would stop."""


@contextlib.contextmanager
def crash_at_epoch(epoch: int):
    """Make `kit.train.fit` stop at the start of its ``epoch``-th epoch (counted from 1)."""
    real, calls = kit.train.train_one_epoch, []

    def stepping(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise SimulatedCrash(f"simulated crash at the start of epoch {epoch}")
        return real(*args, **kwargs)

    with mock.patch.object(kit.train, "train_one_epoch", stepping):
        yield


@contextlib.contextmanager
def precision(name: str):
    """``"bf16"``: the GPU as it is; ``"fp16"``: a T4's compute capability, as kit.device sees
    it (torch.cuda.get_device_capability patched within this script only)."""
    if name == "bf16":
        yield
        return
    with mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: T4_CAPABILITY):
        yield


def autocast(bench: Bench, name: str) -> str:
    """The autocast dtype `kit.device.amp_dtype` picks under `precision` ``name``, as last.pt
    records it (``torch.bfloat16``, ``torch.float16``, ``None``)."""
    with precision(name):
        return str(amp_dtype(bench.device))


def last_state(run: Path) -> dict:
    """What last.pt says about the precision it was written in."""
    ckpt = read_checkpoint(run / "last.pt")
    return {
        "epoch": ckpt["epoch"],
        "amp_dtype": ckpt.get("amp_dtype"),
        "scaler_state": bool(ckpt.get("scaler_state")),
        "train_loss": ckpt["metrics"]["train_loss"],
    }


def smoke(bench: Bench, record: dict) -> None:
    data = bench.dataset()
    if bench.cuda:
        arch = torch.cuda.get_arch_list()
        if not has_kernels(T4_CAPABILITY, arch):  # check_gpu would refuse the mimicked T4
            say(f"  note: this torch has no sm_75 kernels ({' '.join(arch)}): fp16 runs may fail")
    say(
        f"  dataset {data}; fp16 mimics a T4: torch.cuda.get_device_capability patched to "
        f"report {T4_CAPABILITY} within this script, so kit.device.amp_dtype picks fp16"
    )
    runs = {}
    for first, second in (("bf16", "fp16"), ("fp16", "bf16")):
        name = f"{first}-then-{second}"
        entry = record.setdefault(name, {})
        runs[name] = crash_and_resume(bench, data, bench.work / "a" / name, first, second, entry)
        bench.save()
    say(
        f"\n  parity: one held-out slide's whole-slide Dice, each run's last.pt "
        f"(target |{bench.device.type} - CPU| <= {DICE_TOLERANCE:g})"
    )
    for name, (path, slide_id) in runs.items():
        record[name]["parity"] = parity(bench, data, path, slide_id)
    if bench.cuda:
        say("  (no autocast on CUDA: convolutions in TF32 when torch.backends.cudnn.allow_tf32)")


def crash_and_resume(
    bench: Bench, data: Path, run: Path, first: str, second: str, entry: dict
) -> tuple[Path, str]:
    """A quick-preset run in precision ``first`` that crashes before its last epoch, then the
    same command in ``second``; returns (its last.pt, its first held-out slide)."""
    crash = bench.sizes.epochs + 1
    batch = {"batch_size": bench.sizes.train_batch} if bench.sizes.train_batch else {}
    shutil.rmtree(run, ignore_errors=True)  # a --work reused: start the run afresh
    cfg = preset(
        "quick",
        data_dir=str(data),
        out=str(run),
        cache_dir=str(run.parent / "tiles"),
        epochs=crash,
        device=str(bench.device),
        progress=False,
        **batch,
    )
    expected = autocast(bench, second)
    say(
        f"\n  run {run.name}: {first} (autocast {autocast(bench, first)}) for "
        f"{bench.sizes.epochs} epoch(s), crash, resume in {second} (autocast {expected}) for "
        f"epoch {crash}"
    )
    t0 = time.perf_counter()
    with precision(first), crash_at_epoch(crash):
        try:
            fit(cfg)
        except SimulatedCrash as crashed:
            say(f"  {crashed}")
    b = entry["before_crash"] = last_state(run)
    with precision(second):
        result = fit(cfg)
    r = entry["resumed"] = last_state(run)
    entry |= {
        "seconds": round(time.perf_counter() - t0, 1),
        "valid_ids": result["valid_ids"],
        "slide_dice": result["best_dice"],
        # the last epoch ran, in the new precision, to a finite loss (NaN != NaN)
        "resume_ok": r["epoch"] == crash
        and r["amp_dtype"] == expected
        and r["train_loss"] == r["train_loss"],
    }
    say(
        f"  last.pt before the crash: epoch {b['epoch']}, amp {b['amp_dtype']}, scaler state "
        f"{'saved' if b['scaler_state'] else 'empty'}; after the resume: epoch {r['epoch']}, "
        f"amp {r['amp_dtype']}, scaler state {'saved' if r['scaler_state'] else 'empty'}, "
        f"loss {r['train_loss']:.4f}: resume {'OK' if entry['resume_ok'] else 'FAILED'} "
        f"({entry['seconds']:.0f} s)"
    )
    return run / "last.pt", result["valid_ids"][0]


def parity(bench: Bench, data: Path, path: Path, slide_id: str) -> dict:
    """One slide's whole-slide Dice with ``path`` on the CPU and on the device, three ways."""
    cpu = slide_dice(path, "cpu", data, slide_id)
    say(f"  {path.parent.name}, slide {slide_id}: cpu {cpu:.6f}")
    entry = {"slide": slide_id, "cpu": cpu}
    for name, amp in (("bf16", None), ("fp16", None), ("bf16", False)):
        dtype = autocast(bench, name) if amp is None else "None"
        label = "no autocast" if dtype == "None" else f"autocast {dtype.removeprefix('torch.')}"
        if label in entry:  # on the CPU all three are the same
            continue
        with precision(name):
            dice = slide_dice(path, bench.device, data, slide_id, amp)
        diff = abs(dice - cpu)
        entry[label] = {"dice": dice, "diff": diff, "within": diff <= DICE_TOLERANCE}
        say(
            f"    {bench.device.type} {label:16s} {dice:.6f}  |diff| {diff:.2e}  "
            f"{'within' if diff <= DICE_TOLERANCE else 'OUTSIDE'} {DICE_TOLERANCE:g}"
        )
    return entry


def slide_dice(path: Path, device, data: Path, slide_id: str, amp: bool | None = None) -> float:
    model, ckpt = load_model(path, device)
    cfg = config_from_checkpoint(ckpt, amp=amp)  # amp None: on for CUDA
    table = evaluate_slides(data, model, [slide_id], cfg, thresholds=(), progress=False)
    return float(table["dice"].iloc[0])


# ---------------------------------------------------------------------------------------------
# (b) Where inference time goes


@contextlib.contextmanager
def t4_memory(bench: Bench):
    """Hold this process to a T4's 16 GB of GPU memory while the block runs."""
    if not bench.cuda:
        say("  (no CUDA: no memory cap)")
        yield
        return
    torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(bench.device)
    fraction = min(1.0, T4_MEMORY / props.total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, bench.device)
    say(
        f"  GPU memory held to {fraction:.3f} of {props.total_memory / GiB:.0f} GiB "
        f"({T4_MEMORY / 1e9:.0f} GB) as on a T4, but this is still a {props.name}: ratios carry "
        "over to a T4, absolute times do not (nor bf16's: a T4 emulates it)"
    )
    try:
        yield
    finally:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, bench.device)


def infer_config(bench: Bench, **overrides) -> InferConfig:
    s = bench.sizes
    return InferConfig(window=s.window, overlap=s.overlap, scale=s.scale, **overrides)


def reader(bench: Bench, record: dict) -> None:
    s = bench.sizes
    t0 = time.perf_counter()
    paths = {name: layout_path(bench.cache, s.slide, name) for name in LAYOUTS}
    say(f"  slides ready in {time.perf_counter() - t0:.0f} s (cached in {bench.cache})")
    say(
        f"  slide {s.slide} x {s.slide}, window {s.window} seen at {s.window // s.scale} px, "
        f"overlap {s.overlap}, tissue-free tiles skipped, best of {s.repeat}"
    )
    best = dict.fromkeys(paths, float("inf"))
    windows = {}
    for _ in range(s.repeat):
        for name, path in paths.items():
            t0 = time.perf_counter()
            with Slide(path) as slide:
                splitter = Splitter(slide, s.window, s.overlap, s.scale, batch_size=8)
                windows[name] = sum(len(tiles) for tiles, _ in splitter)
            best[name] = min(best[name], time.perf_counter() - t0)
    mpx, base = s.slide**2 / 1e6, best["tiled rgb zlib"]
    for name, t in best.items():
        record[name] = {"seconds": t, "mpx_per_s": mpx / t, "windows": windows[name]}
        say(
            f"  {name:20s} {t:6.2f} s  {mpx / t:7.1f} Mpx/s  {windows[name] / t:7.1f} windows/s"
            f"  {base / t:5.2f}x tiled zlib speed"
        )


def model_alone(bench: Bench, record: dict) -> None:
    s, device = bench.sizes, bench.device
    say(
        f"  random-init models in eval mode, input {s.model_input} px, no_grad; windows/s and "
        "peak memory allocated (weights included)"
    )
    for name in s.models:
        torch.manual_seed(0)
        model = build_model(name, pretrained=None).to(device).eval()
        for dtype in (torch.float16, torch.bfloat16):
            for batch in s.model_batches:
                rates = {}
                for channels_last in (False, True):
                    fmt = torch.channels_last if channels_last else torch.contiguous_format
                    model.to(memory_format=fmt)
                    key = f"{name} {str(dtype)[6:]} batch {batch}" + (
                        " channels_last" * channels_last
                    )
                    x = torch.rand(batch, 3, s.model_input, s.model_input, device=device)
                    x = x.contiguous(memory_format=fmt)
                    bench.reset_peak()
                    try:
                        rate = windows_per_s(bench, model, x, dtype)
                    except torch.cuda.OutOfMemoryError:
                        record[key] = "out of memory"
                        say(f"  {key:58s} out of memory (16 GB)")
                        torch.cuda.empty_cache()
                        continue
                    rates[channels_last] = rate
                    record[key] = {"windows_per_s": rate, "peak_bytes": bench.peak()}
                    vs = (
                        f"  {rate / rates[False]:.2f}x contiguous"
                        if channels_last and False in rates
                        else ""
                    )
                    say(f"  {key:58s} {rate:9.1f} windows/s  peak {gib(bench.peak())}{vs}")
        del model


def windows_per_s(bench: Bench, model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> float:
    """Forward passes of ``x`` under autocast, in chunks doubling until ``min_seconds``."""
    with torch.no_grad(), torch.autocast(bench.device.type, dtype=dtype):
        for _ in range(2):  # warm-up: cuDNN's choices, lazy initialisation
            model(x)
        done, elapsed, chunk = 0, 0.0, 2
        while done == 0 or elapsed < bench.sizes.min_seconds:
            bench.sync()
            t0 = time.perf_counter()
            for _ in range(chunk):
                model(x)
            bench.sync()
            elapsed += time.perf_counter() - t0
            done, chunk = done + chunk, chunk * 2
    return done * x.shape[0] / elapsed


class TimedPredictor(nn.Module):
    """A model whose calls are timed with the GPU drained before and after: the GPU's busy time.

    A module, so `kit.infer` finds its device and puts it in eval mode as it would the model.
    """

    def __init__(self, model: nn.Module, sync: Callable[[], None]) -> None:
        super().__init__()
        self.model, self.sync = model, sync
        self.busy, self.windows = 0.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sync()
        t0 = time.perf_counter()
        out = self.model(x)
        self.sync()
        self.busy += time.perf_counter() - t0
        self.windows += x.shape[0]
        return out


def end_to_end(bench: Bench, record: dict) -> None:
    s = bench.sizes
    path = slide_path(bench.cache, s.slide)
    torch.manual_seed(0)
    model = TimedPredictor(build_model(s.e2e_model, pretrained=None).to(bench.device), bench.sync)
    predict_slide_rle(slide_path(bench.cache, 1024), model, infer_config(bench))  # warm-up
    mpx = s.slide**2 / 1e6
    reader_s = bench.results.get("b reader", {}).get("tiled rgb zlib", {}).get("seconds")
    say(
        f"  {s.e2e_model} (random init), slide {path.name} (tiled zlib RGB), window {s.window} "
        f"seen at {s.window // s.scale} px, overlap {s.overlap}, default autocast, best of "
        f"{s.repeat}" + (f"; the reader alone took {reader_s:.2f} s" if reader_s else "")
    )
    for tta in (False, True):
        for batch in s.infer_batches:
            key = f"tta {'on' if tta else 'off'} batch {batch}"
            best = None
            for _ in range(s.repeat):
                model.busy, model.windows = 0.0, 0
                t0 = time.perf_counter()
                predict_slide_rle(path, model, infer_config(bench, tta=tta, batch_size=batch))
                wall = time.perf_counter() - t0
                if best is None or wall < best["seconds"]:
                    best = {"seconds": wall, "busy": model.busy, "windows": model.windows}
            idle = 1 - best["busy"] / best["seconds"]
            record[key] = {**best, "mpx_per_s": mpx / best["seconds"], "gpu_idle_share": idle}
            say(
                f"  {key:22s} {best['seconds']:6.2f} s  {mpx / best['seconds']:7.1f} Mpx/s  "
                f"model busy {best['busy']:6.2f} s ({best['windows']} windows through it)  "
                f"{bench.device.type} idle {idle:.0%}"
            )


# ---------------------------------------------------------------------------------------------
# (c) Training throughput


def training(bench: Bench, record: dict) -> None:
    s, data = bench.sizes, bench.dataset()
    base = dict(
        data_dir=str(data),
        out=str(bench.work / "c" / "run"),
        device=str(bench.device),
        cache_dir=str(bench.work / "c" / "tiles"),
        progress=False,
    )
    train_ids, _ = split(preset("quick", **base))
    dtype = amp_dtype(bench.device)
    say(
        f"  {preset('quick', **base).model}, training slides {train_ids}, autocast {dtype}; "
        f"{s.steps} steps timed after {s.warmup_steps} (worker start-up in those)"
    )
    for scale in s.train_scales:
        cfg = preset("quick", **base, data={"scale": scale})
        ds = TileDataset(tile_caches(cfg, train_ids), train_transforms())
        for batch in s.train_batches:
            rates = {}
            for workers in s.train_workers:
                key = f"batch {batch} scale {scale} workers {workers}"
                row = train_rate(bench, cfg, ds, batch, workers)
                rates[workers] = row["tiles_per_s"]
                record[key] = {**row, "tile": cfg.data.tile, "tiles": len(ds)}
                say(
                    f"  {key:30s} ({cfg.data.tile} px tiles) {row['tiles_per_s']:8.1f} tiles/s  "
                    f"{rates[workers] / rates[s.train_workers[0]]:5.2f}x workers "
                    f"{s.train_workers[0]}  peak {gib(row['peak_bytes'])}  "
                    f"(warm-up {row['warmup_s']:.1f} s)"
                )


def train_rate(bench: Bench, cfg, ds: TileDataset, batch: int, workers: int) -> dict:
    """Tiles/s of `kit.train.train_one_epoch` over ``steps`` batches, after ``warmup_steps``."""
    s, device = bench.sizes, bench.device
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=None).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = s.warmup_steps + s.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda i: warmup_cosine(i, warmup=s.warmup_steps, total=total, min_ratio=cfg.min_lr_ratio),
    )
    dtype = amp_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # Drawn with replacement: one pass of exactly the steps needed, whatever the dataset's size,
    # so the workers start once (in the warm-up) and no epoch boundary falls in the timing.
    sampler = RandomSampler(ds, replacement=True, num_samples=total * batch)
    loader = DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        worker_init_fn=seed_worker,
        pin_memory=bench.cuda,
        drop_last=True,
    )
    step = dict(
        criterion=BCEDiceLoss(cfg.bce_weight, cfg.dice_weight),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        device=device,
        amp_dtype=dtype,
        grad_clip=cfg.grad_clip,
    )
    batches = iter(loader)
    t0 = time.perf_counter()
    train_one_epoch(model, itertools.islice(batches, s.warmup_steps), **step)
    warmup = time.perf_counter() - t0
    bench.reset_peak()
    timed = train_one_epoch(model, itertools.islice(batches, s.steps), **step)
    peak = bench.peak()
    del batches  # stops the workers
    return {"tiles_per_s": timed["tiles_per_s"], "peak_bytes": peak, "warmup_s": warmup}


# ---------------------------------------------------------------------------------------------
# Running


SECTIONS = {
    "a": [("a", "(a) CUDA smoke: bf16 and fp16 (T4 mimic) runs, resumed in the other; parity",
           smoke)],
    "b": [
        ("b reader", "(b) inference, T4 memory: the reader alone, per TIFF layout", reader),
        ("b model", "(b) inference, T4 memory: the model alone", model_alone),
        ("b end to end", "(b) inference, T4 memory: predict_slide_rle end to end", end_to_end),
    ],
    "c": [("c", "(c) training throughput (train_one_epoch, fixed steps)", training)],
}  # fmt: skip


class Tee(io.TextIOBase):
    """Text written to several streams (the terminal and gpu.txt)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def environment(bench: Bench) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kit": str(Path(kit.__file__).parent),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(bench.device),
        "dry_run": bench.dry,
    }
    if bench.cuda:
        props = torch.cuda.get_device_properties(bench.device)
        env |= {
            "gpu": props.name,
            "capability": torch.cuda.get_device_capability(bench.device),
            "gpu_memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "arch_list": torch.cuda.get_arch_list(),
        }
    return env


def run_part(bench: Bench, key: str, title: str, fn) -> None:
    say(f"\n{title}")
    record = bench.results.setdefault(key, {})
    t0 = time.perf_counter()
    try:
        if key.startswith("b"):
            with t4_memory(bench):
                fn(bench, record)
        else:
            fn(bench, record)
    except Exception as error:  # a failed part is reported; the next one still runs
        record["error"] = f"{type(error).__name__}: {error}"
        say(f"  FAILED: {record['error']}")
        traceback.print_exc(file=sys.stdout)
    record["section_seconds"] = round(time.perf_counter() - t0, 1)
    say(f"  ({record['section_seconds']:.0f} s)")
    bench.save()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results folder (default: $OUT, else a temp dir)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temp dir)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--cpu-dry-run", action="store_true", help="every section, toy sizes, CPU")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "kit-bench",
        help="bench/predict.py's cache of synthetic TIFFs",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("bench/gpu.py: no CUDA device here; nothing measured (--cpu-dry-run checks the code)")
        return 0
    out = args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu-bench-"))
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-bench-work-"))
    for folder in (out, work, args.cache):
        folder.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    sizes = DRY_SIZES if args.cpu_dry_run else GPU_SIZES
    bench = Bench(device, sizes, out, work, args.cache, dry=args.cpu_dry_run)
    with open(out / "gpu.txt", "w", buffering=1) as log:
        with (
            contextlib.redirect_stdout(Tee(sys.stdout, log)),
            contextlib.redirect_stderr(Tee(sys.stderr, log)),
        ):
            start = time.perf_counter()
            bench.results["environment"] = environment(bench)
            say(f"bench/gpu.py: {json.dumps(bench.results['environment'])}")
            say(f"results: {out / 'gpu.json'}, {out / 'gpu.txt'}; scratch: {work}")
            if bench.dry:
                say("CPU DRY RUN: toy sizes, the numbers mean nothing")
            for section in args.sections:
                for key, title, fn in SECTIONS[section]:
                    run_part(bench, key, title, fn)
            bench.results["total_seconds"] = round(time.perf_counter() - start, 1)
            bench.save()
            say(f"\ndone in {bench.results['total_seconds']:.0f} s: {out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
