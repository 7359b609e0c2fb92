"""Embedding throughput: the `embed` stage vs. a bare loop, and the embedding store's lookup cost.

    python benchmarks/embed.py                      # ViT-B-32, 192 images, this machine's cores
    python benchmarks/embed.py --rows 512 --model open_clip:ViT-L-14 --cores 8
    python benchmarks/embed.py --store-keys 1000000 --store-dim 768

Part 1, images/s, same model object, same rows, same number of cores (`--cores`, default all of
this process's), both runs in this process, alternated `--repeats` times (the best of each kept, the
machine being shared):

- bare loop: torch on `--cores` threads, on `--device` (CUDA when there is one, as the stage); per sub-batch of `--model-batch-size` images: decode
  (`stages.images.decode_image`, the stage's decoder), the model's preprocessing, one forward pass,
  all serial on the calling thread;
- the stage: `Embed.process` on one Arrow batch of all rows (texts off, store off), whose pool of
  `--cores` threads decodes and preprocesses the next sub-batch while the model runs this one.

Printed: both rates, their ratio (target >= 0.9), and the share of the stage's time its model waited
for input (seconds blocked on the decode pool / decode wait + forward seconds). The model is a real
architecture with random weights drawn from a fixed seed (no download); images are JPEGs of
realistic photo size (640 to 1280 px a side, 50-250 KB), generated from a seed.

Part 2, the embedding store (`stages.embed_store`) at `--store-keys` stored keys of width
`--store-dim`, written as files of `--store-file-rows` (one batch each, as the stage writes): the
seconds a new actor takes to index the store (its first lookup), the index's memory, and lookups/s
for batches of 256 keys that (a) are the rows of one stored file (a re-run of a batch embedded
before), (b) are drawn at random from the whole store (the worst case: one file read per key),
(c) are not stored (new rows: the in-memory index alone).

Measured here (2 cores shared with other work, load average 10-25; ViT-B-32, 96 JPEGs of 135 KB,
sub-batch 32): bare loop 3.7 images/s, stage 3.9 images/s, ratio 1.05x, the model waiting for input
1.4% of the stage's time; every row in the store: 1,657 images/s. Store at 1M keys: see
stages/embed_store.py.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from warren.stages.embed import Embed, reduction_side
from warren.stages.embed_store import EmbeddingStore, content_keys
from warren.stages.images import decode_image
from warren.stages.models import load_clip
from warren.stages.schema import rows_to_table
from warren.stages.shards import Location


def make_jpegs(n: int, seed: int) -> list[bytes]:
    """Photo-like JPEGs: smooth colour fields (upsampled noise) with fine grain, 640-1280 px."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(640, 1281)), int(rng.integers(480, 961))
        coarse = rng.integers(0, 256, size=(h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        grain = rng.normal(0, 6, size=(h, w, 3))
        pixels = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def bare_loop(model, blobs: list[bytes], step: int) -> np.ndarray:
    """Decode, preprocess and embed serially: what a plain script does."""
    import torch.nn.functional as F

    reduce_to = reduction_side(model)
    out = []
    with torch.inference_mode():
        for lo in range(0, len(blobs), step):
            images = [decode_image(b, reduce_to=reduce_to) for b in blobs[lo : lo + step]]
            pixels = torch.stack([model.preprocess(im) for im in images]).to(model.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=model.device == "cuda"):
                feats = model.module.encode_image(pixels)
            out.append(F.normalize(feats.float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def stage_run(stage: Embed, batch: pa.Table) -> tuple[pa.Table, dict]:
    stage.stats = {"wait_s": 0.0, "model_s": 0.0, "computed": 0, "stored": 0}
    return stage.process(batch), dict(stage.stats)


def part_throughput(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.cores)
    blobs = make_jpegs(args.rows, seed=0)
    sizes = [len(b) for b in blobs]
    print(
        f"{args.rows} JPEGs, {np.mean(sizes) / 1e3:.0f} KB mean ({min(sizes) / 1e3:.0f}-"
        f"{max(sizes) / 1e3:.0f}); model {args.model}; {args.cores} cores; torch threads "
        f"{torch.get_num_threads()}; sub-batch {args.model_batch_size}"
    )
    model = load_clip(args.model, device=args.device, batch_size=args.model_batch_size)
    print(f"device: {model.device}")
    stage = Embed(
        model=args.model, texts=False, store="none", model_batch_size=args.model_batch_size
    )
    stage.model = model
    from concurrent.futures import ThreadPoolExecutor

    stage._pool = ThreadPoolExecutor(max_workers=args.cores)
    stage._stores = {}
    batch = rows_to_table(
        [{"id": f"r{i}", "images": [{"bytes": b, "path": None}]} for i, b in enumerate(blobs)]
    )
    bare_loop(model, blobs[: args.model_batch_size], args.model_batch_size)  # warm-up
    bare_s, stage_s, waits = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        expected = bare_loop(model, blobs, args.model_batch_size)
        bare_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        out, stats = stage_run(stage, batch)
        stage_s.append(time.perf_counter() - t)
        waits.append(stats["wait_s"] / max(1e-9, stats["wait_s"] + stats["model_s"]))
    got = np.array(out.column("image_emb").to_pylist(), dtype=np.float32)
    assert np.allclose(got, expected.astype(np.float16), atol=2e-3), "stage != bare loop"
    bare, staged = args.rows / min(bare_s), args.rows / min(stage_s)
    print(f"bare loop (decode+preprocess+forward, serial): {bare:8.1f} images/s")
    print(f"embed stage (decode pool one sub-batch ahead): {staged:8.1f} images/s")
    print(f"ratio stage / bare loop: {staged / bare:.2f}x (target >= 0.9)")
    print(
        f"model waiting for input: {100 * waits[int(np.argmin(stage_s))]:.1f}% of the stage's "
        f"time (runs: {', '.join(f'{100 * w:.1f}%' for w in waits)})"
    )
    # A second pass through a store that holds every row: nothing decoded, nothing embedded.
    folder = tempfile.mkdtemp(prefix="warren-embed-bench-")
    try:
        cached = Embed(
            model=args.model, texts=False, store=folder, model_batch_size=args.model_batch_size
        )
        cached.model, cached._pool, cached._stores = model, stage._pool, {}
        stage_run(cached, batch)
        t = time.perf_counter()
        again, stats = stage_run(cached, batch)
        hit_s = time.perf_counter() - t
        assert stats["computed"] == 0 and again.column("image_emb").equals(out.column("image_emb"))
        print(f"embed stage, every row in the store: {args.rows / hit_s:8.1f} images/s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def part_store(args: argparse.Namespace) -> None:
    n, dim, per_file = args.store_keys, args.store_dim, args.store_file_rows
    folder = tempfile.mkdtemp(prefix="warren-store-bench-")
    spec = {"kind": "image", "dim": dim, "model": "benchmark"}
    try:
        rng = np.random.default_rng(0)
        keys = content_keys([i.to_bytes(8, "little") for i in range(n)])
        writer = EmbeddingStore(Location.of(folder), spec)
        t = time.perf_counter()
        for lo in range(0, n, per_file):
            vecs = rng.standard_normal((min(per_file, n - lo), dim)).astype(np.float16)
            writer.put(keys[lo : lo + per_file], vecs)
        write_s = time.perf_counter() - t
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
        print(
            f"store: {n:,} keys x {dim} float16 in {-(-n // per_file):,} files of {per_file} "
            f"({size / 1e6:.0f} MB), written at {n / write_s:,.0f} keys/s"
        )
        reader = EmbeddingStore(Location.of(folder), spec)
        t = time.perf_counter()
        reader.get(keys[:1])
        index_s = time.perf_counter() - t
        index_mb = (reader._keys.nbytes + reader._where.nbytes) / 1e6
        print(
            f"a new actor indexes it in {index_s:.1f} s (its first lookup; the key column only), "
            f"index {index_mb:.0f} MB ({1e6 * index_mb / n:.0f} bytes/key)"
        )
        batch = 256
        cases = {
            "rows of one stored file (re-run)": lambda j: keys[
                (j * per_file) % n : (j * per_file) % n + batch
            ],
            "random stored keys (worst case)": lambda j: [
                keys[i] for i in rng.integers(0, n, batch)
            ],
            "keys not stored (new rows)": lambda j: content_keys(
                [f"new-{j}-{i}".encode() for i in range(batch)]
            ),
        }
        for name, draw in cases.items():
            batches = [draw(j) for j in range(args.store_batches)]
            t = time.perf_counter()
            hits = sum(int(reader.get(b)[1].sum()) for b in batches)
            took = time.perf_counter() - t
            looked = sum(len(b) for b in batches)
            print(
                f"lookup, {name}: {looked / took:,.0f} keys/s "
                f"({1e3 * took / len(batches):.1f} ms a batch of {batch}; {hits} hits)"
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--model", default="open_clip:ViT-B-32")
    parser.add_argument("--model-batch-size", type=int, default=32)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA if any)")
    parser.add_argument("--store-keys", type=int, default=1_000_000)
    parser.add_argument("--store-dim", type=int, default=128)
    parser.add_argument("--store-file-rows", type=int, default=256)
    parser.add_argument("--store-batches", type=int, default=20)
    parser.add_argument("--skip", choices=["throughput", "store"], default=None)
    args = parser.parse_args(argv)
    if args.skip != "throughput":
        part_throughput(args)
    if args.skip != "store":
        part_store(args)


if __name__ == "__main__":
    main()
