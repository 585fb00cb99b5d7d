"""The argparse parser of the `evaluate`, `convert`, `soup`, `sweep` and `synth` command lines: bad
flags give one line (`train` parses absl flags and does the same in `embedder/train/__main__.py`)."""
from __future__ import annotations

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose usage errors are one line on stderr, exit status 2.

    Pass it as `parser_class` to `add_subparsers` so subcommands answer the same way."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
