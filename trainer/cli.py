"""`trainer` command line: each subcommand lives in its own module with add_arguments/run."""

from __future__ import annotations

import argparse
import importlib
import sys

from common import threads

# Subcommand -> module; each module defines add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "init-base": ("trainer.base", "Build the embedded tiny chat base model."),
    "make-data": ("trainer.datagen", "Write the bundled multi-domain conversation data."),
    "fit": ("trainer.fit", "Train a versioned QLoRA adapter."),
    "sweep": ("trainer.sweep",
              "Search fit settings with Optuna; refit the best and publish it as a version."),
    "check-data": ("trainer.check_data", "Find what in a conversation file breaks training."),
    "merge": ("trainer.merge", "Merge an adapter into a full-precision copy of its base."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="Switchboard trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        threads.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Threads first: building the parser imports subcommand modules, and torch must not load
    # before the OpenMP wait policy is set.
    try:
        report = threads.apply(threads.config_from_argv(argv))
    except ValueError as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        return 2
    print(f"trainer: {report.describe()}", file=sys.stderr, flush=True)
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
