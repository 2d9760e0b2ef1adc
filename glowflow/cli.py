"""Command line: flags -> config -> train / sample / outlier detection."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glowflow", description="Glow normalizing flow")
    parser.add_argument("--train", action="store_true", help="Train model")
    parser.add_argument("--sample", action="store_true", help="Sample from model")
    parser.add_argument("--outlier_detection", action="store_true", help="Outlier detection")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.train or args.sample or args.outlier_detection):
        parser.print_help()
        return 0
    print("not implemented yet", file=sys.stderr)
    return 2
