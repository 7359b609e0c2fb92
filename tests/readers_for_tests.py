"""A reader for the ingest resume tests (importable by Ray workers through PYTHONPATH)."""

from __future__ import annotations

import os
import time

from warren.stages.readers.parquet import ParquetReader


class SlowParquetReader(ParquetReader):
    """The Parquet reader, slowed per piece through the environment (so a run can be killed half
    way through ingest with the same fingerprint as the run that resumes it)."""

    def read(self, unit):
        for table in super().read(unit):
            time.sleep(float(os.environ.get("WARREN_TEST_SLEEP_PER_PIECE", "0")))
            yield table
