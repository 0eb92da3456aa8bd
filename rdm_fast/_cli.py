"""What the command-line entry points share: one-line errors instead of tracebacks, logging, precision."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

import torch

from .checkpoint import CheckpointError
from .config import ConfigError


class CLIError(Exception):
    """A mistake in the command line or its input files; printed as one line, exit status 2."""


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main`` with INFO logging to stderr; user errors become ``error: ...`` and exit status 2.
    Set RDM_FAST_DEBUG=1 to see the traceback instead."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        return main(argv)
    except (CLIError, ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        if os.environ.get("RDM_FAST_DEBUG"):
            raise
        print("error: " + " ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends argparse's "(default: ...)" only where the help text states no default and there is one to show
    (not for unset options or flags), so each option's default appears once."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def pick_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
