"""The report's galleries: per stage, a seeded, bounded sample of kept rows and of each rejection
reason's rows, as 128 px JPEG thumbnails with caption, id, scores and reason. Only the sampled
rows are read (row group by row group), so a gallery over a million rows takes milliseconds."""

from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from warren.pipelines.report.stage_view import StageView
from warren.pipelines.report.statistics import StageStats
from warren.pipelines.report.text import shorten
from warren.stages.base import reason_key
from warren.stages.run_layout import ShardFile
from warren.stages.schema import REASON_COLUMN

KEPT_SAMPLES = 12  # thumbnails of kept rows per stage
REASON_SAMPLES = 8  # thumbnails per rejection reason
MAX_REASON_GALLERIES = 12  # per stage, the most frequent reasons first
THUMB_PX = 128
CAPTION_CHARS = 140
# Rejected galleries hold decompression bombs on purpose, and the report is drawn on the driver:
# a thumbnail takes the stages' pixel limit (stages.images.DEFAULT_MAX_PIXELS) and at most this
# much memory for its decode. A large JPEG still shows (it decodes at 1/8 scale); a 16000 px PNG,
# decoded in full, does not.
THUMB_MEMORY = 256 * 2**20
# Thumbnails are the bulk of the page (about 5 kB each): past this many bytes of them the rest
# are left out, so a run with many stages and reasons still gives a page under 20 MB.
THUMBNAIL_BUDGET = 12 * 2**20


@dataclasses.dataclass
class Sample:
    id: str
    caption: str
    thumbnail: str | None  # a data URI, or None when the image cannot be shown
    note: str  # why there is no thumbnail
    scores: dict[str, Any]
    reason: str | None = None


def _locate(files: Sequence[ShardFile], positions: Iterable[int]) -> dict[int, list[int]]:
    """Global row positions over `files` -> {file index: [row in file]}."""
    bounds = np.cumsum([0] + [f.rows for f in files])
    out: dict[int, list[int]] = {}
    for p in positions:
        f = int(np.searchsorted(bounds, p, side="right") - 1)
        out.setdefault(f, []).append(int(p - bounds[f]))
    return out


def _read_rows(stage: StageView, path: str, rows: list[int], columns: list[str]) -> list[dict]:
    """The given rows of one shard, read row group by row group in small batches, stopping after
    the last wanted row: a sample of 12 never decompresses a whole shard's images."""
    out = []
    with stage.loc.fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        present = [c for c in columns if c in pf.schema_arrow.names]
        start = 0
        wanted = sorted(set(rows))
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            here = [r - start for r in wanted if start <= r < start + n]
            start += n
            if not here:
                continue
            pos = 0
            for batch in pf.iter_batches(batch_size=64, row_groups=[rg], columns=present):
                take = [r - pos for r in here if pos <= r < pos + batch.num_rows]
                if take:
                    out.extend(batch.take(pa.array(take)).to_pylist())
                pos += batch.num_rows
                if pos > here[-1]:
                    break
    return out


def thumbnail(images: list[dict] | None) -> tuple[str | None, str]:
    """(JPEG data URI of the first image at THUMB_PX, '') or (None, why not)."""

    from warren.stages.images import ImageTooLargeError, decode_image

    if not images:
        return None, "no image"
    data = images[0].get("bytes")
    if not data:
        return None, "image stored by path" if images[0].get("path") else "empty image"
    try:
        # As every stage sees it (orientation, transparency on white, first frame), decoded at
        # a reduced scale (JPEG draft) that keeps at least THUMB_PX on the shorter side.
        img = decode_image(data, reduce_to=THUMB_PX, memory_limit=THUMB_MEMORY)
        img.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=75)
    except ImageTooLargeError as exc:
        return None, f"too many pixels to show ({exc.detail})"
    except Exception as exc:  # anything PIL raises on a damaged file means: no thumbnail
        return None, f"cannot decode: {type(exc).__name__}"
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), ""


def _text_of(row: dict) -> str:
    if row.get("caption"):
        return row["caption"]
    turns = row.get("conversations") or []
    return " / ".join((t.get("value") or "") for t in turns[:2])


@dataclasses.dataclass
class Budget:
    """Bytes of thumbnails the page may still take."""

    # Read at creation, not at import, so the budget can be changed (tests, a caller).
    left: int = dataclasses.field(default_factory=lambda: THUMBNAIL_BUDGET)


def _samples(
    stage: StageView,
    files: Sequence[ShardFile],
    positions: Sequence[int],
    scores: list[str],
    rejected: bool,
    budget: Budget,
) -> list[Sample]:
    columns = ["id", "caption", "conversations", "images", *scores]
    if rejected:
        columns.append(REASON_COLUMN)
    rows: list[dict] = []
    for f, local in sorted(_locate(files, positions).items()):
        rows.extend(_read_rows(stage, files[f].path, local, columns))
    out = []
    for row in sorted(rows, key=lambda r: r["id"]):
        uri, note = thumbnail(row.get("images")) if budget.left > 0 else (None, "")
        if budget.left <= 0 or (uri and len(uri) > budget.left):
            uri, note = None, "left out: the page's thumbnail budget is spent"
        budget.left -= len(uri or "")
        out.append(
            Sample(
                id=row["id"],
                caption=shorten(_text_of(row), CAPTION_CHARS),
                thumbnail=uri,
                note=note,
                scores={c: row.get(c) for c in scores if c in row},
                reason=row.get(REASON_COLUMN),
            )
        )
    return out


def galleries(
    stage: StageView, stats: StageStats, seed: int, budget: Budget | None = None
) -> tuple[list[Sample], list[tuple[str, int, list[Sample]]]]:
    """(kept samples, [(reason, rejected rows with it, samples)]) for one stage, seeded."""
    budget = budget if budget is not None else Budget()
    rng = np.random.default_rng([seed, stage.index])
    scores = stage.score_columns()
    n_kept = sum(f.rows for f in stage.kept)
    picks = rng.choice(n_kept, size=min(KEPT_SAMPLES, n_kept), replace=False) if n_kept else []
    kept = _samples(stage, stage.kept, sorted(int(p) for p in picks), scores, False, budget)
    keys = np.asarray([reason_key(r or "") for r in stats.reasons], dtype=object)
    by_reason = []
    if len(keys):
        uniq, counts = np.unique(keys, return_counts=True)
        for key, count in sorted(zip(uniq, counts, strict=True), key=lambda kc: (-kc[1], kc[0])):
            if len(by_reason) == MAX_REASON_GALLERIES:
                break
            where = np.flatnonzero(keys == key)
            chosen = rng.choice(where, size=min(REASON_SAMPLES, len(where)), replace=False)
            samples = _samples(
                stage, stage.rejected, sorted(int(p) for p in chosen), scores, True, budget
            )
            by_reason.append((str(key), int(count), samples))
    return kept, by_reason
