"""The ``mobiletl-edu`` command line: one subcommand per part of the package.

Each subcommand's flags are declared here, next to each other, so ``--help`` reads as one
page; the work is done by the package module the subcommand names. A user error (bad value,
missing file) prints one line to stderr and exits with status 2: no traceback.
"""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .methods import METHODS, prepare, summary
from .models import MODEL_NAMES


def _summary_command(args) -> int:
    prepared = prepare(args.model, args.method, args.blocks, num_classes=args.classes,
                       frozen_precision=args.frozen_precision)
    print(summary(prepared.model))
    return 0


def _add_summary_parser(sub) -> None:
    p = sub.add_parser("summary", help="show what prepare() makes of a model: trainable/frozen per block")
    p.add_argument("--model", default="mobilenet_v3_small", choices=MODEL_NAMES)
    p.add_argument("--method", default="mobiletl", choices=METHODS)
    p.add_argument("--blocks", type=int, default=None, help="number of top blocks to fine-tune")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--frozen-precision", default="int8", choices=("int8", "float"))
    p.set_defaults(run=_summary_command)


PARSER_BUILDERS = [_add_summary_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobiletl-edu", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSER_BUILDERS:
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"mobiletl-edu {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobiletl-edu {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
