"""Small stages used by the runner tests (importable by Ray workers through PYTHONPATH)."""

from __future__ import annotations

import dataclasses
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import BatchStage, GlobalContext, GlobalStage, Resources, param, reject


@dataclasses.dataclass(frozen=True)
class CaptionLengthParams:
    max_chars: int = param(1000, "reject captions longer than this")


class CaptionLength(BatchStage):
    """Adds caption_len; rejects captions longer than max_chars."""

    name = "caption_length"
    version = "1"
    Params = CaptionLengthParams
    resources = Resources(batch_size=10)
    summed_columns = ("caption_len",)

    def process(self, batch: pa.Table) -> pa.Table:
        # Slowed down through the environment, not a parameter, so the interrupted run and the
        # resumed run have the same fingerprint.
        time.sleep(float(os.environ.get("WARREN_TEST_SLEEP_PER_BATCH", "0")))
        lengths = pc.utf8_length(pc.fill_null(batch.column("caption"), ""))
        out = batch.append_column("caption_len", lengths.cast(pa.int32()))
        too_long = pc.greater(lengths, self.params.max_chars).to_numpy(zero_copy_only=False)
        reasons = [f"caption_length: too long ({n} chars)" for n in lengths.to_pylist()]
        return reject(out, too_long, reasons)


@dataclasses.dataclass(frozen=True)
class ModuloParams:
    modulo: int = param(7, "reject rows whose numeric id suffix is divisible by this")


class ModuloModel(BatchStage):
    """A 'model' stage (actor pool) that records the pid that set it up."""

    name = "modulo_model"
    version = "1"
    Params = ModuloParams
    uses_model = True
    resources = Resources(num_cpus=0.5, batch_size=16)

    def setup(self) -> None:
        self.setup_pid = os.getpid()

    def process(self, batch: pa.Table) -> pa.Table:
        nums = [int(i.rsplit("-", 1)[1]) for i in batch.column("id").to_pylist()]
        out = batch.append_column(
            "setup_pid", pa.array([self.setup_pid] * batch.num_rows, pa.int64())
        )
        mask = [n % self.params.modulo == 0 for n in nums]
        return reject(out, mask, f"modulo_model: divisible (by {self.params.modulo})")


class DropsRows(BatchStage):
    """Breaks the contract on purpose: loses a row."""

    name = "drops_rows"

    def process(self, batch: pa.Table) -> pa.Table:
        return batch.slice(1)


class ScrambleRows(GlobalStage):
    """A global stage whose output order and blocks change from run to run (an unseeded shuffle
    into a random number of blocks), as a grouping stage's do with Ray's timing; rejects ids
    ending in 3."""

    name = "scramble_rows"
    version = "1"

    def run(self, ds, ctx: GlobalContext):
        import random

        ds = ds.random_shuffle().repartition(random.randint(1, 7))

        def mark(batch: pa.Table) -> pa.Table:
            ends3 = [i.endswith("3") for i in batch.column("id").to_pylist()]
            return reject(batch, ends3, "scramble_rows: ends in 3")

        return ds.map_batches(mark, batch_format="pyarrow")


class BatchProbe(BatchStage):
    """Writes, on every row, the size and first id of the batch `process` was called with."""

    name = "batch_probe"
    version = "1"
    resources = Resources(batch_size=7)

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        out = batch.append_column("batch_rows", pa.array([n] * n, pa.int64()))
        return out.append_column("batch_first", pa.array([batch.column("id")[0].as_py()] * n))


@dataclasses.dataclass(frozen=True)
class MinScoreParams:
    min_score: float = param(
        0.5, "reject rows whose clip_score is below this", threshold="min", column="clip_score"
    )


class MinScore(BatchStage):
    """Reads a column it does not add (clip_score): the column check's subject."""

    name = "min_score"
    version = "1"
    Params = MinScoreParams
    requires = ("clip_score",)
    resources = Resources(batch_size=8)

    def process(self, batch: pa.Table) -> pa.Table:
        scores = pc.fill_null(batch.column("clip_score"), 0.0).to_numpy(zero_copy_only=False)
        return reject(batch, scores < self.params.min_score, "min_score: below")


class AddsScore(BatchStage):
    """Adds clip_score (a row's caption length / 100)."""

    name = "adds_score"
    version = "1"
    adds = ("clip_score",)

    def process(self, batch: pa.Table) -> pa.Table:
        lengths = pc.utf8_length(pc.fill_null(batch.column("caption"), ""))
        scores = pc.divide(lengths.cast(pa.float64()), 100.0).cast(pa.float32())
        return batch.append_column("clip_score", scores)
