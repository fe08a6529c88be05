"""Command line: ``python -m packkv demo [options]`` (also installed as the ``packkv`` script)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packkv", description="PackKV: a compressed, bit-packed KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    from packkv import demo

    demo.add_arguments(sub.add_parser("demo", help="generate with the packed cache on a real model",
                                      description=demo.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter))  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.command == "demo":
        return demo.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
