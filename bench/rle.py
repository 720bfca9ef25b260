"""Benchmark ``kit.rle.encode`` against the classic Kaggle numba RLE encoder.

Run from the repository root::

    .venv/bin/python bench/rle.py            # 20000 x 20000 mask, ~2% foreground
    .venv/bin/python bench/rle.py --size 8000

The mask holds a few hundred round blobs (glomerulus-like) covering about 2% of the pixels. The
baseline is the loop most Kaggle kernels used: flatten ``mask.T`` (a full transposed copy), walk it
in a numba function appending run boundaries to a list, join the numbers in Python. Both are
warmed up (JIT) first and timed end to end (mask in, string out), best of ``--repeat``. Extra
memory is the peak resident set size (kernel's VmHWM, reset through /proc/self/clear_refs) minus
the resident size before the call, measured in a fresh subprocess per encoder: it sees numba's and
numpy's allocations alike, at page granularity.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kit.rle import encode  # noqa: E402


@njit(cache=True)
def _baseline_boundaries(pixels):
    """1-indexed positions where a flat 0/1 array changes value (the classic loop)."""
    points = []
    prev = 0
    for i in range(pixels.size):
        if pixels[i] != prev:
            points.append(i + 1)
            prev = pixels[i]
    if prev:
        points.append(pixels.size + 1)
    return points


def baseline_encode(mask: np.ndarray) -> str:
    """Classic Kaggle RLE of a 0/1 uint8 (H, W) mask: full transposed copy, list, join."""
    pixels = mask.T.flatten()
    runs = _baseline_boundaries(pixels)
    for k in range(1, len(runs), 2):
        runs[k] -= runs[k - 1]
    return " ".join(str(x) for x in runs)


def make_mask(size: int, fraction: float = 0.02, seed: int = 0) -> np.ndarray:
    """uint8 (size, size) 0/1 mask of a few hundred random discs covering ~``fraction``."""
    rng = np.random.default_rng(seed)
    # Written, not np.zeros: untouched zero pages all map one physical page, which would make
    # scans look faster (cache-hot) and the memory look smaller than for a real mask.
    mask = np.empty((size, size), np.uint8)
    mask.fill(0)
    n_blobs = 300
    mean_area = fraction * size * size / n_blobs
    radii = np.sqrt(mean_area / np.pi) * rng.uniform(0.6, 1.3, n_blobs)
    for r in radii:
        r = max(float(r), 1.0)
        cy, cx = rng.uniform(r, size - r, 2)
        y0, y1 = int(cy - r), min(int(np.ceil(cy + r)) + 1, size)
        x0, x1 = int(cx - r), min(int(np.ceil(cx + r)) + 1, size)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        mask[y0:y1, x0:x1] |= ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
    return mask


def best_time(fn, mask: np.ndarray, repeat: int) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(mask)
        best = min(best, time.perf_counter() - t0)
    return best, out


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(which: str, size: int) -> None:
    """Child process: print JSON {extra_bytes} for one call of encoder ``which``."""
    fn = encode if which == "encode" else baseline_encode
    fn(make_mask(64))  # JIT (or cache load) before measuring
    mask = make_mask(size)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    fn(mask)
    peak = _status_kib("VmHWM")
    print(json.dumps({"extra_bytes": (peak - before) * 1024}))


def extra_memory(which: str, size: int) -> int | None:
    cmd = [sys.executable, __file__, "--size", str(size), "--memory-child", which]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  (memory measurement for {which} failed: {done.stderr.strip()[-300:]})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["extra_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000, help="mask side in pixels")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per encoder (best)")
    parser.add_argument("--memory-child", choices=["encode", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        measure_memory(args.memory_child, args.size)
        return

    mask = make_mask(args.size)
    n_px = mask.size
    print(f"mask {args.size} x {args.size} uint8, foreground {mask.mean():.2%}, C order")
    small = make_mask(256)
    if encode(small) != baseline_encode(small):
        raise SystemExit("warm-up: encoders disagree on the small mask")
    t_base, s_base = best_time(baseline_encode, mask, args.repeat)
    t_kit, s_kit = best_time(encode, mask, args.repeat)
    same = s_kit == s_base
    n_runs = (s_kit.count(" ") + 1) // 2 if s_kit else 0
    print(f"identical output: {same} ({n_runs} runs, {len(s_kit) / 1e6:.1f} MB of text)")
    for name, t in [("baseline (numba, mask.T flatten + list)", t_base), ("kit.rle.encode", t_kit)]:
        print(f"{name:40s} {t:8.3f} s {n_px / t / 1e6:8.0f} Mpx/s")
    print(f"speed-up: {t_base / t_kit:.1f}x (best of {args.repeat})")
    print(
        "extra memory (peak RSS - RSS before the call, subprocess, /proc VmHWM after clear_refs):"
    )
    for which in ("encode", "baseline"):
        extra = extra_memory(which, args.size)
        if extra is not None:
            print(f"  {which:8s}: {extra / 2**20:8.1f} MiB = {extra / n_px:6.1%} of the mask")
    if not same:
        raise SystemExit("encoders disagree")


if __name__ == "__main__":
    main()
