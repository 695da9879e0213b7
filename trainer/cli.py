"""`trainer` command line: each subcommand lives in its own module with add_arguments/run."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand -> module; each module defines add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "init-base": ("trainer.base", "Build the embedded tiny chat base model."),
    "make-data": ("trainer.datagen", "Write the bundled multi-domain conversation data."),
    "fit": ("trainer.fit", "Train a versioned QLoRA adapter."),
    "merge": ("trainer.merge", "Merge an adapter into a full-precision copy of its base."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="Switchboard trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
