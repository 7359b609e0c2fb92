"""Download ingest throughput against a local image server: images/s per thread count.

    python benchmarks/download.py --images 2000 --threads 4 8 16 32 64

Starts an HTTP server in a separate process (its threads do not share the downloaders' GIL)
serving `--images` distinct JPEGs, 256-512 px a side, generated with a fixed seed; writes a URL
table; then, for each thread count, runs the `download` ingest through the runner on a local Ray
with 2 CPUs (2 units at once, `--rows-per-shard` URLs each) into a fresh output folder, and
prints images/s (after a warm-up ingest, so Ray's worker start and img2dataset's import are not
counted). Conversion to canonical rows is timed on its own afterwards (every unit's
`DownloadReader.convert` again, on the cached shards, no network) and given as a share of the
two processes' time (convert seconds / (2 x ingest wall seconds)). The baseline is plain
`img2dataset.download` (processes_count=2, output_format parquet) on the same URL list at the best
thread count: img2dataset alone, with its own process pool and logger process.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _images(n: int, seed: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(x) for x in rng.integers(256, 513, size=2))
        # Smooth colour fields plus a little noise: JPEG sizes like photos, not like noise.
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, size=(h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def serve(n: int, ready: mp.Queue, stop: mp.Event) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    bodies = _images(n, seed=0)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            try:
                body = bodies[int(self.path.rsplit("/", 1)[-1].split(".")[0])]
            except (ValueError, IndexError):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    ready.put((httpd.server_address[1], sum(map(len, bodies))))
    stop.wait()
    httpd.shutdown()


def run_ingest(urls: str, out: str, threads: int, rows_per_shard: int) -> tuple[float, float, int]:
    """(ingest seconds, conversion seconds, kept rows) for one thread count."""
    from warren.pipelines.runner import Pipeline, Runner
    from warren.stages.readers.download import DownloadReader
    from warren.stages.shards import Location

    reader = DownloadReader(urls, thread_count=threads, rows_per_shard=rows_per_shard)
    reader.bind_output(Location.of(out))
    runner = Runner(Pipeline("download_bench", []), urls, out, reader=reader, progress=False)
    start = time.perf_counter()
    (report,) = runner.run()
    ingest = time.perf_counter() - start
    start = time.perf_counter()
    for unit in reader.plan():
        for _ in reader.convert(unit):
            pass
    return ingest, time.perf_counter() - start, report.kept


def run_bare(urls: str, out: str, threads: int, rows_per_shard: int) -> float:
    import img2dataset

    start = time.perf_counter()
    img2dataset.download(
        url_list=urls,
        input_format="parquet",
        output_folder=out,
        output_format="parquet",
        processes_count=2,
        thread_count=threads,
        number_sample_per_shard=rows_per_shard,
        extract_exif=False,
        timeout=10,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--threads", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--rows-per-shard", type=int, default=500)
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from warren.pipelines.runner import ensure_ray

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=serve, args=(args.images, ready, stop), daemon=True)
    proc.start()
    work = Path(tempfile.mkdtemp(prefix="warren-bench-download-"))
    try:
        port, total_bytes = ready.get(timeout=300)
        print(
            f"server: {args.images} JPEGs, {total_bytes / args.images / 1024:.0f} KiB average, "
            f"port {port}",
            flush=True,
        )
        urls = str(work / "urls.parquet")
        n = args.images
        pq.write_table(
            pa.table(
                {
                    "url": [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(n)],
                    "caption": [f"image {i}" for i in range(n)],
                }
            ),
            urls,
        )
        ensure_ray(2)
        # Warm-up: Ray starts its two workers and they import img2dataset (seconds each), once.
        warm = str(work / "warm.parquet")
        pq.write_table(pq.read_table(urls).slice(0, 20), warm)
        run_ingest(warm, str(work / "warm-out"), 8, 10)
        print(f"{'threads':>7} {'images/s':>9} {'ingest s':>9} {'convert s':>9} {'convert %':>9}")
        best = (0.0, args.threads[0])
        for threads in args.threads:
            out = str(work / f"out-{threads}")
            ingest, convert, kept = run_ingest(urls, out, threads, args.rows_per_shard)
            assert kept == n, f"{kept} of {n} downloaded"
            rate = n / ingest
            best = max(best, (rate, threads))
            share = 100 * convert / (2 * ingest)
            print(
                f"{threads:>7} {rate:>9.1f} {ingest:>9.2f} {convert:>9.2f} {share:>8.1f}%",
                flush=True,
            )
            shutil.rmtree(out)
        seconds = run_bare(urls, str(work / "bare"), best[1], args.rows_per_shard)
        print(
            f"baseline img2dataset.download (2 processes, {best[1]} threads): "
            f"{n / seconds:.1f} images/s ({seconds:.2f} s); best warren ingest: {best[0]:.1f} "
            f"images/s ({100 * best[0] / (n / seconds):.0f}% of it)"
        )
    finally:
        stop.set()
        proc.join(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
