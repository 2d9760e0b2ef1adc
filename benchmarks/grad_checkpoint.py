"""Peak memory and time of one training step with and without gradient checkpointing.

For each image shape, a Glow with paper-size coupling networks (``--hidden`` 512 by default) runs
training steps (forward, backward, Adamax step) on random model-space images, once with the
activations kept (the default) and once with ``model.grad_checkpoint = True`` (each flow step's
activations recomputed in the backward pass). Each measurement runs in a fresh process.

Memory: what the training steps add at their peak on top of the built and initialised model: on
CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the first step; on a CPU the
process's peak resident set above its resident set before the first step (Linux's clear_refs
resets the peak), which is what an out-of-memory kill sees. Both include the gradients and the
optimizer state. Time: the median step after a warm-up step.

    python3 benchmarks/grad_checkpoint.py                       # the table
    python3 benchmarks/grad_checkpoint.py --shapes 1x32x32 3x64x64 --K 8 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from glowflow import Glow, GlowConfig  # noqa: E402

SHAPES = ("1x32x32", "3x64x64", "3x128x128", "3x256x256")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> float:
    """Reset the process's peak resident set to the current one (Linux: /proc/self/clear_refs);
    returns the current resident MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mib("VmRSS")


def measure(shape: str, checkpointed: bool, args) -> dict:
    """One configuration in this process: {"seconds": median step time, "peak_mib": step memory}."""
    c, h, w = (int(v) for v in shape.split("x"))
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_shape=(c, h, w), hidden_channels=args.hidden, K=args.K, L=args.L)).to(device)
    x = torch.rand(args.batch, c, h, w, device=device) - 0.5
    model.initialize(x)
    model.train()
    model.grad_checkpoint = checkpointed
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        log_prob, _ = model(x)
        (-log_prob.mean()).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # memory: everything a step adds on top of the built, initialised model (the first step's
    # optimizer state included), so an allocator that keeps freed memory cannot hide the peak
    baseline = reset_peak_rss() if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**20
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()  # warm-up: optimizer state, allocator caches
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _status_mib("VmHWM")
    return {
        "seconds": statistics.median(times),
        "peak_mib": peak - baseline,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def in_subprocess(shape: str, checkpointed: bool, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--_child",
        shape,
        str(int(checkpointed)),
        "--K",
        str(args.K),
        "--L",
        str(args.L),
        "--hidden",
        str(args.hidden),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--K", type=int, default=32)
    parser.add_argument("--L", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(measure(args._child[0], bool(int(args._child[1])), args)))
        return 0
    print(
        f"K {args.K}, L {args.L}, hidden {args.hidden}, batch {args.batch}, device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        "| image | params (M) | step s | peak MiB | checkpointed step s | checkpointed peak MiB | memory / | time x |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for shape in args.shapes:
        plain, checkpointed = in_subprocess(shape, False, args), in_subprocess(shape, True, args)
        row = {
            "shape": shape,
            "plain": plain,
            "checkpointed": checkpointed,
            "memory_ratio": plain["peak_mib"] / checkpointed["peak_mib"],
            "time_ratio": checkpointed["seconds"] / plain["seconds"],
        }
        rows.append(row)
        print(
            f"| {shape} | {plain['params_m']:.1f} | {plain['seconds']:.2f} | {plain['peak_mib']:.0f} | "
            f"{checkpointed['seconds']:.2f} | {checkpointed['peak_mib']:.0f} | {row['memory_ratio']:.2f} | "
            f"{row['time_ratio']:.2f} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
