"""The stage contract.

A stage is a small class with a stable `name`, a `version` (bump it when its output changes
meaning), one parameter dataclass (`Params`, hashed into the cache key and turned into command-line
flags), the resources it asks Ray for, and one of two shapes:

- `BatchStage.process(batch: pyarrow.Table) -> pyarrow.Table`: one Arrow batch in, the same rows
  out (same order), with the columns the stage adds. `setup()` runs once per Ray worker (load a
  model there, never per batch). Runs through `Dataset.map_batches`; `uses_model = True` makes it
  an actor pool.
- `GlobalStage.run(ds) -> ds`: needs all rows (dedup, ranks, balancing); written with Ray Data
  operations whose memory is bounded by a block or a group, never by the dataset.

Stages never drop rows. To reject a row a stage sets the `_reject` column (see `reject`) to a
reason of the form `"rule: detail"`; the runner moves such rows to the rejected ledger and checks,
for every stage, rows in = kept + rejected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from warren.stages.schema import REJECT_COLUMN

#: The input position of each row of a global stage's input (int64, set by the runner). A global
#: stage returns it with every other column; the runner writes the output in input order by it,
#: and a stage may use it to order rows deterministically (ties, groups).
POSITION_COLUMN = "_pos"


@dataclasses.dataclass(frozen=True)
class NoParams:
    """A stage without parameters."""


def param(default: Any, help: str, **kwargs: Any) -> Any:
    """A stage parameter: its default and its documentation, declared in one place."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs
        )
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def params_to_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


def stable_hash(obj: Any) -> str:
    """Hash of a JSON-able object, independent of dict order and Python process."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Stage:
    """Common part of batch and global stages."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Params: ClassVar[type] = NoParams
    #: Resources asked of Ray for each worker of this stage.
    num_cpus: ClassVar[float] = 1.0
    num_gpus: ClassVar[float] = 0.0
    #: Numeric columns the runner sums over the stage's kept and rejected rows into its manifest,
    #: run.json and the funnel (e.g. tokens an LLM stage spent).
    summed_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, params: Any = None, *, stage_name: str | None = None, **overrides: Any
    ) -> None:
        # A pipeline may use one stage class twice (two rank windows); each instance then gets its
        # own name, which names its folder and its command-line flags.
        if stage_name is not None:
            self.name = stage_name
        if params is None:
            params = self.Params()
        if not isinstance(params, self.Params):
            raise TypeError(
                f"{self.name}: params must be {self.Params.__name__}, got {type(params).__name__}"
            )
        if overrides:
            params = dataclasses.replace(params, **overrides)
        self.params = params
        self.check_params()

    def check_params(self) -> None:
        """Raise ValueError for parameter values that can never work (checked before any run)."""

    @property
    def params_hash(self) -> str:
        return stable_hash({"params": params_to_dict(self.params), "version": self.version})

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "kind": "batch" if isinstance(self, BatchStage) else "global",
            "params": params_to_dict(self.params),
            "resources": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


class BatchStage(Stage):
    """Rows in, same rows out, one Arrow batch at a time."""

    #: Rows per call of `process`; None lets Ray pass whole blocks.
    batch_size: ClassVar[int | None] = None
    #: True for stages that load a model in `setup()`: they run as an actor pool.
    uses_model: ClassVar[bool] = False
    #: Actor-pool size bounds (min, max); None: sized to the cluster by the runner.
    concurrency: ClassVar[tuple[int, int] | None] = None

    def setup(self) -> None:
        """Load models and other per-worker state. Called once per worker before any batch."""

    def process(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class GlobalContext:
    """What a global stage may know about its input before it runs (to size shuffles)."""

    num_rows: int
    num_shards: int
    num_cpus: float

    def partitions(self, rows_per_partition: int = 50_000, most: int = 1000) -> int:
        """A shuffle width: enough partitions to keep each small, no more than there is work for."""
        by_rows = -(-self.num_rows // rows_per_partition)
        return int(max(1, min(most, max(by_rows, min(self.num_shards, int(self.num_cpus))))))


class GlobalStage(Stage):
    """Needs every row: written with Ray Data operations, in passes bounded by a block or group."""

    def run(self, ds, ctx: GlobalContext):  # pragma: no cover - abstract
        """Return a Dataset with every input row, rejected rows marked in the `_reject` column."""
        raise NotImplementedError


def put_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """Replace `name` if the table already has it (a re-run over a stage's own output), else
    append it; the field takes the type of `values`."""
    field = pa.field(name, values.type)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), field, values)
    return table.append_column(field, values)


def put_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """`put_column` for each of `columns`, in order."""
    for name, values in columns.items():
        table = put_column(table, name, values)
    return table


def reject(table: pa.Table, mask: Any, reasons: Any) -> pa.Table:
    """Mark rows where `mask` is true as rejected with `reasons` (one string, or one per row).

    A row already rejected keeps its first reason: the earliest rule that fired is the one reported.
    """
    n = table.num_rows
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"reject mask has shape {mask.shape}, expected ({n},)")
    if isinstance(reasons, str):
        new = pa.array(np.where(mask, reasons, None).tolist(), type=pa.string())
    else:
        reasons = list(reasons)
        if len(reasons) != n:
            raise ValueError(f"reject got {len(reasons)} reasons for {n} rows")
        new = pa.array(
            [r if m else None for r, m in zip(reasons, mask, strict=True)], type=pa.string()
        )
    if REJECT_COLUMN in table.column_names:
        old = table.column(REJECT_COLUMN).combine_chunks().cast(pa.string())
        merged = pc.if_else(pc.is_null(old), new, old)
        return table.set_column(table.column_names.index(REJECT_COLUMN), REJECT_COLUMN, merged)
    return table.append_column(REJECT_COLUMN, new)


def beyond(value: float, threshold: float) -> str:
    """`value` for a reason, with enough decimals that it never prints equal to the threshold it
    broke (0.50003 > 0.5 must not read "0.5 > 0.5")."""
    for digits in range(2, 8):
        text = f"{value:.{digits}f}"
        if float(text) != threshold:
            return text.rstrip("0").rstrip(".")
    return repr(value)


def reason_key(reason: str) -> str:
    """The rule and category of a reason, used to group rejections in the funnel.

    Reasons are written `"rule: category (details)"`; the details (ids, scores, sizes) vary per row
    and are left out of the key.
    """
    return reason.split(" (", 1)[0].strip()
