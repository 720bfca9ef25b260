"""Training-step cost of models side by side: forward + backward per tile, as a ratio.

    OMP_NUM_THREADS=1 python bench/train_step.py --models unet_resnet34 lraspp_mobilenet_v3_large

Each model trains (train mode, mean of the logits as the loss) on the same random batch; the
models take turns, the first round is a warm-up, and each reports its best round, so a machine
loaded by other jobs slows all of them alike. Ratios are to the first model.
"""

from __future__ import annotations

import argparse
import time

import torch

from kit.model import build_model


def step_seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward + backward of `model` on `x`."""
    start = time.perf_counter()
    model(x).mean().backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["unet_resnet34", "lraspp_mobilenet_v3_large"]
    )
    parser.add_argument("--size", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {name: build_model(name).train() for name in args.models}
    x = torch.rand(args.batch, 3, args.size, args.size)
    best = {name: float("inf") for name in models}
    for round_ in range(args.rounds + 1):
        for name, model in models.items():
            seconds = step_seconds(model, x)
            if round_:  # round 0 warms up
                best[name] = min(best[name], seconds)
    first = best[args.models[0]]
    for name, seconds in best.items():
        per_tile = seconds / args.batch * 1000
        print(f"{name}: {per_tile:.0f} ms per {args.size} px tile, x{seconds / first:.2f}")


if __name__ == "__main__":
    main()
