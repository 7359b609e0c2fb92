"""Decide narrow, apply wide: a global stage's decision step reads only the columns it names, and
image bytes never go through Ray's object store."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from warren.pipelines import runner as runner_module
from warren.pipelines.global_narrow import narrow_reader
from warren.pipelines.run_global import piece_tag
from warren.stages.base import IMAGES_WITHOUT_BYTES, GlobalStage
from warren.stages.schema import IMAGE_TYPE


def _images_table(n: int, payload: int = 64) -> pa.Table:
    rng = np.random.default_rng(0)
    images = [
        [{"bytes": rng.bytes(payload), "path": f"p{i}-{k}.jpg"} for k in range(i % 3)]
        if i % 5
        else None
        for i in range(n)
    ]
    return pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "images": pa.array(images, pa.list_(IMAGE_TYPE)),
            "caption": [f"c{i}" for i in range(n)],
        }
    )


def test_the_image_list_without_bytes_keeps_every_list_and_path_and_no_byte(tmp_path):
    table = _images_table(40)
    # Two writers' spellings of a list: Arrow's current "element" and the older "item".
    for compliant in (True, False):
        path = tmp_path / f"t{compliant}.parquet"
        pq.write_table(table, path, row_group_size=16, use_compliant_nested_type=compliant)
        import pyarrow.fs as pafs

        got = narrow_reader(pafs.LocalFileSystem(), (IMAGES_WITHOUT_BYTES,)).read(str(path), 5, 30)
        assert got.column_names == ["id", "images"]
        assert got.column("id").to_pylist() == [f"r{i}" for i in range(5, 35)]
        item = got.schema.field("images").type.value_type
        assert [item.field(i).name for i in range(item.num_fields)] == ["path"]
        want = table.slice(5, 30).column("images").to_pylist()
        assert got.column("images").to_pylist() == [
            None if imgs is None else [{"path": im["path"]} for im in imgs] for imgs in want
        ]


def test_a_named_column_the_input_lacks_is_left_out(tmp_path):
    import pyarrow.fs as pafs

    path = tmp_path / "t.parquet"
    pq.write_table(_images_table(10), path)
    got = narrow_reader(pafs.LocalFileSystem(), ("caption", "source")).read(str(path), 0, 10)
    assert got.column_names == ["id", "caption"]


def test_the_piece_tag_is_the_one_the_ledger_gives_a_committed_piece(tmp_path):
    from warren.stages.ledger import commit_piece
    from warren.stages.shards import Location

    out = Location.of(str(tmp_path / "run" / "03-stage"))
    out.mkdir()
    out.join("rejected").mkdir()
    out.join("_progress").mkdir()
    entry = commit_piece(out, "global", pa.table({"id": ["a"]}), piece=f"{7:09d}")
    assert entry["tag"] == piece_tag(7)


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue() + rng.bytes(size - buf.tell())


def _store_bytes() -> int:
    import ray
    import ray._private.internal_api as internal

    return sum(
        internal.node_stats(
            n["NodeManagerAddress"], n["NodeManagerPort"]
        ).store_stats.cumulative_created_bytes
        for n in ray.nodes()
        if n.get("Alive")
    )


def _run_counting_store_bytes(stages: list, pool, out) -> dict[str, int]:
    """Run `stages` on the Parquet files in `pool`; the bytes each global stage created in Ray's
    object store, by stage name."""
    from warren.pipelines.runner import Pipeline, Runner

    through: dict[str, int] = {}
    run_global = runner_module.EXECUTORS[GlobalStage]

    def measuring(runner, stage, loc, upstream):
        before = _store_bytes()
        result = run_global(runner, stage, loc, upstream)
        through[stage.name] = _store_bytes() - before
        return result

    runner_module.EXECUTORS[GlobalStage] = measuring
    try:
        Runner(
            Pipeline("t", stages), str(pool), str(out), input_format="parquet", progress=False
        ).run()
    finally:
        runner_module.EXECUTORS[GlobalStage] = run_global
    return through


def test_image_bytes_never_go_through_the_object_store_in_a_global_stage(ray_session, tmp_path):
    from warren.stages.cluster import Cluster
    from warren.stages.exact_dedup import ExactDedup
    from warren.stages.phash_dedup import PhashDedup
    from warren.stages.semdedup import SemDedup

    rng = np.random.default_rng(1)
    n, d, payload = 300, 16, 200_000  # 60 MB of image bytes
    emb = rng.normal(size=(n, d))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    flat = pa.array(emb.astype(np.float16).ravel(), pa.float16())
    images = [[{"bytes": _jpeg(rng, payload), "path": None}] for _ in range(n)]
    images[7] = images[3]  # one exact copy, so exact_dedup has a duplicate to reject
    pool = tmp_path / "pool"
    pool.mkdir()
    table = pa.table(
        {
            "id": [f"r{i:04d}" for i in range(n)],
            "images": pa.array(images, pa.list_(IMAGE_TYPE)),
            "caption": [f"c{i}" for i in range(n)],
            "image_emb": pa.FixedSizeListArray.from_arrays(flat, d),
        }
    )
    pq.write_table(table.slice(0, 150), pool / "a.parquet")
    pq.write_table(table.slice(150), pool / "b.parquet")

    stages = [Cluster(n_clusters=4), SemDedup(), ExactDedup(key="image"), PhashDedup()]
    through = _run_counting_store_bytes(stages, pool, tmp_path / "out")
    rejected = pq.read_table(tmp_path / "out" / "03-exact_dedup" / "rejected")
    assert rejected.column("id").to_pylist() == ["r0007"]
    assert set(through) == {s.name for s in stages}
    wide = n * payload
    # Ids, embeddings, hashes and decisions go through; the 60 MB of image bytes do not.
    for name, nbytes in through.items():
        assert nbytes < wide / 20, f"{name}: {nbytes:,} bytes through the object store"


def test_stages_that_drop_read_embeddings_still_write_them_and_score_them_right(
    ray_session, tmp_path
):
    """cluster, semdedup and clip_score leave the embeddings out of their decisions in the runner
    (`decisions_only`); the rows they write keep them, with scores computed on them."""
    import ray

    from warren.pipelines.runner import Pipeline, Runner
    from warren.stages.base import GlobalContext
    from warren.stages.clip_score import ClipScore
    from warren.stages.cluster import Cluster
    from warren.stages.semdedup import SemDedup

    rng = np.random.default_rng(2)
    n, d = 200, 8
    img, txt = rng.normal(size=(2, n, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)

    def column(x):
        return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), d)

    table = pa.table(
        {
            "id": [f"r{i:04d}" for i in range(n)],
            "caption": [f"c{i}" for i in range(n)],
            "image_emb": column(img),
            "text_emb": column(txt),
        }
    )
    (tmp_path / "pool").mkdir()
    pq.write_table(table, tmp_path / "pool" / "a.parquet")
    stages = [Cluster(n_clusters=3), ClipScore(lo=0.0, hi=1.0)]
    # A threshold no pair of these random rows reaches: semdedup passes every row through.
    Runner(
        Pipeline("t", [stages[0], SemDedup(rule="components", threshold=0.9999), stages[1]]),
        str(tmp_path / "pool"),
        str(tmp_path / "out"),
        input_format="parquet",
        progress=False,
    ).run()
    out = pq.read_table(tmp_path / "out" / "03-clip_score").sort_by("id")
    assert out.num_rows == n
    assert out.column("image_emb").equals(table.column("image_emb"))
    assert out.column("text_emb").equals(table.column("text_emb"))
    # the cosine of the stored float16 vectors, renormalised, as the stage defines it
    i16 = img.astype(np.float16).astype(np.float64)
    t16 = txt.astype(np.float16).astype(np.float64)
    cos = (i16 * t16).sum(1) / np.linalg.norm(i16, axis=1) / np.linalg.norm(t16, axis=1)
    np.testing.assert_allclose(out.column("clip_score").to_numpy(), cos, atol=1e-5)
    assert set(out.column("cluster_id").to_pylist()) <= {0, 1, 2}
    assert out.column("component_size").to_pylist() == [1] * n

    ds = ray.data.from_arrow(table)
    for only in (True, False):
        ctx = GlobalContext(num_rows=n, num_shards=1, num_cpus=1, decisions_only=only)
        for stage in stages:
            names = stage.run(ds, ctx).schema().names
            assert ("image_emb" in names) is not only, (stage.name, only, names)
    # Outside the runner every input column comes back, scored as in the runner.
    whole = stages[1].run_rows(ds, GlobalContext(num_rows=n, num_shards=1, num_cpus=1))
    rows = whole.to_arrow_refs()
    got = pa.concat_tables(ray.get(rows)).sort_by("id")
    assert got.column("image_emb").equals(table.column("image_emb"))
    np.testing.assert_allclose(got.column("clip_score").to_numpy(), cos, atol=1e-5)


def test_consecutive_pieces_read_each_row_group_once_and_get_the_rows_a_whole_read_gives(
    tmp_path, monkeypatch
):
    """Pieces one task reads in order (straddling files, cutting row groups in two) through one
    RowReader: the rows of a whole-file read, sliced; and no row group read twice."""
    import random

    import pyarrow.fs as pafs

    from warren.stages.shards import RowReader

    rng = random.Random(3)
    files = []
    for f in range(4):
        n = rng.randint(1, 90)
        path = tmp_path / f"f{f}.parquet"
        pq.write_table(_images_table(n), path, row_group_size=rng.choice([7, 16, 40, 100]))
        files.append((str(path), n))
    reads = []
    real = pq.ParquetFile.read_row_groups

    def counting(self, row_groups, *args, **kwargs):
        reads.extend(row_groups)
        return real(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counting)
    for piece in (1, 5, 16, 33):
        for wanted in (None, ("caption",)):
            reader = narrow_reader(pafs.LocalFileSystem(), wanted)
            reads.clear()
            for path, n in files:
                whole = pq.read_table(path, columns=None if wanted is None else ["id", "caption"])
                for offset in range(0, n, piece):
                    got = reader.read(path, offset, min(piece, n - offset))
                    assert got.equals(whole.slice(offset, min(piece, n - offset)))
            groups = sum(pq.ParquetFile(p).metadata.num_row_groups for p, _ in files)
            assert len(reads) == groups  # each row group read once
    # a reader with no projection reads like read_rows
    assert RowReader(pafs.LocalFileSystem()).read(files[0][0], 0, 0).num_rows == 0


def test_clip_score_scores_in_the_read_task_so_no_embedding_enters_the_object_store(
    ray_session, tmp_path
):
    """clip_score's decision needs one float a row: it is computed where the embeddings are read
    (`keeps_prepared = False`), so the ranks' passes move scores, not two vectors a row."""
    from warren.stages.clip_score import ClipScore

    rng = np.random.default_rng(3)
    n, d = 4000, 512
    img, txt = rng.normal(size=(2, n, d))

    def column(x):
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), d)

    table = pa.table(
        {
            "id": [f"r{i:05d}" for i in range(n)],
            "caption": ["c"] * n,
            "image_emb": column(img),
            "text_emb": column(txt),
        }
    )
    (tmp_path / "pool").mkdir()
    pq.write_table(table.slice(0, n // 2), tmp_path / "pool" / "a.parquet")
    pq.write_table(table.slice(n // 2), tmp_path / "pool" / "b.parquet")
    through = _run_counting_store_bytes(
        [ClipScore(lo=0.25, hi=0.75)], tmp_path / "pool", tmp_path / "out"
    )
    written = pq.read_table(tmp_path / "out" / "01-clip_score")  # kept and rejected rows
    rejected = pq.read_table(tmp_path / "out" / "01-clip_score" / "rejected")
    assert (written.num_rows, rejected.num_rows) == (n, n // 2)
    assert written.column("image_emb").null_count == 0
    embeddings = 2 * n * d * 2  # 8 MB of float16; the scores, ranks and reasons are < 1 MB
    nbytes = through["clip_score"]
    assert nbytes < embeddings / 8, f"{nbytes:,} bytes through the object store"
