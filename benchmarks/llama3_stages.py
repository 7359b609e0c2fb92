"""The Llama 3 recipe's new stages against a bare loop on the same rows, in one run.

    python benchmarks/llama3_stages.py [--rows 256] [--pool-rows 100000]

For each stage, rows/s of the stage's own code (`process` of a batch stage on the whole table, in
this process; `run` of ngram_resample on a local Ray) and of the loop a capable user would write
with the same library and model, on the same rows and cores, and their ratio (stage / bare):

- `ocr`: RapidOCR on each demo image (PIL decode, the engine called on the image);
- `watermark`: LAION's detector (timm EfficientNet-B3, random weights: the same arithmetic as the
  published ones) over torchvision-style preprocessing, batches of 32;
- `sscd`: a ResNet-50 TorchScript with a 512-d head (sscd_disc_mixup's backbone and width, random
  weights) at 320x320, batches of 32;
- `aesthetic`: the LAION-Aesthetics v2 MLP over stored 768-d embeddings, one torch call;
- `ngram_resample`: counting every caption unigram over the pool, then Llama 3's draw per row,
  in plain Python (collections.Counter, hashlib keys) vs the stage on Ray Data.

Images are the bundled demo pool's (160 px clip art and photographs), repeated to `--rows`. CPU
only here; the model stages pick the GPU when there is one. Numbers only: it asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import io
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from warren.pipelines.recipe import DEMO_DATA


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def demo_images(n: int) -> pa.Table:
    table = pq.read_table(DEMO_DATA, columns=["id", "images", "caption"])
    ok = [
        i for i, imgs in enumerate(table.column("images").to_pylist()) if imgs and imgs[0]["bytes"]
    ]
    good = []
    for i in ok:
        try:
            Image.open(io.BytesIO(table.column("images")[i].as_py()[0]["bytes"])).convert("RGB")
            good.append(i)
        except Exception:  # noqa: BLE001 - the pool has planted broken images
            continue
    picks = [good[k % len(good)] for k in range(n)]
    rows = table.take(pa.array(picks))
    return rows.set_column(0, "id", pa.array([f"r{k}" for k in range(n)]))


def pil_images(table: pa.Table) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(imgs[0]["bytes"])).convert("RGB")
        for imgs in table.column("images").to_pylist()
    ]


def report(name: str, rows: int, stage_s: float, bare_s: float) -> None:
    print(
        f"{name:15s} {rows / stage_s:10.1f} {rows / bare_s:10.1f} {bare_s / stage_s:8.2f}",
        flush=True,
    )


def bench_ocr(table: pa.Table) -> tuple[float, float]:
    from rapidocr_onnxruntime import RapidOCR

    from warren.stages.ocr import Ocr

    stage = Ocr()
    stage.setup()
    engine = RapidOCR()
    stage_s = timed(lambda: stage.process(table))
    bare_s = timed(lambda: [engine(img) for img in pil_images(table)])
    return stage_s, bare_s


def bench_watermark(table: pa.Table, folder: Path) -> tuple[float, float]:
    import torchvision.transforms as T

    from warren.stages.watermark import Watermark, detector

    torch.manual_seed(0)
    model = detector().eval()
    torch.save(model.state_dict(), folder / "wm.pt")
    stage = Watermark(model=str(folder / "wm.pt"), max_score=1.0)
    stage.setup()
    prep = T.Compose(
        [
            T.Resize((256, 256)),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )

    def bare() -> None:
        images = pil_images(table)
        with torch.inference_mode():
            for lo in range(0, len(images), 32):
                batch = torch.stack([prep(i) for i in images[lo : lo + 32]])
                torch.softmax(model(batch), dim=1)[:, 0].numpy()

    stage_s = timed(lambda: stage.process(table))
    return stage_s, timed(bare)


def bench_sscd(table: pa.Table, folder: Path) -> tuple[float, float]:
    import torchvision

    from warren.stages.sscd import Sscd

    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=512).eval()
    torch.jit.script(net).save(str(folder / "sscd.pt"))
    stage = Sscd(model=f"sscd:{folder / 'sscd.pt'}", store="none", model_batch_size=32)
    stage.setup()
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)

    def bare() -> None:
        images = pil_images(table)
        with torch.inference_mode():
            for lo in range(0, len(images), 32):
                x = [
                    (np.asarray(i.resize((320, 320), Image.BILINEAR), np.float32) / 255 - mean)
                    / std
                    for i in images[lo : lo + 32]
                ]
                batch = torch.from_numpy(np.stack(x).transpose(0, 3, 1, 2).copy())
                torch.nn.functional.normalize(net(batch), dim=1).numpy()

    stage_s = timed(lambda: stage.process(table))
    return stage_s, timed(bare)


def bench_aesthetic(n: int, folder: Path) -> tuple[float, float]:
    from warren.stages.aesthetic import Aesthetic, predictor

    torch.manual_seed(0)
    mlp = predictor(768).eval()
    torch.save(mlp.state_dict(), folder / "aesthetic.pth")
    vectors = np.random.default_rng(0).normal(size=(n, 768)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    col = pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float16).ravel()), 768)
    table = pa.table({"id": [str(i) for i in range(n)], "image_emb": col})
    stage = Aesthetic(model=str(folder / "aesthetic.pth"))
    stage.setup()

    def bare() -> None:
        col = table.column("image_emb").combine_chunks()
        x = col.values.to_numpy().reshape(len(col), 768).astype(np.float32)
        with torch.inference_mode():
            mlp.layers(torch.from_numpy(x))[:, 0].numpy()

    stage_s = timed(lambda: stage.process(table))
    return stage_s, timed(bare)


def bench_ngrams(n: int) -> tuple[float, float]:
    import hashlib

    import ray

    from warren.stages.base import GlobalContext
    from warren.stages.concept_balance import concept_words, sub_seed
    from warren.stages.ngram_resample import NgramResample

    rng = np.random.default_rng(0)
    words = [f"w{k}" for k in range(5000)]
    # Zipf-like word frequencies, 8 words a caption.
    p = 1 / np.arange(1, len(words) + 1)
    captions = [" ".join(rng.choice(words, 8, p=p / p.sum())) for _ in range(n)]
    table = pa.table({"id": [f"r{i}" for i in range(n)], "caption": captions})
    threshold = 200
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ds = ray.data.from_arrow([table.slice(i, 10_000) for i in range(0, n, 10_000)])
    stage = NgramResample(ngram_threshold=threshold)
    stage_s = timed(lambda: stage.run(ds, GlobalContext(n, 10, os.cpu_count())).materialize())
    ray.shutdown()

    def bare() -> None:
        grams = [set(concept_words(c)) for c in captions]
        count = collections.Counter(g for gs in grams for g in gs)
        key = sub_seed(0, "ngrams").to_bytes(8, "little", signed=True)
        kept = 0
        for rid, gs in zip(table.column("id").to_pylist(), grams, strict=True):
            found = [g for g in gs if count[g] >= 2]
            if any(count[g] < threshold for g in found):
                kept += 1
                continue
            for g in found:
                h = hashlib.blake2b(f"{rid}\x1f{g}".encode(), digest_size=8, key=key).digest()
                if int.from_bytes(h, "little") / 2.0**64 < math.sqrt(threshold / count[g]):
                    kept += 1
                    break

    return stage_s, timed(bare)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="image rows per model stage")
    parser.add_argument("--pool-rows", type=int, default=100_000, help="rows for the text stages")
    parser.add_argument("--only", default="", help="comma-separated stages to run")
    args = parser.parse_args()
    only = {s for s in args.only.split(",") if s}
    table = demo_images(args.rows)
    print(f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"{'stage':15s} {'stage r/s':>10s} {'bare r/s':>10s} {'ratio':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = {
            "ocr": lambda: (args.rows, *bench_ocr(table)),
            "watermark": lambda: (args.rows, *bench_watermark(table, folder)),
            "sscd": lambda: (args.rows, *bench_sscd(table, folder)),
            "aesthetic": lambda: (args.pool_rows, *bench_aesthetic(args.pool_rows, folder)),
            "ngram_resample": lambda: (args.pool_rows, *bench_ngrams(args.pool_rows)),
        }
        for name, run in runs.items():
            if not only or name in only:
                rows, stage_s, bare_s = run()
                report(name, rows, stage_s, bare_s)


if __name__ == "__main__":
    main()
