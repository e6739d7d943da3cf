"""`layerpipe <command>`: entry point that dispatches to one module per subcommand.

Every subcommand module offers `add_parser(subparsers)` and `run(args) -> int`. Errors a user
can cause (`LayerpipeError`) are printed as one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from layerpipe.errors import LayerpipeError

# name -> module under layerpipe.cli; a module that is missing is skipped (lazy import keeps
# `layerpipe plan` fast: it never imports torch.distributed)
SUBCOMMANDS = ("plan", "train", "compare", "env", "simulate", "export", "launch")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not the whole usage block), exit status 2.
    Subcommand parsers are of the same class (add_subparsers uses the parent's type)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="layerpipe",
        description="LayerPipe2 pipelined training: plan delays, train with weight stashing or "
        "EMA weight reconstruction, compare strategies.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"layerpipe.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"layerpipe.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except LayerpipeError as exc:
        print(f"layerpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `layerpipe plan | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP turned into one (args: the signal's name)
        import signal

        name = str(exc.args[0]) if exc.args and str(exc.args[0]).startswith("SIG") else "SIGINT"
        print(f"layerpipe {args.command}: interrupted ({name}); nothing finished was lost", file=sys.stderr)
        return 128 + getattr(signal, name, signal.SIGINT).value


if __name__ == "__main__":
    sys.exit(main())
