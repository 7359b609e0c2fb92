"""data: stream warren Parquet shards into padded LLaVA training batches.

The path of a row, inside one data-loader worker:

1. **Plan** (`plan_units`): the shards (a folder of `part-*.parquet`, one file, or a list of
   either) are split into units of one row group each, read from the footers alone.
2. **Shard** (`assign_units`): every epoch the units are shuffled with `(seed, epoch)` and dealt
   to ranks, then to each rank's data-loader workers, each time to whoever holds the fewest rows
   so far; every process computes the same plan, so each row goes to exactly one
   (rank, worker) and ranks differ by at most one row group of rows.
3. **Read** (`ParquetFile.iter_batches`, `read_rows` rows at a time, only the columns the template
   needs): memory is bounded by a record batch, never by a file.
4. **Encode** with `ConversationEncoder` (token ids, labels, image tokens expanded). A row is
   skipped and counted when it is malformed (`TemplateError`), when none of its tokens are in
   the loss (`no_loss_tokens`, e.g. the answer lies past `max_length`), or when an image it needs
   has no bytes (`missing_image`) or bytes PIL cannot open (`bad_image`, checked from the header
   here, fully at step 6). Truncated rows are kept and counted (`truncated`, and
   `answer_truncated` when the cut went through an answer).
5. **Mix and group**: a seeded shuffle buffer of `shuffle_buffer` samples mixes rows across row
   groups; then windows of `length_group_batches * batch_size` samples are sorted by their real
   length (text plus expanded image tokens) and cut into batches of neighbours, whose order is
   shuffled. Samples hold their images as compressed bytes up to here.
6. **Decode** the images of one batch only (`stages.images.decode_image`, as every stage sees
   them: orientation, transparency on white, first frame; then the LlavaProcessor's image
   processor), and **collate** (`collate`): right-padded `input_ids` (pad id), `labels`
   (IGNORE_INDEX) and `attention_mask`, and `pixel_values` stacked in the order of the batch's
   image tokens. An image that opened but does not decode drops its sample from the batch
   (counted as `bad_image`), so such a batch is one shorter.

Nothing is dropped silently: every batch carries the counts of its worker since the previous
batch, and `StreamingLoader` adds them up (`stats`), writes every skipped row with its file, row
number and reason to an optional JSON-lines file, and fails the epoch with `DataProblemError`
when the share of skipped rows is above `max_bad_share`. A worker fails as soon as its own skips
alone exceed that share of the whole data set, so a broken data set stops a run early.

Per-rank arguments (`rank`, `world_size`) are here for multi-process training; ranks can end an
epoch with different numbers of batches (row groups differ in size, rows are skipped), which a
distributed loop has to reconcile.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from warren.stages.images import DEFAULT_MAX_PIXELS, bomb_limits, decode_image, size_problem
from warren.stages.run_layout import is_warren_output, open_stage
from warren.stages.schema import KNOWN_TYPES
from warren.stages.shards import Location, list_shards
from warren.trainers.templates import (
    IGNORE_INDEX,
    NO_LOSS_TOKENS,
    ConversationEncoder,
    TemplateError,
)

log = logging.getLogger("warren.trainers.data")

T = TypeVar("T")

# Kinds of skipped rows, as counted in DataStats and written to the problems file.
NO_LOSS = NO_LOSS_TOKENS
MISSING_IMAGE = "missing_image"
BAD_IMAGE = "bad_image"
MALFORMED = "malformed"
SKIP_KINDS = (NO_LOSS, MISSING_IMAGE, BAD_IMAGE, MALFORMED)
EXAMPLES_PER_KIND = 5
_READ_COLUMNS = ("id", "images", "caption", "conversations")


class DataProblemError(ValueError):
    """More rows were skipped than `max_bad_share` allows; the message gives the counts."""


@dataclass(frozen=True)
class ShardUnit:
    """One row group of one shard: the unit that ranks and workers are dealt."""

    file: str  # a local path or a pyarrow filesystem URI
    row_group: int
    num_rows: int
    first_row: int  # the row group's first row within the file, for naming rows in errors


@dataclass
class DataStats:
    """Rows read, samples batched, and what happened to the rest.

    `rows` counts rows read (each epoch reads them again); `samples` the samples that went into
    batches. Skipped rows: `no_loss_tokens`, `missing_image`, `bad_image`, `malformed`. Kept
    rows that lost tokens: `truncated` (all of them), `answer_truncated` (cut inside an answer).
    `examples` holds the first few messages of each skip kind.
    """

    rows: int = 0
    samples: int = 0
    no_loss_tokens: int = 0
    missing_image: int = 0
    bad_image: int = 0
    malformed: int = 0
    truncated: int = 0
    answer_truncated: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(getattr(self, kind) for kind in SKIP_KINDS)

    @property
    def skipped_share(self) -> float:
        return self.skipped / self.rows if self.rows else 0.0

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self) if f.name != "examples")

    def add(self, other: DataStats) -> None:
        for f in fields(self):
            if f.name != "examples":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        for kind, messages in other.examples.items():
            kept = self.examples.setdefault(kind, [])
            kept.extend(messages[: EXAMPLES_PER_KIND - len(kept)])

    def copy(self) -> DataStats:
        out = DataStats()
        out.add(self)
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name != "examples"
        }
        out["skipped"] = self.skipped
        out["skipped_share"] = round(self.skipped_share, 6)
        out["examples"] = {k: list(v) for k, v in self.examples.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataStats:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary(self) -> str:
        counts = ", ".join(f"{kind} {getattr(self, kind)}" for kind in SKIP_KINDS)
        kept = f"truncated {self.truncated} (answer cut in {self.answer_truncated})"
        return f"{self.skipped} of {self.rows} rows skipped ({counts}); kept but {kept}"


def check_skipped_share(stats: DataStats, max_bad_share: float, where: str = "") -> None:
    """Raise DataProblemError when more than `max_bad_share` of the rows read were skipped."""
    if stats.rows and stats.skipped_share > max_bad_share:
        raise DataProblemError(_too_many(stats, max_bad_share, where))


def _too_many(
    stats: DataStats, max_bad_share: float, where: str, total_rows: int | None = None
) -> str:
    first = "; ".join(m for kind in SKIP_KINDS for m in stats.examples.get(kind, [])[:2])
    if total_rows is None:
        verdict = f"{stats.skipped_share:.2%} skipped is above max_bad_share {max_bad_share:.2%}"
    else:
        verdict = (
            f"so far, and {stats.skipped} skipped rows already exceed max_bad_share "
            f"{max_bad_share:.2%} of the {total_rows} rows in the data set"
        )
    return (
        f"{where}{stats.summary()}: {verdict}. First problems: {first or 'none recorded'}. Fix "
        "or filter the data, or raise --max-bad-share to train on what remains"
    )


# --------------------------------------------------------------------------------------------
# Planning and sharding
# --------------------------------------------------------------------------------------------


def shard_files(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The Parquet files of `data`. A warren output, a run folder (its final stage) or a stage
    folder, gives exactly the shards its manifest lists (a stray file beside them is never read);
    any other folder gives the `*.parquet` files directly in it; files are taken as they are."""
    specs = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not specs:
        raise ValueError("no training data given")
    files: list[str] = []
    for spec in specs:
        loc = Location.of(spec)
        if not loc.exists():
            raise FileNotFoundError(f"training data {os.fspath(spec)!r}: no such file or folder")
        if loc.is_dir() and is_warren_output(loc):
            files.extend(open_stage(loc).uris())
        elif loc.is_dir():
            found = list_shards(loc)
            if not found:
                raise FileNotFoundError(
                    f"training data {loc.uri!r}: no .parquet shards directly in this folder; "
                    "give a run's output folder, a stage folder (e.g. OUTPUT/08-sample) or the "
                    "files"
                )
            files.extend(Location(loc.fs, p).uri for p in found)
        else:
            files.append(loc.uri)
    if len(set(files)) != len(files):
        raise ValueError("training data lists a file more than once")
    return files


def plan_units(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[ShardUnit]:
    """Every row group of every shard of `data`, from the Parquet footers alone."""
    units = []
    for file in shard_files(data):
        metadata, schema = _footer(file)
        _check_columns(file, schema)
        first = 0
        for g in range(metadata.num_row_groups):
            n = metadata.row_group(g).num_rows
            if n:
                units.append(ShardUnit(file, g, n, first))
            first += n
    if not units:
        raise ValueError(f"training data {data!r} has no rows")
    return units


def _footer(file: str) -> tuple[pq.FileMetaData, pa.Schema]:
    loc = Location.of(file)
    try:
        with loc.fs.open_input_file(loc.path) as f:
            pf = pq.ParquetFile(f)
            return pf.metadata, pf.schema_arrow
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{file}: not a readable Parquet file ({exc})") from exc


def _check_columns(file: str, schema: pa.Schema) -> None:
    for name in ("id", "images"):
        if name not in schema.names:
            raise ValueError(f"{file}: no {name!r} column; the trainers read canonical rows")
    if "caption" not in schema.names and "conversations" not in schema.names:
        raise ValueError(f"{file}: neither a 'caption' nor a 'conversations' column")
    for name in _READ_COLUMNS:
        if name in schema.names and not schema.field(name).type.equals(KNOWN_TYPES[name]):
            raise ValueError(
                f"{file}: column {name!r} has type {schema.field(name).type}, expected "
                f"{KNOWN_TYPES[name]}"
            )


def assign_units(
    units: Sequence[ShardUnit],
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    num_workers: int = 1,
) -> list[ShardUnit]:
    """The units that data-loader `worker` of `rank` reads in `epoch`, in reading order.

    The same for every caller given the same arguments: the units are permuted with
    `(seed, epoch)`, dealt to ranks and then to workers, each to the one with the fewest rows so
    far (ties to the lowest index), which keeps ranks within one row group of each other.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is outside num_workers {num_workers}")
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    mine = _deal([units[i] for i in order], world_size)[rank]
    return _deal(mine, num_workers)[worker]


def _deal(units: Sequence[ShardUnit], hands: int) -> list[list[ShardUnit]]:
    out: list[list[ShardUnit]] = [[] for _ in range(hands)]
    rows = [0] * hands
    for unit in units:
        k = rows.index(min(rows))
        out[k].append(unit)
        rows[k] += unit.num_rows
    return out


def rank_rows(
    units: Sequence[ShardUnit], *, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> int:
    """Rows that `rank` reads in `epoch` (before skips): what a step budget is planned from."""
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    return sum(u.num_rows for u in _deal([units[i] for i in order], world_size)[rank])


def iter_rows(
    units: Iterable[ShardUnit], columns: Sequence[str] = _READ_COLUMNS, read_rows: int = 64
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every row of `units` in order; `where` is "file:row" (the row's number
    in its file). Only `columns` that the file has are read."""
    for unit in units:
        loc = Location.of(unit.file)
        with loc.fs.open_input_file(loc.path) as f:
            pf = pq.ParquetFile(f)
            present = [c for c in columns if c in pf.schema_arrow.names]
            row = unit.first_row
            for batch in pf.iter_batches(
                batch_size=read_rows, row_groups=[unit.row_group], columns=present
            ):
                for record in batch.to_pylist():
                    yield f"{unit.file}:{row}", record
                    row += 1


# --------------------------------------------------------------------------------------------
# Mixing, grouping, collating
# --------------------------------------------------------------------------------------------


def shuffle_buffer(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Yield `items` in an order mixed within a window of `size` (0 or 1: as they come)."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = int(rng.integers(size))
        yield buffer[k]
        buffer[k] = item
    for k in rng.permutation(len(buffer)):
        yield buffer[k]


def group_by_length(
    items: Iterable[T],
    batch_size: int,
    window_batches: int,
    rng: np.random.Generator,
    length: Callable[[T], int] = len,
) -> Iterator[list[T]]:
    """Batches of items of similar length: each window of `window_batches * batch_size` items
    is sorted by `length` (stably) and cut into consecutive batches, whose order is shuffled.
    Only the last batch of the stream can be short."""
    if batch_size < 1 or window_batches < 1:
        raise ValueError("batch_size and window_batches must be at least 1")
    window: list[T] = []
    size = batch_size * window_batches
    for item in items:
        window.append(item)
        if len(window) == size:
            yield from _cut(window, batch_size, rng, length)
            window = []
    if window:
        yield from _cut(window, batch_size, rng, length)


def _cut(
    window: list[T], batch_size: int, rng: np.random.Generator, length: Callable[[T], int]
) -> Iterator[list[T]]:
    ordered = sorted(window, key=length)
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    for k in rng.permutation(len(batches)):
        yield batches[k]


def collate(
    samples: Sequence[Any], pad_token_id: int, pixel_values: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` with `pad_token_id`, `labels` with IGNORE_INDEX and
    `attention_mask` with 0 to the longest sample; `samples` have `input_ids` and `labels`.
    `pixel_values` (one row per image, in the order the images' tokens appear) is passed on."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(s.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    return batch


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamOptions:
    """How a LlavaStream reads, mixes and batches; every field has the default the trainer uses."""

    batch_size: int = 16
    seed: int = 0
    shuffle_buffer: int = 1024  # samples (token ids plus compressed image bytes) per worker
    length_group_batches: int = 16  # batches per length-sorting window; 1 turns grouping off
    max_bad_share: float = 0.01
    read_rows: int = 64  # rows per Parquet record batch
    rank: int = 0
    world_size: int = 1


@dataclass
class _Pending:
    sample: Any  # EncodedSample
    images: list[bytes]
    where: str

    @property
    def length(self) -> int:
        return len(self.sample.input_ids)


@dataclass
class _Tally:
    """A worker's counts: for the epoch (the early failure check) and since its last batch."""

    epoch: DataStats = field(default_factory=DataStats)
    pending: DataStats = field(default_factory=DataStats)
    problems: list[dict[str, str]] = field(default_factory=list)

    def count(self, name: str, n: int = 1) -> None:
        for stats in (self.epoch, self.pending):
            setattr(stats, name, getattr(stats, name) + n)

    def skip(self, kind: str, row_id: str, where: str, reason: str) -> None:
        self.count(kind)
        message = f"row {row_id!r} ({where}): {reason}"
        for stats in (self.epoch, self.pending):
            examples = stats.examples.setdefault(kind, [])
            if len(examples) < EXAMPLES_PER_KIND:
                examples.append(message)
        self.problems.append({"kind": kind, "id": row_id, "where": where, "reason": reason})

    def take(self) -> tuple[DataStats, list[dict[str, str]]]:
        out = self.pending, self.problems
        self.pending, self.problems = DataStats(), []
        return out


class LlavaStream(IterableDataset):
    """Padded training batches from Parquet shards, for one rank; an IterableDataset whose
    items are already batches (use it with `batch_size=None`, or through StreamingLoader).

    Each item is a dict: `worker`, `index` (the batch's number in this worker's epoch, counting
    batches whose every image failed to decode; -1 for a final counts-only item), `stats` and
    `problems` (what the worker counted since its previous item), and, except in a counts-only
    item, `inputs` (the model's keyword arguments), `ids`, `num_tokens` (attended positions)
    and `num_loss_tokens` (positions the shifted loss counts).
    """

    def __init__(
        self,
        data: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[ShardUnit],
        encoder: ConversationEncoder,
        image_processor: Any,
        pad_token_id: int,
        options: StreamOptions | None = None,
    ):
        options = options or StreamOptions()
        if isinstance(data, Sequence) and data and isinstance(data[0], ShardUnit):
            self.units = list(data)
        else:
            self.units = plan_units(data)  # type: ignore[arg-type]
        if options.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {options.batch_size}")
        if not 0 <= options.max_bad_share <= 1:
            raise ValueError(f"max_bad_share must be within [0, 1], got {options.max_bad_share}")
        if len(self.units) < options.world_size:
            raise ValueError(
                f"{len(self.units)} row groups cannot give each of {options.world_size} ranks "
                "data; write the shards with more, smaller row groups"
            )
        self.encoder = encoder
        self.image_processor = image_processor
        self.pad_token_id = pad_token_id
        self.options = options
        self.total_rows = sum(u.num_rows for u in self.units)
        self.epoch = 0
        self.skip: dict[int, int] = {}

    def set_epoch(self, epoch: int, skip: Mapping[int, int] | None = None) -> None:
        """Read `epoch` next; `skip` {worker: n} passes over each worker's first n batches
        without decoding them (resuming inside an epoch)."""
        self.epoch = epoch
        self.skip = dict(skip or {})

    def rank_rows(self, epoch: int | None = None) -> int:
        o = self.options
        return rank_rows(
            self.units,
            seed=o.seed,
            epoch=self.epoch if epoch is None else epoch,
            rank=o.rank,
            world_size=o.world_size,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None:
            return self.iter_worker(0, 1)
        return self.iter_worker(info.id, info.num_workers)

    def iter_worker(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """The items of data-loader `worker` of `num_workers` for the current epoch."""
        o = self.options
        units = assign_units(
            self.units,
            seed=o.seed,
            epoch=self.epoch,
            rank=o.rank,
            world_size=o.world_size,
            worker=worker,
            num_workers=num_workers,
        )
        # One generator per (seed, epoch, rank, worker): the order a worker reads in depends on
        # nothing else, so a resumed run sees the batches the interrupted one would have.
        rng = np.random.default_rng([o.seed, self.epoch, o.rank, worker, 1])
        tally = _Tally()
        samples = self._samples(units, tally)
        mixed = shuffle_buffer(samples, o.shuffle_buffer, rng)
        batches = group_by_length(
            mixed, o.batch_size, o.length_group_batches, rng, lambda p: p.length
        )
        # `index` numbers the batches as they are formed, before decoding, so that skipping the
        # first n on resume (without decoding them) lands where the interrupted run stopped.
        skip = self.skip.get(worker, 0)
        for index, pending in enumerate(batches):
            if index < skip:
                tally.count("samples", len(pending))
                continue
            item = self._batch(pending, tally)
            if item is None:
                continue
            stats, problems = tally.take()
            yield {"worker": worker, "index": index, "stats": stats, "problems": problems, **item}
        stats, problems = tally.take()
        if not stats.is_empty() or problems:
            yield {"worker": worker, "index": -1, "stats": stats, "problems": problems}

    def _samples(self, units: list[ShardUnit], tally: _Tally) -> Iterator[_Pending]:
        limit = self.options.max_bad_share * self.total_rows
        for where, row in iter_rows(units, _READ_COLUMNS, self.options.read_rows):
            tally.count("rows")
            pending = self._encode(where, row, tally)
            if tally.epoch.skipped > limit:
                # This worker's skips alone put the whole data set over the limit: stop now
                # rather than after an epoch of training on it.
                raise DataProblemError(
                    _too_many(
                        tally.epoch,
                        self.options.max_bad_share,
                        "one data worker: ",
                        self.total_rows,
                    )
                )
            if pending is not None:
                yield pending

    def _encode(self, where: str, row: dict[str, Any], tally: _Tally) -> _Pending | None:
        row_id = str(row.get("id"))
        try:
            sample = self.encoder.encode(row)
        except TemplateError as exc:
            tally.skip(MALFORMED, row_id, where, str(exc).split(": ", 1)[-1])
            return None
        if sample.status == NO_LOSS_TOKENS:
            why = "answer past max_length" if sample.truncated else "empty answer"
            tally.skip(NO_LOSS, row_id, where, f"no tokens in the loss ({why})")
            return None
        images = []
        for k, image in enumerate((row.get("images") or [])[: sample.num_images]):
            data = (image or {}).get("bytes")
            if not data:
                path = (image or {}).get("path")
                tally.skip(MISSING_IMAGE, row_id, where, f"image {k} has no bytes (path {path!r})")
                return None
            problem = _header_problem(data)
            if problem:
                tally.skip(BAD_IMAGE, row_id, where, f"image {k}: {problem}")
                return None
            images.append(data)
        if sample.truncated:
            tally.count("truncated")
        if sample.answer_truncated:
            tally.count("answer_truncated")
        return _Pending(sample, images, where)

    def _batch(self, pending: list[_Pending], tally: _Tally) -> dict[str, Any] | None:
        kept, pictures = [], []
        for p in pending:
            try:
                decoded = [_decode(data) for data in p.images]
            except Exception as exc:  # PIL raises many types for broken data
                tally.skip(BAD_IMAGE, p.sample.id, p.where, f"does not decode: {_reason(exc)}")
                continue
            kept.append(p.sample)
            pictures.extend(decoded)
        if not kept:
            return None
        tally.count("samples", len(kept))
        pixel_values = None
        if pictures:
            pixel_values = self.image_processor(images=pictures, return_tensors="pt")[
                "pixel_values"
            ]
        inputs = collate(kept, self.pad_token_id, pixel_values)
        return {
            "inputs": inputs,
            "ids": [s.id for s in kept],
            "num_tokens": int(inputs["attention_mask"].sum()),
            "num_loss_tokens": int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()),
        }


def _header_problem(data: bytes) -> str | None:
    try:
        # The header only, with the stages' bomb limit (not PIL's smaller default, which would
        # refuse the large genuine photographs image_check kept).
        with bomb_limits(None), Image.open(io.BytesIO(data)) as image:
            too_many = size_problem(*image.size, DEFAULT_MAX_PIXELS)
    except Exception as exc:  # PIL raises many types for bytes that are not an image
        return f"not an image PIL can open: {_reason(exc)}"
    return f"too many pixels: {too_many}" if too_many else None


def _decode(data: bytes) -> Image.Image:
    # The one way every stage sees an image, so the model trains on the pixels curation judged.
    return decode_image(data)


def _reason(exc: BaseException) -> str:
    # PIL names the BytesIO it read by its address, which would differ from run to run.
    text = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", " ".join(str(exc).split()))
    return f"{type(exc).__name__}: {text}"[:300]


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One training batch, as StreamingLoader yields it."""

    inputs: dict[str, torch.Tensor]
    ids: list[str]
    num_tokens: int
    num_loss_tokens: int
    worker: int
    index: int


def _as_is(item: Any) -> Any:
    return item


class StreamingLoader:
    """Runs a LlavaStream through a torch DataLoader with `num_workers` worker processes and
    keeps the books: `stats` (all epochs), `epoch_stats`, and `positions` ({worker: batches
    consumed} in the current epoch, which resuming passes back to `set_epoch`). Skipped rows
    are logged and, when `problems_path` is given, appended to it as JSON lines."""

    def __init__(
        self,
        stream: LlavaStream,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        problems_path: str | os.PathLike | None = None,
    ):
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.problems_path = problems_path
        self.stats = DataStats()
        self.epoch_stats = DataStats()
        self.positions: dict[int, int] = {}
        self._logged: dict[str, int] = {}
        if num_workers > 0:
            # Workers are forked after the tokenizer has run; its own thread pool would
            # deadlock in them.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def set_epoch(self, epoch: int, skip: Mapping[int, int] | None = None) -> None:
        self.stream.set_epoch(epoch, skip)

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_as_is,
            pin_memory=self.pin_memory,
            # Its own generator: by default an iterator takes its seed from torch's global one,
            # which would shift the trainer's dropout draws at every epoch (and on resume).
            generator=torch.Generator().manual_seed(self.stream.options.seed),
        )
        self.epoch_stats = DataStats()
        self.positions = dict(self.stream.skip)
        for item in loader:
            self._account(item["stats"], item["problems"])
            if "inputs" not in item:
                continue
            self.positions[item["worker"]] = item["index"] + 1
            yield Batch(
                item["inputs"],
                item["ids"],
                item["num_tokens"],
                item["num_loss_tokens"],
                item["worker"],
                item["index"],
            )
        check_skipped_share(
            self.epoch_stats, self.stream.options.max_bad_share, f"epoch {self.stream.epoch}: "
        )

    def _account(self, stats: DataStats, problems: list[dict[str, str]]) -> None:
        self.epoch_stats.add(stats)
        self.stats.add(stats)
        for p in problems:
            seen = self._logged.get(p["kind"], 0)
            self._logged[p["kind"]] = seen + 1
            if seen < EXAMPLES_PER_KIND:
                log.warning(
                    "skipped %s row %r (%s): %s", p["kind"], p["id"], p["where"], p["reason"]
                )
            elif seen == EXAMPLES_PER_KIND:
                log.warning("further %s rows are counted without logging each", p["kind"])
        if problems and self.problems_path is not None:
            with open(self.problems_path, "a", encoding="utf-8") as f:
                for p in problems:
                    f.write(json.dumps({"epoch": self.stream.epoch, **p}) + "\n")
