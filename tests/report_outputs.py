"""Run outputs for the report's and `warren explain`'s tests: stage folders written by hand in the
runner's layout, and a demo run's copy with its provenance columns filled in."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def write_stage(
    out: Path,
    index: int,
    name: str,
    params: dict,
    table: pa.Table,
    reasons: dict[str, str],
    thresholds: list[dict] | None = None,
    rejected_columns: dict[str, dict] | None = None,
) -> pa.Table:
    """Write a stage folder as the runner does; return its kept rows.

    `reasons` maps rejected ids to their reason. `thresholds` is what the manifest records (None:
    a manifest from before thresholds were recorded, without the key). `rejected_columns` maps a
    column name to {rejected id: value}: written on every row of the stage (null where the id is
    not named), as a dedup stage writes `duplicate_of` and `similarity`.
    """
    folder = out / f"{index:02d}-{name}"
    (folder / "rejected").mkdir(parents=True)
    ids = table.column("id").to_pylist()
    for column, values in (rejected_columns or {}).items():
        kind = pa.float32() if column == "similarity" else pa.string()
        table = table.append_column(column, pa.array([values.get(i) for i in ids], kind))
    mask = pa.array([i in reasons for i in ids])
    kept, rejected = table.filter(pc.invert(mask)), table.filter(mask)
    rejected = rejected.append_column(
        "reason", pa.array([reasons[i] for i in rejected.column("id").to_pylist()])
    )
    pq.write_table(kept, folder / "part-0.parquet")
    files = [{"name": "part-0.parquet", "rows": kept.num_rows}]
    rejected_files = []
    if rejected.num_rows:
        pq.write_table(rejected, folder / "rejected" / "part-0.parquet")
        rejected_files = [{"name": "part-0.parquet", "rows": rejected.num_rows}]
    keys: dict[str, int] = {}
    for r in reasons.values():
        keys[r.split(" (")[0]] = keys.get(r.split(" (")[0], 0) + 1
    manifest = {
        "stage": name,
        "version": "1",
        "params": params,
        "rows_in": table.num_rows,
        "kept": kept.num_rows,
        "rejected": rejected.num_rows,
        "reasons": keys,
        "files": files,
        "rejected_files": rejected_files,
        "seconds": 1.0,
        "status": "computed",
    }
    if thresholds is not None:
        manifest["thresholds"] = thresholds
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    return kept


def threshold(param: str, kind: str, column: str, value: float, descending: bool = True) -> dict:
    """One entry of a manifest's `thresholds`, as the runner writes Stage.thresholds()."""
    return {
        "param": param,
        "kind": kind,
        "column": column,
        "value": value,
        "descending": descending,
    }


def with_provenance(run: Path, dest: Path) -> Path:
    """A copy of a demo run in which exact_dedup's rows carry `duplicate_of` and `similarity` and
    every manifest records its thresholds, as a run of this version writes them. Where the run
    already has them, the copy is unchanged."""
    shutil.copytree(run, dest)
    for manifest_path in sorted(dest.glob("*/_manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        manifest.setdefault("thresholds", [])
        folder = manifest_path.parent
        if manifest["stage"] == "exact_dedup":
            shards = (
                (folder, manifest["files"]),
                (folder / "rejected", manifest["rejected_files"]),
            )
            for base, entries in shards:
                for entry in entries:
                    path = base / entry["name"]
                    table = pq.read_table(path)
                    if "duplicate_of" in table.column_names:
                        continue
                    reasons = (
                        table.column("reason").to_pylist()
                        if "reason" in table.column_names
                        else [None] * table.num_rows
                    )
                    # The test's ground truth: exact_dedup's reasons end "(of <kept id>)".
                    kept = [re.search(r"of ([^)]+)\)", r).group(1) if r else None for r in reasons]
                    table = table.append_column("duplicate_of", pa.array(kept, pa.string()))
                    similarity = [1.0 if k else None for k in kept]
                    table = table.append_column("similarity", pa.array(similarity, pa.float32()))
                    pq.write_table(table, path)
                    entry["bytes"] = path.stat().st_size
        manifest_path.write_text(json.dumps(manifest))
    return dest
