"""The argument parser every `python -m embedder.*` command line uses: bad flags give one line."""
from __future__ import annotations

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose usage errors are one line on stderr, exit status 2.

    Pass it as `parser_class` to `add_subparsers` so subcommands answer the same way."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
