"""How a run fails: one line on the console naming the stage and the cause, the whole story in
`OUTPUT/logs/<stage folder>.log`.

Worker functions are wrapped by `compact_errors`: an exception in a Ray worker becomes
`StageFailed` (a one-line cause and the traceback), so Ray carries a short error back to the
driver instead of every frame once per retry; `root_cause` digs the user's exception out of
Ray's wrappers on the driver.
"""

from __future__ import annotations

import functools
import inspect
import traceback


class PipelineError(RuntimeError):
    """A run cannot go on; the message says which stage and why."""


class StageFailed(Exception):
    """An error raised in a Ray worker, made compact there: `message` is the cause in one line
    (it names the flag or file to change where the stage's own error does), `details` the full
    traceback, which the driver writes to OUTPUT/logs/ instead of the console."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __reduce__(self):  # Ray pickles worker errors; keep both fields
        return (StageFailed, (self.message, self.details))

    def __str__(self) -> str:
        return self.message


def one_line(exc: BaseException) -> str:
    """The first line of an error, with its type unless it is one of ours."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(exc, (PipelineError, StageFailed)):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def compact_errors(fn):
    """Worker functions raise StageFailed: Ray then carries a one-line cause and a short stack
    back to the driver instead of the chain of every frame (printed once per retry)."""

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except StageFailed:
                raise
            except Exception as exc:
                raise StageFailed(one_line(exc), traceback.format_exc()) from None

        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StageFailed:
            raise
        except Exception as exc:
            raise StageFailed(one_line(exc), traceback.format_exc()) from None

    return wrapper


def root_cause(exc: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (RayTaskError, UserCodeException, ...)."""
    e, seen = exc, set()
    found = None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if not type(e).__module__.startswith("ray."):
            found = e
        nxt = getattr(e, "cause", None) or e.__cause__
        e = nxt if isinstance(nxt, BaseException) else None
    return found or exc


def failure_text(exc: BaseException) -> str:
    """The whole story of a failure for the log file: the driver's traceback, then the worker's."""
    cause = root_cause(exc)
    details = cause.details if isinstance(cause, StageFailed) else ""
    text = "".join(traceback.format_exception(exc))
    if details:
        text += "\nIn the Ray worker:\n" + details
    return text
