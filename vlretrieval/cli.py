"""Shared plumbing for the workflow scripts: logging set-up and user-facing error exits."""

from __future__ import annotations

import json
import logging
import sys
from typing import Callable, Sequence

from .errors import VLRetrievalError


def json_arg(text: str):
    """argparse ``type=`` for arguments that carry a JSON document (registry entries, overrides)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main``; expected failures end with one clear line and exit status 1.

    An integer returned by ``main`` is the exit status.

    Anything unexpected still raises with its traceback, because that is a bug to report.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        code = main(argv)
    except VLRetrievalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0
