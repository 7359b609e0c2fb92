"""unique_ids: ids are unique per run, decided on the narrow id column and applied to wide rows.

Ingest runs in two steps inside `OUTPUT/00-ingest/`:

1. the readers write each input unit's rows under `_read/`, every row carrying its record index
   in its unit (`_record`: the position among everything the reader yielded for that unit,
   rejected records included);
2. `decide` reads only `id` and `_record` of the kept rows, groups them by id with plain Ray tasks
   (`stages.shuffle.map_groups`) and writes one small decision per repeated id under `_ids/`:
   which occurrence it is and where the first one was. "First" is first in input order (the
   reader's unit order, then the record order), never in completion order. `apply_unit` then
   rewrites one unit's pieces, in one streaming pass, into the stage's own folder: a repeated id
   becomes a rejected row with reason `ingest: duplicate id (first seen at FILE:INDEX)` (FILE is
   the unit key, the input file relative to the input root; INDEX its record index there), or,
   with `on_duplicate_id="suffix"`, a kept row with id `ID#2`, `ID#3`, ... and the id it came with
   in `original_id`. A suffixed id that another input row already carries is rejected as a
   duplicate instead, so no two kept rows ever share an id.

Image bytes are read only by `apply_unit`, one piece at a time; they never enter the shuffle.
In suffix mode the decisions (one narrow row per repeated id) are gathered once on the driver to
find suffixes that collide; in reject mode nothing but counts reaches the driver.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from warren.stages.base import reject
from warren.stages.ledger import commit_piece, mark_source_done
from warren.stages.run_layout import REJECTED_DIR
from warren.stages.schema import REASON_COLUMN, REJECT_COLUMN
from warren.stages.shards import Location, list_shards, write_table_atomic

RECORD_COLUMN = "_record"
ORIGINAL_ID_COLUMN = "original_id"
ON_DUPLICATE_ID = ("reject", "suffix")
RAW_DIR = "_read"
IDS_DIR = "_ids"
IDS_DONE = "_done.json"
REASON = "ingest: duplicate id"

_NARROW = pa.schema([("id", pa.string()), ("unit", pa.int64()), ("record", pa.int64())])
_DECISIONS = pa.schema(
    [
        ("unit", pa.int64()),
        ("record", pa.int64()),
        ("first_seen", pa.string()),
        ("new_id", pa.string()),
    ]
)


def with_records(table: pa.Table, start: int) -> pa.Table:
    """`table` with its rows' record indices in their unit, from `start` on."""
    return table.append_column(
        RECORD_COLUMN, pa.array(np.arange(start, start + table.num_rows, dtype=np.int64))
    )


def check_mode(mode: str) -> None:
    if mode not in ON_DUPLICATE_ID:
        raise ValueError(
            f"on_duplicate_id must be one of {', '.join(ON_DUPLICATE_ID)}, got {mode!r} "
            "(--on-duplicate-id)"
        )


# --------------------------------------------------------------------------------------------
# Decide: narrow rows (id, unit, record) grouped by id.


def _narrow(fs: Any, files: list[tuple[str, int]]) -> pa.Table:
    tables = []
    for path, unit in files:
        with fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=["id", RECORD_COLUMN])
        tables.append(
            pa.table(
                {
                    "id": t.column("id").cast(pa.string()),
                    "unit": pa.array(np.full(t.num_rows, unit, dtype=np.int64)),
                    "record": t.column(RECORD_COLUMN).cast(pa.int64()),
                }
            )
        )
    return pa.concat_tables(tables) if tables else _NARROW.empty_table()


def _order(table: pa.Table, a: int, b: int) -> list[int]:
    unit = table.column("unit").to_numpy()[a:b]
    record = table.column("record").to_numpy()[a:b]
    return (a + np.lexsort((record, unit))).tolist()


def _first_seen(
    table: pa.Table, bounds: list[tuple[int, int]], keys: list[str], mode: str
) -> pa.Table:
    """One decision per occurrence after the first, for each id group of a sorted partition."""
    rows: dict[str, list] = {name: [] for name in _DECISIONS.names}
    if table.num_rows:
        ids = table.column("id")
        valid = pc.is_valid(ids).to_numpy(zero_copy_only=False)
        units = table.column("unit").to_numpy()
        records = table.column("record").to_numpy()
        for a, b in bounds:
            if b - a < 2 or not valid[a]:
                continue
            order = _order(table, a, b)
            first = order[0]
            where = f"{keys[units[first]]}:{records[first]}"
            for n, i in enumerate(order[1:], 2):
                rows["unit"].append(int(units[i]))
                rows["record"].append(int(records[i]))
                rows["first_seen"].append(where)
                rows["new_id"].append(f"{ids[i].as_py()}#{n}" if mode == "suffix" else None)
    return pa.table(rows, schema=_DECISIONS)


def _collisions(table: pa.Table, bounds: list[tuple[int, int]], keys: list[str]) -> pa.Table:
    """Suffix mode, second pass: a new id that an input row already carries is a duplicate."""
    rows: dict[str, list] = {name: [] for name in _DECISIONS.names}
    if table.num_rows:
        is_new = table.column("new").to_numpy(zero_copy_only=False)
        units = table.column("unit").to_numpy()
        records = table.column("record").to_numpy()
        for a, b in bounds:
            if b - a < 2 or not is_new[a:b].any() or is_new[a:b].all():
                continue
            old = [i for i in _order(table, a, b) if not is_new[i]]
            where = f"{keys[units[old[0]]]}:{records[old[0]]}"
            for i in range(a, b):
                if is_new[i]:
                    rows["unit"].append(int(units[i]))
                    rows["record"].append(int(records[i]))
                    rows["first_seen"].append(where)
                    rows["new_id"].append(None)
    return pa.table(rows, schema=_DECISIONS)


def _as_new_rows(decisions: pa.Table) -> pa.Table:
    d = decisions.filter(pc.is_valid(decisions.column("new_id")))
    return pa.table(
        {
            "id": d.column("new_id"),
            "unit": d.column("unit"),
            "record": d.column("record"),
            "new": pa.array(np.ones(d.num_rows, bool)),
        }
    )


def _as_old_rows(narrow: pa.Table) -> pa.Table:
    return narrow.append_column("new", pa.array(np.zeros(narrow.num_rows, bool)))


def _resolve(first: pa.Table, second: pa.Table) -> pa.Table:
    """Suffix decisions with the colliding ones turned into rejections."""
    if not second.num_rows:
        return first
    clash = {
        (u, r): w
        for u, r, w in zip(
            *(second.column(c).to_pylist() for c in ("unit", "record", "first_seen")), strict=True
        )
    }
    units, records = first.column("unit").to_pylist(), first.column("record").to_pylist()
    hit = [(u, r) in clash for u, r in zip(units, records, strict=True)]
    seen = [
        clash.get((u, r), w)
        for u, r, w in zip(units, records, first.column("first_seen").to_pylist(), strict=True)
    ]
    new_id = [
        None if h else v for h, v in zip(hit, first.column("new_id").to_pylist(), strict=True)
    ]
    return pa.table(
        {"unit": units, "record": records, "first_seen": seen, "new_id": new_id}, schema=_DECISIONS
    )


def _block_refs(ds: Any) -> list:
    """The Arrow blocks of `ds`, streamed: `to_arrow_refs` would run the plan eagerly and warn
    that no CPU is free while the group tasks it waits for hold them."""
    return [ref for bundle in ds.iter_internal_ref_bundles() for ref in bundle.block_refs]


def _write_decisions(table: pa.Table, loc: Location) -> int:
    table = table.sort_by([("unit", "ascending"), ("record", "ascending")])
    write_table_atomic(table, loc)
    return table.num_rows


def decide(
    out: Location,
    files: list[tuple[str, int]],
    keys: list[str],
    mode: str,
    num_rows: int,
    num_cpus: float,
) -> int:
    """Write the decisions for the kept raw files `files` ((path, unit index) in input order)
    under `out/_ids/`; returns how many rows are repeated ids. Resumes: done once, kept."""
    import ray

    from warren.stages.shuffle import map_groups

    ids_dir = out.join(IDS_DIR)
    done = ids_dir.join(IDS_DONE)
    if done.exists():
        return done.read_json()["duplicates"]
    ids_dir.rmtree()
    ids_dir.mkdir()
    tasks = max(1, min(len(files), int(num_cpus) * 2))
    bounds = np.linspace(0, len(files), tasks + 1).round().astype(int)
    narrow = ray.remote(_narrow).options(num_cpus=0.25)
    refs = [narrow.remote(out.fs, files[bounds[t] : bounds[t + 1]]) for t in range(tasks)]
    # Wait for the tasks here: a Dataset built over running tasks warns that no CPU is free.
    ray.wait(refs, num_returns=len(refs), fetch_local=False)
    parts = max(1, int(num_cpus) * 2)
    grouped = dict(num_partitions=parts, num_rows=num_rows, num_cpus=num_cpus)
    first = map_groups(
        ray.data.from_arrow_refs(refs),
        "id",
        _first_seen,
        fn_args=(keys, mode),
        whole_partitions=True,
        **grouped,
    )
    results = _block_refs(first)
    if mode == "suffix":
        decided = pa.concat_tables(ray.get(results)) if results else _DECISIONS.empty_table()
        olds = [ray.remote(_as_old_rows).options(num_cpus=0.25).remote(r) for r in refs]
        ray.wait(olds, num_returns=len(olds), fetch_local=False)
        news = [ray.put(_as_new_rows(decided))]
        second = map_groups(
            ray.data.from_arrow_refs(olds + news),
            "id",
            _collisions,
            fn_args=(keys,),
            whole_partitions=True,
            **grouped,
        )
        clashes = [t for t in ray.get(_block_refs(second)) if t.num_rows]
        clash = pa.concat_tables(clashes) if clashes else _DECISIONS.empty_table()
        results = [ray.put(_resolve(decided, clash))]
    write = ray.remote(_write_decisions).options(num_cpus=0.25)
    counts = ray.get(
        [write.remote(r, ids_dir.join(f"decisions-{i:05d}.parquet")) for i, r in enumerate(results)]
    )
    done.write_json_atomic({"duplicates": int(sum(counts)), "mode": mode})
    return int(sum(counts))


# --------------------------------------------------------------------------------------------
# Apply: one unit's pieces, rewritten with their decisions.


def _decisions_for(out: Location, unit: int) -> dict[int, tuple[str, str | None]]:
    ids_dir = out.join(IDS_DIR)
    paths = list_shards(ids_dir)
    if not paths:
        return {}
    table = pads.dataset(paths, filesystem=out.fs, format="parquet").to_table(
        filter=pc.field("unit") == unit
    )
    return {
        r: (w, n)
        for r, w, n in zip(
            table.column("record").to_pylist(),
            table.column("first_seen").to_pylist(),
            table.column("new_id").to_pylist(),
            strict=True,
        )
    }


def _read_piece(raw: Location, entry: dict) -> pa.Table:
    tables = []
    for f in entry["files"]:
        with raw.fs.open_input_file(raw.join(f["name"]).path) as fh:
            tables.append(pq.read_table(fh))
    for f in entry["rejected_files"]:
        with raw.fs.open_input_file(raw.join(REJECTED_DIR, f["name"]).path) as fh:
            t = pq.read_table(fh)
        tables.append(
            t.rename_columns([REJECT_COLUMN if c == REASON_COLUMN else c for c in t.column_names])
        )
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.sort_by(RECORD_COLUMN)


def apply_unit(
    raw: Location, out: Location, key: str, unit: int, entries: list[dict], mode: str
) -> list[dict]:
    """Rewrite the raw pieces of one unit into `out`, repeated ids marked, and mark the unit
    done; returns the ledger entries. Memory: one piece."""
    decisions = _decisions_for(out, unit)
    committed, total = [], 0
    for entry in sorted(entries, key=lambda e: e["tag"]):
        table = _read_piece(raw, entry)
        hits = [decisions.get(r) for r in table.column(RECORD_COLUMN).to_pylist()]
        if mode == "suffix":
            ids = table.column("id").to_pylist()
            renamed = [h is not None and h[1] is not None for h in hits]
            table = table.set_column(
                table.column_names.index("id"),
                "id",
                pa.array(
                    [h[1] if r else i for h, r, i in zip(hits, renamed, ids, strict=True)],
                    pa.string(),
                ),
            ).append_column(
                ORIGINAL_ID_COLUMN,
                pa.array(
                    [i if r else None for r, i in zip(renamed, ids, strict=True)], pa.string()
                ),
            )
        repeated = [h is not None and h[1] is None for h in hits]
        if any(repeated):
            reasons = [f"{REASON} (first seen at {h[0]})" if h else None for h in hits]
            table = reject(table, np.array(repeated), reasons)
        table = table.drop_columns([RECORD_COLUMN])
        committed.append(commit_piece(out, key, table, piece=entry["tag"]))
        total += table.num_rows
    mark_source_done(out, key, total)
    return committed


def raw_entries(entries: list[dict]) -> dict[str, list[dict]]:
    """The raw ledger's entries per unit key, as JSON-safe lists."""
    by_key: dict[str, list[dict]] = {}
    for e in entries:
        by_key.setdefault(e["src"], []).append(e)
    return by_key


__all__ = [
    "IDS_DIR",
    "ON_DUPLICATE_ID",
    "ORIGINAL_ID_COLUMN",
    "RAW_DIR",
    "RECORD_COLUMN",
    "apply_unit",
    "check_mode",
    "decide",
    "raw_entries",
    "with_records",
]
