"""The stage contract.

A stage is a small class with a stable `name`, a `version` (bump it when its output changes
meaning), one parameter dataclass (`Params`, hashed into the cache key and turned into command-line
flags), the resources it asks Ray for, and one of two shapes:

- `BatchStage.process(batch: pyarrow.Table) -> pyarrow.Table`: one Arrow batch in, the same rows
  out (same order), with the columns the stage adds. `setup()` runs once per Ray worker (load a
  model there, never per batch). Runs through `Dataset.map_batches`; `uses_model = True` makes it
  an actor pool.
- `GlobalStage.run(ds) -> ds`: needs all rows (dedup, ranks, balancing); written with Ray Data
  operations whose memory is bounded by a block or a group, never by the dataset. It decides on
  narrow rows: `ds` holds only `id`, the input position and the stage's `decision_columns()`
  (after its per-piece `prepare`, e.g. hashing image bytes); the runner applies the decisions (the
  `_reject` column and the columns the stage added) to the wide rows in one streaming pass.

Stages never drop rows. To reject a row a stage sets the `_reject` column (see `reject`) to a
reason of the form `"rule: detail"`; the runner moves such rows to the rejected ledger and checks,
for every stage, rows in = kept + rejected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.schema import REJECT_COLUMN, column_type

#: The input position of each row of a global stage's input (int64, set by the runner). A global
#: stage returns it with every other column; the runner writes the output in input order by it,
#: and a stage may use it to order rows deterministically (ties, groups).
POSITION_COLUMN = "_pos"

#: In `GlobalStage.decision_columns()`: the `images` column without the image bytes (each
#: image's other fields, so list lengths and paths), read from Parquet without touching the bytes.
IMAGES_WITHOUT_BYTES = "images (without bytes)"


@dataclasses.dataclass(frozen=True)
class NoParams:
    """A stage without parameters."""


#: The kinds of threshold a parameter can be (its `threshold` metadata): an absolute lower or upper
#: bound the stage's rule puts on a column (a filter's bound on the rows it keeps, a dedup's bound
#: on the distance of the copies it removes), or one end of a window of ranks (fractions of the
#: rows, rank 0 = the first row in the stage's order).
THRESHOLD_KINDS = ("min", "max", "rank_lo", "rank_hi")


def param(
    default: Any,
    help: str,
    *,
    threshold: str | None = None,
    column: str | None = None,
    off: Any = None,
    fingerprint: bool = True,
    **kwargs: Any,
) -> Any:
    """A stage parameter: its default and its documentation, declared in one place.

    A parameter that is a threshold says so: `threshold` is its kind (THRESHOLD_KINDS), `column`
    the column it acts on, `off` a value that turns it off (no line is drawn for it). The report
    draws thresholds from this metadata (through `Stage.thresholds`, saved in the manifest).
    `fingerprint=False` leaves it out of the cache key: a value that changes no result (a path).
    """
    metadata: dict[str, Any] = {"help": help}
    if not fingerprint:
        metadata["fingerprint"] = False
    if threshold is not None:
        if threshold not in THRESHOLD_KINDS:
            raise ValueError(f"threshold must be one of {THRESHOLD_KINDS}, got {threshold!r}")
        metadata.update(threshold=threshold, column=column, off=off)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata=metadata, **kwargs
        )
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclasses.dataclass(frozen=True)
class Threshold:
    """One threshold a stage applies: parameter `param` of kind `kind` on `column` at `value`.

    Rank windows (`rank_lo`, `rank_hi`) keep ranks [lo, hi) of the column, rank 0 the highest
    value when `descending`."""

    param: str
    kind: str
    column: str
    value: float
    descending: bool = True


@dataclasses.dataclass(frozen=True)
class Resources:
    """What each worker of a stage asks Ray for. A class declares its defaults as a class
    attribute; every instance holds its own copy (set per stage from the command line:
    `--embed.num_gpus 0.5 --embed.concurrency 8 --embed.batch_size 256`)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: Rows per call of `process` (batch stages); None lets the runner choose.
    batch_size: int | None = None
    #: Actor-pool size bounds (min, max) (batch stages with a model); None: sized to the cluster.
    concurrency: tuple[int, int] | None = None

    def replace(self, **changes: Any) -> Resources:
        """A copy with `changes`, checked: names are resources, values make sense."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(
                f"unknown resource {unknown[0]!r}; known: num_cpus, num_gpus, batch_size, "
                "concurrency"
            )
        values = {**dataclasses.asdict(self), **changes}
        if isinstance(values["concurrency"], int):
            values["concurrency"] = (values["concurrency"], values["concurrency"])
        elif values["concurrency"] is not None:
            values["concurrency"] = tuple(int(v) for v in values["concurrency"])
        resources = Resources(**values)
        resources.check()
        return resources

    def check(self) -> None:
        if not (0 <= self.num_cpus < np.inf and 0 <= self.num_gpus < np.inf):  # nan fails too
            raise ValueError(f"num_cpus and num_gpus must be finite and >= 0, got {self}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.concurrency is not None:
            lo, hi = self.concurrency
            if not 1 <= lo <= hi:
                raise ValueError(f"concurrency must be 1 <= min <= max, got {self.concurrency}")


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
    #: The default resources of each worker; an instance's own are `self.resources`.
    resources: Resources = Resources()
    #: Columns the stage reads that not every row has from ingest (the core columns of
    #: schema.CORE_FIELDS always exist): an earlier stage, or the input, must add them.
    requires: ClassVar[tuple[str, ...]] = ()
    #: Columns the stage adds to every row; their types come from the schema module.
    adds: ClassVar[tuple[str, ...]] = ()
    #: Numeric columns the runner sums over the stage's kept and rejected rows into its manifest,
    #: run.json and the funnel (e.g. tokens an LLM stage spent).
    summed_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        params: Any = None,
        *,
        stage_name: str | None = None,
        resources: Mapping[str, Any] | None = None,
        **overrides: Any,
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
        # The instance's own copy: the class default, then what the parameters imply, then what
        # the user asked for. Resources are not in the cache key (they change no output).
        if resources and not isinstance(self, BatchStage):
            # A global stage's Ray Data operations size themselves to the cluster: a value given
            # here would be accepted and do nothing.
            raise ValueError(
                f"{self.name}: a global stage sizes its work to the cluster and takes no resources "
                f"(given: {', '.join(sorted(resources))})"
            )
        self.resources = self.default_resources().replace(**dict(resources or {}))

    def check_params(self) -> None:
        """Raise ValueError for parameter values that can never work (checked before any run)."""

    def default_resources(self) -> Resources:
        """The resources this instance needs before the user's overrides: the class default,
        which a stage whose needs depend on its parameters (a backend, a device) adapts."""
        return type(self).resources

    @property
    def num_cpus(self) -> float:
        return self.resources.num_cpus

    @property
    def num_gpus(self) -> float:
        return self.resources.num_gpus

    @property
    def batch_size(self) -> int | None:
        return self.resources.batch_size

    @property
    def concurrency(self) -> tuple[int, int] | None:
        return self.resources.concurrency

    def required_columns(self) -> tuple[str, ...]:
        """Columns this instance reads beyond the core ones (may depend on its parameters)."""
        return tuple(self.requires)

    def added_columns(self) -> dict[str, Any]:
        """Columns this instance adds, with their Arrow types from the schema module (an
        embedding's width depends on the model: its type is then the string
        "fixed_size_list<halffloat>[model width]")."""
        return {name: column_type(name) for name in self.adds}

    def thresholds(self) -> list[Threshold]:
        """The thresholds this instance applies, from its parameters' `threshold` metadata; a
        stage whose column depends on its parameters (a rank window's `column`) overrides it."""
        out = []
        for field in dataclasses.fields(self.params):
            kind = field.metadata.get("threshold")
            value = getattr(self.params, field.name)
            if kind is None or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if field.metadata.get("off") is not None and value == field.metadata["off"]:
                continue
            column = field.metadata.get("column") or getattr(self.params, "column", None)
            if column:
                descending = bool(getattr(self.params, "descending", True))
                out.append(Threshold(field.name, kind, column, float(value), descending))
        return out

    @property
    def params_hash(self) -> str:
        params = params_to_dict(self.params)
        for field in dataclasses.fields(self.params):
            if field.metadata.get("fingerprint") is False:
                del params[field.name]
        return stable_hash({"params": params, "version": self.version})

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "kind": "batch" if isinstance(self, BatchStage) else "global",
            "params": params_to_dict(self.params),
            "resources": dataclasses.asdict(self.resources),
            "requires": list(self.required_columns()),
            "adds": {k: str(v) for k, v in self.added_columns().items()},
            "thresholds": [dataclasses.asdict(t) for t in self.thresholds()],
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


class BatchStage(Stage):
    """Rows in, same rows out, one Arrow batch at a time."""

    #: True for stages that load a model in `setup()`: they run as an actor pool.
    uses_model: ClassVar[bool] = False

    def setup(self) -> None:
        """Load models and other per-worker state. Called once per worker before any batch."""

    def process(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError


def gpu_share(num_gpus: float, num_cpus: float) -> float:
    """A task's share of a GPU when every CPU runs one task and the GPUs are split evenly among
    them (0 without GPUs; at most one whole GPU)."""
    if num_gpus <= 0:
        return 0.0
    return min(1.0, num_gpus / max(1.0, num_cpus))


@dataclasses.dataclass(frozen=True)
class GlobalContext:
    """What a global stage may know about its input before it runs (to size shuffles), and where
    it may keep finished parts of its decision (`checkpoint`, a `stages.shards.Location`, or None
    outside the runner) so that a run interrupted half way resumes from them."""

    num_rows: int
    num_shards: int
    num_cpus: float
    checkpoint: Any = None
    #: True in the runner, which takes from `run`'s output only `_reject` and the columns the
    #: stage adds (by position): a stage may then drop a wide decision column once it has read it
    #: (an embedding turned into a score), so its later passes and Ray's object store carry less.
    #: False outside the runner (`run_rows`), where every input column must come back.
    decisions_only: bool = False
    #: GPUs in the cluster: a stage whose decision is arithmetic a GPU does better (semdedup's
    #: pair screen) asks for a share of one per task (`gpu_share`).
    num_gpus: float = 0.0

    def gpu_share(self) -> float:
        """`gpu_share` of this cluster's GPUs and CPUs."""
        return gpu_share(self.num_gpus, self.num_cpus)

    def partitions(self, rows_per_partition: int = 50_000, most: int = 1000) -> int:
        """A shuffle width: enough partitions to keep each small, no more than there is work for."""
        by_rows = -(-self.num_rows // rows_per_partition)
        return int(max(1, min(most, max(by_rows, min(self.num_shards, int(self.num_cpus))))))


class GlobalStage(Stage):
    """Needs every row: written with Ray Data operations, in passes bounded by a block or group.

    Decide narrow, apply wide: the runner reads only `id` and `decision_columns()` of the input
    (Parquet column projection: image bytes are not read unless named), passes each piece through
    `prepare` when the stage has one (`prepares = True`; unless `keeps_prepared` is False its
    output is kept on disk so that a resumed run does not redo it), and gives `run` a Dataset of
    those narrow rows. `run` returns every row with `_reject` set on rejected rows and the columns
    it adds; the runner then reads the wide rows piece by piece, sets those columns on them and
    writes them. Image bytes never enter a shuffle or Ray's object store."""

    #: True when `prepare` turns each piece of decision columns into the narrow rows `run` sees.
    prepares: ClassVar[bool] = False
    #: False when `prepare` is cheaper than keeping its output (a dot product, not hashing image
    #: bytes): it then runs inside each narrow read task, so what leaves the task (into Ray's
    #: object store) is only its small output, and a resumed run prepares again.
    keeps_prepared: ClassVar[bool] = True
    #: True when the decision is a small state fitted on the narrow rows (k-means centroids, say)
    #: and then a function of each row alone. Such a stage gives `fit` and `transform` instead of
    #: `run`: the runner fits on the narrow rows and transforms each piece of wide rows as it
    #: writes them, so the rows are not read once more to decide and no per-row decisions are
    #: regrouped; the fitted state is kept on disk so that a resumed run does not fit again.
    fits: ClassVar[bool] = False
    #: True when a fitted stage's `transform` is arithmetic a GPU does better (cluster's nearest
    #: centroid among many): where the cluster has GPUs, each apply task then holds an even share
    #: of one (`GlobalContext.gpu_share`), and the transform finds it.
    transform_uses_gpu: ClassVar[bool] = False

    def decision_columns(self) -> tuple[str, ...]:
        """The input columns the decision reads (`id` always comes too); a name the input lacks is
        left out (the stage's own checks then name it). `IMAGES_WITHOUT_BYTES` reads the image
        list without its bytes. Default: the stage's `required_columns()`."""
        return self.required_columns()

    def prepare(self, table: pa.Table) -> pa.Table:
        """One piece of decision columns in, the narrow rows `run` decides on out (same rows,
        same order; keep `id` and the position column, drop what the decision does not need)."""
        return table

    def run(self, ds, ctx: GlobalContext):
        """Return a Dataset with every input row, rejected rows marked in the `_reject` column.
        A stage that `fits` need not write it: `fit`, then `transform` on every block."""
        if not self.fits:  # pragma: no cover - abstract
            raise NotImplementedError
        state = self.fit(ds, ctx)
        return ds.map_batches(
            transform_batch, fn_args=(self, state, ctx.decisions_only), batch_format="pyarrow"
        )

    def fit(self, ds, ctx: GlobalContext) -> Any:  # pragma: no cover - abstract
        """For a stage that `fits`: the state `transform` needs, from the narrow rows `ds` (small
        and picklable: the runner keeps it on disk)."""
        raise NotImplementedError

    def transform(
        self, table: pa.Table, state: Any, drop: bool = False
    ) -> pa.Table:  # pragma: no cover - abstract
        """For a stage that `fits`: every row of `table` with the stage's columns and `_reject`
        set from `state`, each row's the same in any batch (the runner gives it the wide rows,
        piece by piece). With `drop` it may leave out a decision column it read."""
        raise NotImplementedError

    def run_rows(self, ds, ctx: GlobalContext):
        """The stage on a Dataset of whole rows outside the runner (tests, notebooks): `prepare`
        mapped over its blocks, then `run`."""
        if self.prepares:
            ds = ds.map_batches(self.prepare, batch_format="pyarrow")
        return self.run(ds, ctx)


def transform_batch(batch: pa.Table, stage: GlobalStage, state: Any, drop: bool) -> pa.Table:
    """`stage.transform` as a Ray Data batch function."""
    return stage.transform(batch, state, drop)


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
