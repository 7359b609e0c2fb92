"""Shared fixtures: one Ray instance for the whole session (ray.init costs seconds on 2 cores)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from worker_env import worker_pythonpath

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The embedding store is off unless a test names one: a vector stored by one test would make
# another's embed step instant (tests that kill a run half way through embed need it to take
# time), and no test writes to the user's cache. Subprocesses and Ray workers inherit this.
os.environ["WARREN_EMBED_STORE"] = "none"


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath()}},
        )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()
