"""glowflow speed and memory, eager vs the fast path, printed as one table.

    PYTHONPATH=. python3 benchmarks/bench.py                 # the three configurations, CPU
    PYTHONPATH=. python3 benchmarks/bench.py --quick         # fewer repeats (about a minute)
    PYTHONPATH=. python3 benchmarks/bench.py --device cuda --amp bf16 --compile

Configurations (the default flags: hidden 64, K 8, L 3, affine coupling, invconv, Adamax):
  1x32x32   batch 128          3x32x32   batch 128
  cifar     3x32x32, hidden 512, K 32, L 3 (the paper's CIFAR-10 model), batch --cifar-batch (8)

Rows per configuration: ``eager`` (``model.fast = False``: the plain layer-by-layer computation)
and ``fast`` (the default), plus ``fast+bf16`` (--amp bf16) and ``fast+compile`` (--compile).
Timing: ``time.perf_counter`` (CUDA: synchronised), warm-up first, then the rows run interleaved
``--repeats`` times on the same model and the best (minimum) time is kept, so a load spike from
another process hurts every row alike and the minimum approaches the unloaded speed.

* train img/s: one optimizer step (dequantised batch -> log_prob -> bits/dim -> backward ->
  Adamax step), the loss left on the device (no .item()).
* eval img/s: log_prob of a batch, model.eval(), torch.inference_mode().
* sample img/s: model.sample(batch, temperature 0.7), torch.inference_mode().
* step MiB: peak memory of a training step. CUDA: torch.cuda.max_memory_allocated during a
  steady-state step (model, gradients, optimizer state, activations; absolute). CPU: the growth
  of the process's peak resident set (Linux VmHWM after resetting it; ru_maxrss elsewhere) during
  the first training step, in a fresh subprocess per configuration and row whose model has done no forward pass
  before (activations, gradients, Adamax state and allocator overhead; tracemalloc cannot see
  torch's allocations). Coarser than the CUDA figure, but it compares rows fairly.
* GFLOP/img: multiply-adds x 2 of one training step (forward + backward) per image, counted with
  torch.utils.flop_counter.FlopCounterMode (convolutions and matrix products only).
* GFLOP/s and % peak: train GFLOP/img x train img/s, and its fraction of this machine's measured
  matmul peak (best time of a square float32 torch.mm; bf16 for bf16 rows).
* |dbpd|: max |bits/dim(row) - bits/dim(eager)| on the same weights and dequantisation noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from glowflow import Glow, GlowConfig, bits_per_dim, dequantize, preprocess  # noqa: E402
from glowflow.layers import ActNorm  # noqa: E402
from glowflow.runtime import autocast_context, compile_model  # noqa: E402

CONFIGS = {
    "1x32x32": dict(image_shape=(1, 32, 32), hidden_channels=64, K=8, L=3, batch=128),
    "3x32x32": dict(image_shape=(3, 32, 32), hidden_channels=64, K=8, L=3, batch=128),
    "cifar": dict(image_shape=(3, 32, 32), hidden_channels=512, K=32, L=3, batch=8),
}


# ----------------------------------------------------------------------------- set-up


def build(name: str, device: torch.device, batch: Optional[int] = None, seed: int = 0, init: bool = True):
    """(model, images in model space) for configuration ``name``; ActNorm initialised from the
    batch (``init``) or merely marked initialised (identity ActNorms, no forward pass)."""
    spec = {k: v for k, v in CONFIGS[name].items() if k != "batch"}
    n = batch or CONFIGS[name]["batch"]
    torch.manual_seed(seed)
    model = Glow(GlowConfig(**spec)).to(device)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *spec["image_shape"]), generator=generator).float() / 255
    x = preprocess(images, model.config.n_bits).to(device)
    if init:
        model.initialize(dequantize(x.cpu(), model.config.n_bits, generator).to(device))
    else:
        for module in model.modules():
            if isinstance(module, ActNorm):
                module.initialized.fill_(1)
    return model, x


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Row:
    """One way of running the model: eager, fast, fast+bf16, fast+compile."""

    def __init__(self, name: str, fast: bool, amp: str = "none", compiled: bool = False, channels_last: bool = True):
        self.name, self.fast, self.amp, self.compiled = name, fast, amp, compiled
        self.channels_last = channels_last

    def apply(self, model: Glow) -> None:
        model.fast = self.fast
        model.channels_last = self.channels_last


def make_steps(model: Glow, x: torch.Tensor, row: Row, device: torch.device, call: Callable):
    """The three timed closures for ``row``; ``call`` is the module the training step calls."""
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-5)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)).to(device) / 256

    def train():
        row.apply(model)
        model.train()
        with autocast_context(device, row.amp):
            log_prob, _ = call(x + noise)
        loss = bits_per_dim(log_prob, model.num_dims, model.config.n_bits).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def evaluate():
        row.apply(model)
        model.eval()
        with torch.inference_mode(), autocast_context(device, row.amp):
            call(x + noise)

    def sample():
        row.apply(model)
        model.eval()
        with torch.inference_mode(), autocast_context(device, row.amp):
            model.sample(x.shape[0], temperature=0.7)

    return dict(train=train, eval=evaluate, sample=sample)


def time_interleaved(
    steps: Dict[str, Dict[str, Callable]], kind: str, repeats: int, warmup: int, device: torch.device
) -> Dict[str, float]:
    """Best seconds of steps[row][kind]() over ``repeats`` rounds, the rows interleaved."""
    for _ in range(warmup):
        for row_steps in steps.values():
            row_steps[kind]()
    sync(device)
    best = {row: float("inf") for row in steps}
    for _ in range(repeats):
        for row, row_steps in steps.items():
            sync(device)
            start = time.perf_counter()
            row_steps[kind]()
            sync(device)
            best[row] = min(best[row], time.perf_counter() - start)
    return best


def train_flops_per_image(model: Glow, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        log_prob, _ = model(x)
        bits_per_dim(log_prob, model.num_dims, model.config.n_bits).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def matmul_peak(device: torch.device, dtype=torch.float32) -> float:
    """GFLOP/s of the best of a few square matrix products (2048 on CPU, 8192 on CUDA)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def bpd_difference(model: Glow, x: torch.Tensor, row: Row, device: torch.device, call: Callable) -> float:
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)).to(device) / 256
    model.eval()
    with torch.inference_mode():
        model.fast = False
        reference = bits_per_dim(model(x + noise)[0], model.num_dims, model.config.n_bits)
        row.apply(model)
        with autocast_context(device, row.amp):
            got = bits_per_dim(call(x + noise)[0], model.num_dims, model.config.n_bits)
    Row("fast", True).apply(model)
    return (got.double() - reference.double()).abs().max().item()


# ----------------------------------------------------------------------------- memory


def memory_in_subprocess(config: str, row: Row, args) -> Optional[float]:
    """CPU: MiB of peak-RSS growth over three training steps, in a fresh process."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--_memory",
        config,
        row.name,
        "--device",
        args.device,
        "--amp",
        row.amp if row.amp != "none" else args.amp,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.nchw:
        command += ["--nchw"]
    if config == "cifar":
        command += ["--cifar-batch", str(args.cifar_batch)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    for line in result.stdout.splitlines():
        if line.startswith("MEMORY_MIB "):
            return float(line.split()[1])
    sys.stderr.write(f"memory measurement failed for {config}/{row.name}:\n{result.stderr[-2000:]}\n")
    return None


def memory_child(config: str, row_name: str, args) -> None:
    """CPU: the growth of peak RSS during the first training step of a model that has done no
    forward pass before (ActNorms marked initialised): activations, gradients, optimizer state
    and the allocator's overhead, all fresh from the operating system."""
    device = torch.device(args.device)
    row = dict((r.name, r) for r in rows_for(args))[row_name]
    model, x = build(config, device, args.cifar_batch if config == "cifar" else None, init=False)
    steps = make_steps(model, x, row, device, model)
    before = resident_kib()
    steps["train"]()
    print(f"MEMORY_MIB {(peak_resident_kib() - before) / 1024:.1f}")


def _proc_status(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # kB
    except OSError:
        pass
    return None


def resident_kib() -> int:
    """The current resident set, KiB; resets Linux's high-water mark so peak_resident_kib() sees
    this process's own peak from here (ru_maxrss alone would also carry the parent's, inherited
    across fork + exec)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    current = _proc_status("VmRSS")
    return current if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_resident_kib() -> int:
    peak = _proc_status("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def cuda_step_memory(model: Glow, steps: Dict[str, Callable], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    steps["train"]()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


# ----------------------------------------------------------------------------- the table


def rows_for(args) -> List[Row]:
    rows = [Row("eager", fast=False), Row("fast", fast=True)]
    if args.nchw:
        rows.append(Row("fast-nchw", fast=True, channels_last=False))
    if args.amp == "bf16":
        rows.append(Row("fast+bf16", fast=True, amp="bf16"))
    if args.compile:
        rows.append(Row("fast+compile", fast=True, compiled=True))
    return rows


def run_config(config: str, args, peaks: Dict[str, float]) -> List[Dict]:
    device = torch.device(args.device)
    model, x = build(config, device, args.cifar_batch if config == "cifar" else None)
    batch = x.shape[0]
    rows = rows_for(args)
    calls, compile_seconds = {}, None
    for row in rows:
        calls[row.name] = model
        if row.compiled:
            calls[row.name] = compile_model(model)
            start = time.perf_counter()
            model.fast = True
            model.train()
            log_prob, _ = calls[row.name](x)  # compiles forward + backward on first use
            bits_per_dim(log_prob, model.num_dims, model.config.n_bits).mean().backward()
            model.eval()
            with torch.inference_mode():
                calls[row.name](x)
            sync(device)
            compile_seconds = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
    steps = {row.name: make_steps(model, x, row, device, calls[row.name]) for row in rows}
    heavy = config == "cifar"
    repeats = max(1, (args.repeats // 2 if heavy else args.repeats))
    warmup = 1
    timings = {kind: time_interleaved(steps, kind, repeats, warmup, device) for kind in ("train", "eval", "sample")}
    model.fast = True
    flops = {row.name: train_flops_per_image(model, x) if not row.compiled else None for row in rows}
    model.fast = False
    flops["eager"] = train_flops_per_image(model, x)
    model.fast = True
    results = []
    for row in rows:
        flop_img = flops.get(row.name) or flops["fast"]
        train_ips = batch / timings["train"][row.name]
        gflops = flop_img * train_ips / 1e9
        peak = peaks["bf16" if row.amp == "bf16" else "fp32"]
        if device.type == "cuda":
            memory = cuda_step_memory(model, steps[row.name], device)
        elif args.no_memory:
            memory = None
        else:
            memory = memory_in_subprocess(config, row, args) if not row.compiled else None
        results.append(
            dict(
                config=config,
                batch=batch,
                row=row.name,
                train_img_s=train_ips,
                eval_img_s=batch / timings["eval"][row.name],
                sample_img_s=None if row.compiled else batch / timings["sample"][row.name],
                step_mib=memory,
                train_gflop_per_img=flop_img / 1e9,
                train_gflop_s=gflops,
                fraction_of_peak=gflops / peak,
                max_dbpd=0.0 if row.name == "eager" else bpd_difference(model, x, row, device, calls[row.name]),
                compile_seconds=compile_seconds if row.compiled else None,
            )
        )
    return results


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(results: List[Dict], header: str, speedups: bool = True) -> None:
    columns = [
        "config",
        "batch",
        "path",
        "train img/s",
        "eval img/s",
        "sample img/s",
        "step MiB",
        "GFLOP/img",
        "GFLOP/s",
        "% peak",
        "|dbpd|",
    ]
    lines = []
    for r in results:
        lines.append(
            [
                r["config"],
                str(r["batch"]),
                r["row"],
                fmt(r["train_img_s"], ".1f"),
                fmt(r["eval_img_s"], ".1f"),
                fmt(r["sample_img_s"], ".1f"),
                fmt(r["step_mib"], ".0f"),
                fmt(r["train_gflop_per_img"], ".3f"),
                fmt(r["train_gflop_s"], ".1f"),
                fmt(100 * r["fraction_of_peak"], ".1f"),
                "-" if r["row"] == "eager" else f"{r['max_dbpd']:.1e}",
            ]
        )
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
    print(header)
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print(
            "| " + " | ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))) + " |"
        )
    if not speedups:
        return
    by_config = {}
    for r in results:
        by_config.setdefault(r["config"], {})[r["row"]] = r
    for config, by_row in by_config.items():
        if "eager" in by_row and "fast" in by_row:
            e, f = by_row["eager"], by_row["fast"]
            print(
                f"{config}: fast / eager  train x{f['train_img_s'] / e['train_img_s']:.2f}  "
                f"eval x{f['eval_img_s'] / e['eval_img_s']:.2f}  sample x{f['sample_img_s'] / e['sample_img_s']:.2f}"
            )
    compiled = [r for r in results if r["compile_seconds"] is not None]
    for r in compiled:
        print(f"{r['config']}: torch.compile took {r['compile_seconds']:.0f} s (first train + eval call)")


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                what = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return (
        f"{what}; {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default="1x32x32,3x32x32,cifar", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 5, and no memory subprocesses")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cifar-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"], help="add a fast+bf16 row")
    parser.add_argument("--compile", action="store_true", help="add a fast+compile row (torch.compile)")
    parser.add_argument("--nchw", action="store_true", help="add a fast-nchw row (fast path without channels_last)")
    parser.add_argument(
        "--no-tf32",
        action="store_true",
        help="CUDA: strict float32 convolutions (torch.backends.cudnn.allow_tf32 = False)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    if args._memory:
        memory_child(args._memory[0], args._memory[1], args)
        return 0
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.no_memory = True
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if args.no_tf32:
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
    started = time.perf_counter()
    print(f"machine: {machine_description(device)}")
    if device.type == "cpu" and torch.get_num_threads() > 1 and os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5:
        print(
            f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other processes hold the "
            f"cores, and {torch.get_num_threads()}-thread kernels wait on each other; --threads 1 gives steadier "
            f"figures on a shared machine"
        )
    if device.type == "cuda":
        print(
            f"cuDNN TF32 convolutions: {torch.backends.cudnn.allow_tf32} (both eager and fast rows use them; "
            f"--no-tf32 for strict float32)"
        )
    peaks = {"fp32": matmul_peak(device)}
    peaks["bf16"] = matmul_peak(device, torch.bfloat16) if args.amp == "bf16" else peaks["fp32"]
    print(
        f"matmul peak: {peaks['fp32']:.1f} GFLOP/s float32"
        + (f", {peaks['bf16']:.1f} GFLOP/s bfloat16" if args.amp == "bf16" else "")
    )
    results = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            parser.error(f"unknown configuration {config!r} (known: {', '.join(CONFIGS)})")
        config_results = run_config(config, args, peaks)
        print_table(
            config_results, f"{config} (load average {' '.join(f'{v:.2f}' for v in os.getloadavg())})", speedups=False
        )
        sys.stdout.flush()
        results += config_results
    print()
    print_table(
        results,
        f"device {device}, best of {args.repeats} interleaved repeats "
        f"(cifar: {max(1, args.repeats // 2)}), load average now "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}, {time.perf_counter() - started:.0f} s in all",
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine_description(device), peaks=peaks, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
