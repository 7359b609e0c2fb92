"""The PYTHONPATH that Ray workers and subprocesses of the tests get."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker_pythonpath() -> str:
    """The tests' own modules, then whatever this process was given (a checkout of warren that
    shadows the installed one, e.g. a git worktree)."""
    given = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([str(ROOT), str(ROOT / "tests"), *given])
