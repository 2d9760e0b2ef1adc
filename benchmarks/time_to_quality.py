"""Quality against wall-clock training time on the real Fashion-MNIST (1x32x32, glowflow's default
architecture): each recipe trains for a wall-clock budget, and every ``--eval_every`` minutes and
at each budget the clock stops while the test bits/dim is computed on the test split, with the
same dequantisation noise (U(0, 1/256), one fixed draw) for every recipe. At each budget, samples
at each temperature are compared with the test split by a Fréchet distance in the features of a
small Fashion-MNIST classifier (benchmarks/fid_classifier.py, trained once beforehand).

Recipes: ``reference`` (y0ast/Glow-PyTorch's model.py from ``--reference PATH``, trained as its
train.py does, benchmarks/ttq_reference.py), ``glowflow-seed`` (glowflow at the seed's defaults),
``glowflow-cpu`` (README.md's CPU flags ``--lr 1e-3 --warmup 1``) and, on request,
``glowflow-cpu-ema`` (the same with ``--ema 0.999``), benchmarks/ttq_glowflow.py.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/time_to_quality.py --reference ../Glow-PyTorch \\
        --fid_classifier fid_classifier.safetensors --threads 1 --smoke
    PYTHONPATH=. python benchmarks/time_to_quality.py --reference ../Glow-PyTorch \\
        --fid_classifier fid_classifier.safetensors --budgets 10 20 40 \\
        --json benchmarks/results/ttq.json --plot benchmarks/results/ttq.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from frechet import frechet_between  # noqa: E402
from ttq_glowflow import RECIPES, GlowflowRecipe  # noqa: E402
from ttq_reference import ReferenceRecipe  # noqa: E402
from ttq_report import THRESHOLDS, markdown_table, plot, reach_rows, reach_table  # noqa: E402

from glowflow.config import GlowConfig  # noqa: E402
from glowflow.pixels import bits_per_dim, dequantization_noise, postprocess, preprocess  # noqa: E402
from glowflow.sampling import SAMPLE_BOUND  # noqa: E402

ALL_RECIPES = ("reference", *RECIPES)
DEFAULT_RECIPES = ("reference", "glowflow-seed", "glowflow-cpu")
N_BITS = 8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", help="a checkout of y0ast/Glow-PyTorch (needed for the reference recipe)")
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), choices=ALL_RECIPES)
    parser.add_argument("--budgets", "--budget", nargs="+", type=float, default=[40.0], help="minutes (default 40)")
    parser.add_argument("--eval_every", type=float, default=5.0, help="minutes between evaluations (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--fid_classifier", help="weights of benchmarks/fid_classifier.py (else no Fréchet distances)")
    parser.add_argument("--fid_samples", type=int, default=1000, help="samples per recipe, budget and temperature")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.7, 1.0])
    parser.add_argument("--test_images", type=int, default=None, help="first N test images (default: all 10000)")
    parser.add_argument("--eval_batch", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="every recipe's training seed")
    parser.add_argument("--eval_seed", type=int, default=0, help="the test split's dequantisation noise")
    parser.add_argument("--sample_seed", type=int, default=0, help="torch's seed before each set of samples")
    parser.add_argument("--data_root", default="./data")
    parser.add_argument("--workdir", default=None, help="where glowflow's Trainer writes its (removed) run folders")
    parser.add_argument("--json", help="write the rows and settings here")
    parser.add_argument("--plot", help="write the plot (PNG) here")
    parser.add_argument("--smoke", action="store_true", help="0.5 minute, 1000 test images, 200 samples: a check")
    args = parser.parse_args(argv)
    if args.smoke:
        args.budgets, args.eval_every, args.test_images, args.fid_samples = [0.5], 0.25, 1000, 200
    if "reference" in args.recipes and not args.reference:
        parser.error("the reference recipe needs --reference PATH (a checkout of y0ast/Glow-PyTorch)")
    if min(args.budgets) <= 0 or args.eval_every <= 0:
        parser.error("--budgets and --eval_every must be positive")
    return args


def evaluation_times(budgets: Sequence[float], eval_every: float) -> List[float]:
    """Minutes at which the clock stops for an evaluation: every ``eval_every`` up to the largest
    budget, and each budget."""
    last = max(budgets)
    times = {round(k * eval_every, 6) for k in range(1, int(last / eval_every + 1e-9) + 1)}
    return sorted(times | {float(b) for b in budgets})


class TestSplit:
    """The test images, their one fixed dequantised copy (what every recipe is evaluated on) and,
    with a classifier, their features."""

    def __init__(self, args: argparse.Namespace, config: GlowConfig):
        from glowflow.data.resolve import load_dataset

        dataset = load_dataset("fashionmnist", "test", args.data_root, config.image_shape[-1], download=False)
        n = len(dataset) if args.test_images is None else min(args.test_images, len(dataset))
        self.images = dataset.images[:n].float() / 255.0
        generator = torch.Generator().manual_seed(args.eval_seed)
        self.x = preprocess(self.images, N_BITS) + dequantization_noise(self.images.shape, N_BITS, generator)
        self.num_dims = self.x[0].numel()
        self.batch = args.eval_batch
        self.classifier, self.classifier_info, self.features = None, None, None
        if args.fid_classifier:
            from fid_classifier import features_of, load_classifier

            self.classifier, self.classifier_info = load_classifier(args.fid_classifier)
            self.features = features_of(self.classifier, self.images)

    def bpd(self, recipe) -> float:
        """Mean test bits/dim (float64 sum) of ``recipe``'s evaluation model."""
        total = 0.0
        for i in range(0, len(self.x), self.batch):
            log_prob = recipe.log_prob(self.x[i : i + self.batch])
            total += float(bits_per_dim(log_prob, self.num_dims, N_BITS).double().sum())
        return total / len(self.x)


def to_pixels(samples: torch.Tensor) -> Tuple[torch.Tensor, Dict]:
    """Model-space samples -> images in [0, 1] for the classifier; non-finite values replaced
    (NaN by 0, i.e. mid-grey; +-inf by the ends of the range) before the usual clamp."""
    flat = samples.flatten(1)
    nonfinite = int((~torch.isfinite(flat)).any(1).sum())
    beyond = int((torch.nan_to_num(flat, nan=0.0).abs() > SAMPLE_BOUND).any(1).sum())
    clean = torch.nan_to_num(samples, nan=0.0, posinf=0.5, neginf=-0.5)
    counts = {"nonfinite_samples": nonfinite, f"samples_beyond_{SAMPLE_BOUND:g}": beyond}
    return postprocess(clean, N_BITS), counts


def sample_rows(recipe, test: TestSplit, args, budget: float) -> List[Dict]:
    from fid_classifier import features_of

    rows = []
    for temperature in args.temperatures:
        torch.manual_seed(args.sample_seed)
        start = time.perf_counter()
        samples, info = recipe.sample(args.fid_samples, temperature)
        seconds = time.perf_counter() - start
        images, counts = to_pixels(samples)
        distance = frechet_between(test.features, features_of(test.classifier, images))
        row = {"recipe": recipe.name, "budget": budget, "temperature": temperature, "n": len(images)}
        row.update(frechet=distance, sample_seconds=round(seconds, 2), **counts, **info)
        row["clamped"] = "non-finite values replaced (NaN -> 0, +-inf -> +-0.5), then clamped to the pixel range"
        rows.append(row)
        print(f"  {recipe.name} {budget:g} min T={temperature:g}: Fréchet {distance:.3f} {counts}", flush=True)
    return rows


def make_recipe(name: str, args, config: GlowConfig):
    if name == "reference":
        return ReferenceRecipe(args.reference, config, args.seed, args.data_root)
    return GlowflowRecipe(name, config, args.seed, args.data_root, args.workdir)


def run_recipe(name: str, args, config: GlowConfig, test: TestSplit, results: Dict) -> None:
    """Train ``name`` for the largest budget, stopping the clock at every evaluation; appends its
    rows to ``results``. A recipe that fails (e.g. diverges past glowflow's rollbacks) keeps the
    rows it made, and the error is recorded; the next recipe runs."""
    recipe = make_recipe(name, args, config)
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    recipe.setup()
    setup_seconds = time.perf_counter() - start
    info = {"setup_seconds": round(setup_seconds, 2), **recipe.describe()}
    if name == "reference":
        info["log_prob_check_max_abs_bpd"] = recipe.check_log_prob(preprocess(test.images[:16], N_BITS))
    results["recipes"][name] = info
    try:
        train_and_evaluate(recipe, args, test, results, setup_seconds)
    except Exception as err:  # recorded; the other recipes still run
        info["stopped"] = f"{type(err).__name__}: {err}"
        print(f"  {name} stopped: {info['stopped']}", flush=True)
    for key in ("skipped", "rollbacks", "nonfinite_losses"):
        if hasattr(recipe, key):
            info[key] = getattr(recipe, key)
    recipe.close()


def train_and_evaluate(recipe, args, test: TestSplit, results: Dict, clock: float) -> None:
    """Optimizer steps until each evaluation time (``clock``: seconds spent so far), then, with the
    clock stopped, the test bits/dim and, at a budget, the samples' Fréchet distances."""
    for minutes in evaluation_times(args.budgets, args.eval_every):
        while clock < minutes * 60:
            start = time.perf_counter()
            recipe.step()
            clock += time.perf_counter() - start
        rng = torch.get_rng_state()  # evaluation and sampling leave training's random numbers alone
        start = time.perf_counter()
        earlier = recipe.before_evaluation()  # glowflow: the priors fitted, as a run stopped here saves
        clock += time.perf_counter() - start
        start = time.perf_counter()
        bpd = test.bpd(recipe)
        row = {
            "recipe": recipe.name,
            "minutes": round(clock / 60, 4),
            "steps": recipe.steps,
            "epochs": round(recipe.epochs, 4),
        }
        row.update(test_bpd=bpd, lr=recipe.learning_rate, eval_seconds=round(time.perf_counter() - start, 2))
        row["load_avg"] = round(os.getloadavg()[0], 2)
        results["rows"].append(row)
        print(
            f"  {recipe.name} {row['minutes']:.2f} min, step {row['steps']}, epoch {row['epochs']:.2f}: "
            f"test {bpd:.4f} bits/dim (eval {row['eval_seconds']} s, load {row['load_avg']})",
            flush=True,
        )
        if any(abs(minutes - b) < 1e-6 for b in args.budgets) and test.classifier is not None:
            try:  # a sampler that fails is recorded; training goes on
                results["samples"].extend(sample_rows(recipe, test, args, minutes))
            except Exception as err:
                results["samples"].append({"recipe": recipe.name, "budget": minutes, "error": f"{err}"})
                print(f"  {recipe.name} {minutes:g} min: sampling failed: {err}", flush=True)
        recipe.after_evaluation(earlier)
        torch.set_rng_state(rng)


def git_commit(path: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def settings(args, config: GlowConfig, test: TestSplit) -> Dict:
    here = os.path.dirname(os.path.abspath(__file__))
    return {
        "args": vars(args),
        "architecture": config.to_dict(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "glowflow_commit": git_commit(here),
        "reference_commit": git_commit(args.reference) if args.reference else None,
        "test_images": len(test.x),
        "evaluation": (
            "mean test bits/dim of each recipe's evaluation model on the same dequantised test images: "
            "preprocess (p / 256 - 0.5) + one draw of U(0, 1/256) noise seeded --eval_seed; "
            "bits/dim = -(log p(x) - D log 256) / (D ln 2); the clock stops during evaluation and sampling"
        ),
        "clock": "training wall-clock seconds: setup (data, model, ActNorm init) and optimizer steps",
        "fid_classifier": {"path": args.fid_classifier, **test.classifier_info} if test.classifier_info else None,
    }


def print_tables(results: Dict) -> None:
    rows = results["rows"]
    body = [[r["recipe"], r["minutes"], r["steps"], r["epochs"], r["test_bpd"]] for r in rows]
    print("\n" + markdown_table(["recipe", "minutes", "steps", "epochs", "test bits/dim"], body))
    print("\n" + reach_table(results["time_to_reach"]))
    if results["samples"]:
        body = [
            [
                s["recipe"],
                s["budget"],
                s["temperature"],
                s["n"],
                s["frechet"],
                s.get("first_draw_failures", s.get("failed_calls", "-")),
                s["nonfinite_samples"],
            ]
            for s in results["samples"]
            if "error" not in s
        ]
        headers = [
            "recipe",
            "budget min",
            "T",
            "samples",
            "Fréchet",
            "first-draw failures (reference: failed calls of 32)",
            "non-finite returned",
        ]
        print("\n" + markdown_table(headers, body))
        floor = results.get("frechet_floor")
        if floor is not None:
            n, distance = floor["n"], floor["frechet"]
            print(f"\nFréchet distance of {n} training images to the test images (the floor): {distance:.3f}")


def frechet_floor(args, test: TestSplit) -> Optional[Dict]:
    """The Fréchet distance of as many training images as samples to the test split: what a
    perfect model would score at this sample size."""
    if test.classifier is None:
        return None
    from fid_classifier import features_of, load_split

    images, _ = load_split("train", args.data_root)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.sample_seed))[: args.fid_samples]
    return {"n": len(pick), "frechet": frechet_between(test.features, features_of(test.classifier, images[pick]))}


def _finite(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(path: Optional[str], results: Dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(_finite(results), handle, indent=1, default=str)
    os.replace(temporary, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = GlowConfig()  # the seed's architecture: 1x32x32, hidden 64, K 8, L 3, affine, invconv
    test = TestSplit(args, config)
    results = {"settings": settings(args, config, test), "recipes": {}, "rows": [], "samples": []}
    results["frechet_floor"] = frechet_floor(args, test)
    for name in args.recipes:
        run_recipe(name, args, config, test, results)
        results["time_to_reach"] = reach_rows(results["rows"], THRESHOLDS)
        write_json(args.json, results)  # after each recipe, so a long run keeps what it measured
    print_tables(results)
    if args.plot:
        plot(results["rows"], args.plot, f"Fashion-MNIST 1x32x32, {torch.get_num_threads()} thread(s)")
        print(f"\nwrote {args.plot}")
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
