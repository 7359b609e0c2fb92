"""Writing a stage's output and keeping its ledger.

Every piece of work (a fixed row range of one input shard of a map stage, one input unit of ingest,
one fixed piece of a global stage's output) ends in `commit_piece`: kept rows go to `part-*.parquet`, rejected rows to
`rejected/part-*.parquet` with a `reason` column, and only then a small JSON entry under `_progress/`
records which source the rows came from and how many went where. A piece without its entry never
happened (a kill between the data write and the entry write leaves an orphan that resume deletes),
so a source shard is complete exactly when its entries add up to its row count.
"""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from warren.stages.base import reason_key
from warren.stages.run_layout import REJECTED_DIR
from warren.stages.schema import REASON_COLUMN, REJECT_COLUMN, order_columns
from warren.stages.shards import Location, remove_temporaries, write_table_atomic

PROGRESS_DIR = "_progress"


def source_tag(src: str) -> str:
    return hashlib.sha1(src.encode()).hexdigest()[:12]


def _normalise_nulls(table: pa.Table) -> pa.Table:
    # An all-null column of unknown type (pa.null()) would give shards that do not concatenate
    # with shards where the same column has values; extra columns of unknown type are strings.
    for i, f in enumerate(table.schema):
        if pa.types.is_null(f.type):
            table = table.set_column(
                i, pa.field(f.name, pa.string()), pa.nulls(table.num_rows, pa.string())
            )
    return table


def split_rejected(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(kept rows without the reject column, rejected rows with a `reason` column)."""
    if REJECT_COLUMN not in table.column_names:
        return table, table.slice(0, 0).append_column(REASON_COLUMN, pa.array([], pa.string()))
    flag = table.column(REJECT_COLUMN)
    kept = table.filter(pc.is_null(flag)).drop_columns([REJECT_COLUMN])
    rejected = table.filter(pc.is_valid(flag))
    idx = rejected.column_names.index(REJECT_COLUMN)
    rejected = rejected.set_column(idx, REASON_COLUMN, rejected.column(idx).cast(pa.string()))
    return kept, rejected


def piece_key(table: pa.Table) -> str:
    """Names a piece by its rows, so a retried task rewrites the same files instead of adding copies."""
    ids = table.column("id")
    if not len(ids):
        return "empty"
    return f"{ids[0].as_py()}\x1f{ids[-1].as_py()}\x1f{len(ids)}"


def _relative_to_run(out: Location, src: str) -> str:
    """`src` relative to the run's folder when it lies in it (a sibling stage's shard): file names
    then depend on the run's content, not on where its output folder is."""
    root = out.path.rstrip("/").rsplit("/", 1)[0] + "/"
    return src[len(root) :] if src.startswith(root) else src


def commit_piece(out: Location, src: str, table: pa.Table, *, piece: str | None = None) -> dict:
    """Write one piece of a stage's output for source `src` and record it. Returns the entry.

    `piece` identifies the piece within its source (default: its first id, last id and row count);
    the same piece always gets the same file names, in any output folder.
    """
    key = piece if piece is not None else piece_key(table)
    tag = f"{source_tag(_relative_to_run(out, src))}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    kept, rejected = split_rejected(_normalise_nulls(table))
    files = []
    if kept.num_rows:
        loc = out.join(f"part-{tag}.parquet")
        size = write_table_atomic(order_columns(kept), loc)
        files.append({"name": loc.path.rsplit("/", 1)[1], "rows": kept.num_rows, "bytes": size})
    rejected_files = []
    if rejected.num_rows:
        loc = out.join(REJECTED_DIR, f"part-{tag}.parquet")
        size = write_table_atomic(order_columns(rejected), loc)
        rejected_files.append(
            {"name": loc.path.rsplit("/", 1)[1], "rows": rejected.num_rows, "bytes": size}
        )
    reasons = (
        collections.Counter(reason_key(r) for r in rejected.column(REASON_COLUMN).to_pylist())
        if rejected.num_rows
        else {}
    )
    entry = {
        "src": src,
        "tag": tag,
        "rows_in": table.num_rows,
        "kept": kept.num_rows,
        "rejected": rejected.num_rows,
        "files": files,
        "rejected_files": rejected_files,
        "reasons": dict(reasons),
    }
    out.join(PROGRESS_DIR, f"{tag}.json").write_json_atomic(entry)
    return entry


def mark_source_done(out: Location, src: str, rows_in: int) -> None:
    """For sources whose size is not known in advance (ingest units): all pieces are written."""
    entry = {"src": src, "rows_in": rows_in, "done": True}
    out.join(PROGRESS_DIR, f"{source_tag(src)}-done.json").write_json_atomic(entry)


@dataclass
class LedgerState:
    entries: list[dict] = field(default_factory=list)
    done_markers: dict[str, int] = field(default_factory=dict)

    def rows_by_src(self) -> dict[str, int]:
        rows: dict[str, int] = collections.defaultdict(int)
        for e in self.entries:
            rows[e["src"]] += e["rows_in"]
        return rows

    def totals(self) -> dict:
        reasons: collections.Counter = collections.Counter()
        for e in self.entries:
            reasons.update(e["reasons"])
        return {
            "rows_in": sum(e["rows_in"] for e in self.entries),
            "kept": sum(e["kept"] for e in self.entries),
            "rejected": sum(e["rejected"] for e in self.entries),
            "reasons": dict(reasons.most_common()),
            "files": sorted((f for e in self.entries for f in e["files"]), key=lambda f: f["name"]),
            "rejected_files": sorted(
                (f for e in self.entries for f in e["rejected_files"]), key=lambda f: f["name"]
            ),
        }


def read_ledger(out: Location) -> LedgerState:
    state = LedgerState()
    progress = out.join(PROGRESS_DIR)
    if not progress.exists():
        return state
    infos = out.fs.get_file_info(pafs.FileSelector(progress.path))
    for fi in sorted(infos, key=lambda f: f.path):
        if fi.type != pafs.FileType.File or not fi.path.endswith(".json"):
            continue
        try:
            with out.fs.open_input_stream(fi.path) as f:
                entry = json.loads(f.read())
        except (ValueError, OSError):
            continue  # cut short by a crash: the piece is redone, and prune removes this file
        if entry.get("done"):
            state.done_markers[entry["src"]] = entry["rows_in"]
        else:
            state.entries.append(entry)
    return state


def complete_sources(state: LedgerState, expected_rows: dict[str, int] | None) -> set[str]:
    """Sources whose pieces are all recorded: by known row count, or by a done marker."""
    rows = state.rows_by_src()
    if expected_rows is not None:
        return {s for s, n in expected_rows.items() if rows.get(s, 0) == n}
    return {s for s, n in state.done_markers.items() if rows.get(s, 0) == n}


def prune_incomplete(out: Location, state: LedgerState, complete: set[str]) -> LedgerState:
    """Delete pieces of incomplete sources and files no entry references; return what remains.

    This is what makes resume exact: a source is either entirely present, once, or absent.
    """
    remove_temporaries(out)
    keep_entries = [e for e in state.entries if e["src"] in complete]
    referenced = {f["name"] for e in keep_entries for f in e["files"]}
    referenced_rej = {f["name"] for e in keep_entries for f in e["rejected_files"]}
    for folder, names in ((out, referenced), (out.join(REJECTED_DIR), referenced_rej)):
        if not folder.exists():
            continue
        for fi in out.fs.get_file_info(pafs.FileSelector(folder.path)):
            if (
                fi.type == pafs.FileType.File
                and fi.base_name.endswith(".parquet")
                and fi.base_name not in names
            ):
                out.fs.delete_file(fi.path)
    progress = out.join(PROGRESS_DIR)
    if progress.exists():
        keep = {f"{e['tag']}.json" for e in keep_entries}
        keep |= {f"{source_tag(s)}-done.json" for s in complete}
        for fi in out.fs.get_file_info(pafs.FileSelector(progress.path)):
            if fi.type == pafs.FileType.File and fi.base_name not in keep:
                out.fs.delete_file(fi.path)
    return LedgerState(
        entries=keep_entries,
        done_markers={s: n for s, n in state.done_markers.items() if s in complete},
    )
