"""Perplexity throughput: the `perplexity` stage through the runner vs. a plain transformers loop.

    python benchmarks/perplexity.py --rows 2000 --model smollm2

Texts are captions of the demo pool (pipelines/demo_data/demo.parquet) joined one to three at a
time by a seeded draw, so lengths vary (about 2 to 60 tokens) the way alt-text does; they are
written as one Parquet file of `--rows` rows and run through a one-stage pipeline on one local Ray
instance. Printed, in texts/s:

- the stage through the runner: rows / the stage's own seconds from its manifest (actor start,
  model load, Parquet read and write, the ledger included; the ingest copy of the input is not),
  and the rate beyond the fixed cost of a run, the stage's seconds on 32 texts;
- a plain batched transformers loop in this process on the same model, dtype and texts: the
  tokenizer pads each batch of `--plain-batch-size` texts, one forward, cross-entropy over the
  shifted labels with pads masked. Once in input order and once with all texts sorted by token
  length first (the best a plain loop can do: it sees every text, the stage one Ray batch at a
  time); the faster of the two is the baseline of the ratio, and 32 texts a forward was its best
  batch size on one CPU thread;
- three ratios of the stage to the best plain loop: for the whole stage, beyond its fixed cost,
  and against the plain loop with its own model load counted (the stage's seconds include its
  load, and a script that scores a file loads the model too);
- the stage's scoring function (`Perplexity.score`) in this process, on the Ray batches the runner
  would give it, with length-sorted micro-batches on and off: the effect of sorting alone, and of
  the stage's batching against the plain loop, without Ray in the way.

Threads. Ray gives each worker OMP_NUM_THREADS = its num_cpus, and torch runs that many
intra-op threads. Without a GPU the runner gives the stage actors that together hold every CPU,
each of up to 8 (`ray_session.map_resources`; on 2 cores one actor of 2 CPUs). Every in-process
measurement here uses the thread count measured inside a Ray actor of that size, so the ratio
compares the stage with a plain loop on the same cores; the plain loop on all of this process's
threads is printed too. With GPUs the runner starts one actor per GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from cpu_split import CpuSplit

from warren.pipelines.ray_session import map_resources
from warren.pipelines.recipe import DEMO_DATA
from warren.pipelines.runner import Pipeline, Runner, ensure_ray
from warren.stages.perplexity import Perplexity
from warren.stages.schema import conform

FIXED_ROWS = 32  # a run this small costs what any run costs before its first batch


def make_texts(rows: int, seed: int) -> list[str]:
    captions = [
        c.strip()
        for c in pq.read_table(DEMO_DATA, columns=["caption"]).column("caption").to_pylist()
        if c and c.strip()
    ]
    rng = np.random.default_rng(seed)
    joins = [", ", " and ", ". ", " with "]
    texts = []
    for _ in range(rows):
        parts = [captions[i] for i in rng.choice(len(captions), rng.choice([1, 2, 3]))]
        text = parts[0]
        for p in parts[1:]:
            text += joins[rng.integers(len(joins))] + p[0].lower() + p[1:]
        texts.append(text)
    return texts


def plain_loop(lm, texts: Sequence[str], batch_size: int, sort: bool) -> np.ndarray:
    """Perplexity per text the way one writes it with transformers alone."""
    import torch
    import torch.nn.functional as F

    tok = lm.tokenizer
    order = list(range(len(texts)))
    if sort:
        lengths = [len(ids) for ids in tok(list(texts))["input_ids"]]
        order.sort(key=lambda i: lengths[i])
    out = np.empty(len(texts))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        enc = tok([texts[i] for i in chunk], padding=True, return_tensors="pt").to(lm.device)
        with torch.inference_mode():
            logits = lm.module(**enc, use_cache=False).logits
            labels = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
            nll = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, reduction="none"
            ).sum(1)
            out[chunk] = torch.exp(nll.double() / (labels != -100).sum(1)).cpu().numpy()
    return out


def score_in_ray_batches(stage: Perplexity, texts: Sequence[str]) -> list[np.ndarray]:
    """The stage's scoring on the Ray batches the runner would hand it (it sorts within each)."""
    step = stage.batch_size
    return [stage.score(texts[i : i + step])[0] for i in range(0, len(texts), step)]


def actor_threads(num_cpus: float) -> tuple[int, str]:
    """torch's thread count and OMP_NUM_THREADS inside a Ray actor of `num_cpus` CPUs."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    class Probe:
        def threads(self) -> tuple[int, str]:
            import torch

            return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS", "unset")

    probe = Probe.remote()
    try:
        return ray.get(probe.threads.remote())
    finally:
        ray.kill(probe)


def run_stage(model: str, src: Path, out: Path) -> tuple[float, dict, float]:
    """(the stage's seconds from its manifest, the manifest, the whole run's seconds)."""
    seconds, _ = timed(
        Runner(
            Pipeline("bench", [Perplexity(model=model)]),
            str(src),
            str(out),
            input_format="parquet",
            progress=False,
        ).run
    )
    manifest = json.loads((out / "01-perplexity" / "_manifest.json").read_text())
    return manifest["seconds"], manifest, seconds


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--plain-batch-size",
        type=int,
        default=32,
        help="texts per forward of the plain loop (32: its best on one CPU thread)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()

    import torch

    work = Path(args.workdir or tempfile.mkdtemp(prefix="warren-bench-ppl-"))
    try:
        texts = make_texts(args.rows, args.seed)
        src = work / "input"
        src.mkdir(parents=True, exist_ok=True)
        ids = [f"t-{i:06d}" for i in range(len(texts))]
        pq.write_table(
            conform(pa.table({"id": ids, "caption": texts, "source": ["bench"] * len(texts)})),
            src / "captions.parquet",
        )

        all_threads = torch.get_num_threads()
        ensure_ray()
        stage = Perplexity(model=args.model)
        actor_cpus = map_resources(stage)["num_cpus"]
        threads, omp = actor_threads(actor_cpus)
        # The plain loop's own model load, counted in the third ratio: a script loads it too.
        load_s, _ = timed(stage.setup)
        lm = stage.lm
        lengths = [len(t) for t in lm.tokenizer(texts)["input_ids"]]
        print(
            f"{len(texts):,} texts, {sum(lengths):,} tokens (mean {np.mean(lengths):.1f}, "
            f"max {max(lengths)}); model {lm.name} on {lm.device}, "
            f"{next(lm.module.parameters()).dtype}"
        )
        print(
            f"stage: Ray batches of {stage.batch_size} texts, forwards of at most "
            f"{stage.params.model_batch_size} texts and {stage.batch_tokens} padded tokens; "
            f"plain loop: forwards of {args.plain_batch_size} texts"
        )
        print(
            f"threads: the stage's Ray actor (num_cpus={actor_cpus:g}): torch {threads} "
            f"(OMP_NUM_THREADS={omp}); this process: {all_threads} (os.cpu_count {os.cpu_count()})"
        )

        torch.set_num_threads(threads)
        plain_loop(lm, texts[:64], args.plain_batch_size, sort=True)  # warm-up
        plain = {}
        for sort in (False, True):
            seconds, ref = timed(plain_loop, lm, texts, args.plain_batch_size, sort)
            plain[sort] = seconds
            order = "sorted" if sort else "input order"
            print(
                f"plain transformers loop, {threads} thread(s), {order}: "
                f"{seconds:.1f} s, {len(texts) / seconds:,.1f} texts/s"
            )
        sorted_ref = ref

        fn = {}
        for sort in (True, False):
            s = Perplexity(model=args.model, sort_by_length=sort)
            s.lm, s.max_length, s.stride = lm, stage.max_length, stage.stride
            s.batch_tokens = stage.batch_tokens
            seconds, parts = timed(score_in_ray_batches, s, texts)
            fn[sort] = seconds
            got = np.concatenate(parts)
            both = np.isfinite(got) & np.isfinite(sorted_ref)  # 1-token texts: no ppl
            diff = np.max(np.abs(got[both] / sorted_ref[both] - 1))
            print(
                f"stage scoring function, {threads} thread(s), sort_by_length={sort}: "
                f"{seconds:.1f} s, {len(texts) / seconds:,.1f} texts/s "
                f"(max relative difference to the plain loop {diff:.1e})"
            )

        with CpuSplit() as split:
            stage_s, manifest, seconds = run_stage(args.model, src, work / "out")
        print(
            f"runner: perplexity stage {stage_s:.1f} s ({len(texts) / stage_s:,.1f} texts/s, "
            f"{manifest['kept']:,} kept, {manifest['rejected']:,} rejected, "
            f"{manifest['sums'].get('ppl_tokens', 0):,.0f} tokens scored); "
            f"whole run {seconds:.1f} s"
        )
        print(f"  the whole run's {split.line()}")
        small = work / "small"
        small.mkdir()
        pq.write_table(
            pq.read_table(src / "captions.parquet").slice(0, FIXED_ROWS), small / "captions.parquet"
        )
        fixed_s, _, _ = run_stage(args.model, small, work / "out-small")
        marginal = (len(texts) - FIXED_ROWS) / max(stage_s - fixed_s, 1e-9)
        print(
            f"runner on {FIXED_ROWS} texts: {fixed_s:.1f} s, the fixed cost of a run (worker "
            f"start, torch import, model load, Ray Data planning); "
            f"beyond it {marginal:,.1f} texts/s"
        )

        torch.set_num_threads(all_threads)
        seconds, _ = timed(plain_loop, lm, texts, args.plain_batch_size, True)
        print(
            f"plain transformers loop, {all_threads} thread(s), sorted: {seconds:.1f} s, "
            f"{len(texts) / seconds:,.1f} texts/s"
        )
        best = min(plain.values())
        print(
            f"ratio runner stage / best plain loop at {threads} thread(s) (texts/s): "
            f"{best / stage_s:.2f} for the whole stage, "
            f"{marginal * best / len(texts):.2f} beyond its fixed cost, "
            f"{(best + load_s) / stage_s:.2f} against the plain loop with its model load "
            f"({load_s:.1f} s)"
        )
        print(f"ratio stage scoring function / best plain loop (texts/s): {best / fn[True]:.2f}")
        print(f"length-sorted micro-batches: {fn[False] / fn[True]:.2f}x the texts/s of unsorted")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray runs its workers at niceness 15; the plain loops run in this process at 0. On a machine
    # others load, that alone would slow the stage: its workers run at this process's niceness.
    os.environ.setdefault("RAY_worker_niceness", "0")
    main()
