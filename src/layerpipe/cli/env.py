"""`layerpipe env`: versions and machine, to paste into a bug report."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="print versions and machine details for bug reports", description=__doc__)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    from layerpipe.report.records import environment

    try:
        installed = version("layerpipe")
    except PackageNotFoundError:  # run from a checkout without installing
        installed = "not installed"
    print(f"layerpipe: {installed}")
    for key, value in environment().items():
        print(f"{key}: {value}")
    return 0
