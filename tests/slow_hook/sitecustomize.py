"""Test hook, on PYTHONPATH only for the tests that kill a run half way: with
WARREN_TEST_SLOW=module:function:seconds, that function sleeps before each call in the driver and
in every Ray worker (they start with this folder on their PYTHONPATH), so that a test can kill -9 a
run in the middle of a stage. The wrapper keeps the function's module and name, so Ray pickles it
by reference and each worker finds the slow one.

The module is patched when it is first imported, not here: importing it (and numpy) at start-up
would start BLAS before Ray sets a worker's OMP_NUM_THREADS, and a BLAS with more threads sums in
another order, so the slowed run would not compute the same floats as a plain one."""

import os
import sys

_SPEC = os.environ.get("WARREN_TEST_SLOW")


def _patch(module, name: str, seconds: float) -> None:
    import functools
    import time

    original = getattr(module, name)

    @functools.wraps(original)
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    setattr(module, name, slow)


class _PatchOnImport:
    def __init__(self, module_name: str, name: str, seconds: float) -> None:
        self.module_name, self.name, self.seconds = module_name, name, seconds

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module_name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module, self.name, self.seconds)

        spec.loader.exec_module = exec_and_patch
        return spec


if _SPEC:
    _module_name, _name, _seconds = _SPEC.split(":")
    sys.meta_path.insert(0, _PatchOnImport(_module_name, _name, float(_seconds)))
