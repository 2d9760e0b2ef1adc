"""Non-finite and saturated samples, before and after the per-level check of ``Glow.sample``.

For each checkpoint and temperature, ``--n`` samples at seed 0 are drawn twice: as a plain draw
(``redraw=False``: the check only counts) and with the default redraws. Printed as one table
(docs/sampling.md has the measured one); ``--json FILE`` keeps the numbers.

    PYTHONPATH=. OMP_NUM_THREADS=1 python3 benchmarks/sampling_stability.py \\
        --checkpoints fmnist_epoch1.pt fmnist_epoch2.pt
"""

import argparse
import json
import os

import torch

import glowflow


def measure(model, n, temperature, redraw, seed=0):
    """(fraction non-finite, fraction finite with some |x| > 1 in model space, report) of ``n`` samples."""
    torch.manual_seed(seed)
    x, report = model.sample_with_report(n, temperature, redraw=redraw)
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    saturated = finite & (x.abs().flatten(1).amax(dim=1) > 1)
    return float((~finite).float().mean()), float(saturated.float().mean()), report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 0.7, 1.0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--plain", action="store_true", help="the plain layers instead of the fast path")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    print(
        "| checkpoint | T | non-finite before | \\|x\\|>1 before | non-finite after | \\|x\\|>1 after "
        "| redrawn | redraws |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for path in args.checkpoints:
        model = glowflow.load_checkpoint(path).eval()
        model.fast = not args.plain
        for t in args.temperatures:
            nf0, sat0, _ = measure(model, args.n, t, redraw=False)
            nf1, sat1, report = measure(model, args.n, t, redraw=True)
            row = dict(
                checkpoint=os.path.basename(path),
                temperature=t,
                nonfinite_before=nf0,
                saturated_before=sat0,
                nonfinite_after=nf1,
                saturated_after=sat1,
                redrawn=report.redrawn,
                redraws=report.redraws,
                rounds=report.rounds,
                left=report.left,
                failed_per_level=report.failed,
            )
            rows.append(row)
            print(
                f"| {row['checkpoint']} | {t:g} | {nf0:.1%} | {sat0:.1%} | {nf1:.1%} | {sat1:.1%} | "
                f"{report.redrawn} | {report.redraws} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
