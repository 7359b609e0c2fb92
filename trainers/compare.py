"""compare: `warren compare`, curation recipes judged by the models they train.

The same proxy model is trained on each recipe's output with the same budget (stage, steps, batch
size, learning rate: the same number of samples; or, with a token budget (`max_tokens` of the
training config), the same number of tokens, each run ending at the step that reaches it), once
per seed, and each checkpoint is
evaluated on the same tasks (trainers.evaluate). The report (`compare.html`, `compare.json`)
gives, per task, each recipe's metric over the seeds (mean, standard deviation, range, every
value), the data behind each recipe (rows, sources, caption length, CLIP score, how many rows the
recipes share) and a verdict only where two recipes' ranges over the seeds do not overlap:
anything closer is reported as within the seed spread, not as a win.

Seeds pair up: seed k trains every recipe from the same initial projector, in the same data
order. With a budget in samples, tokens differ when captions do; the report shows both.
"""

from __future__ import annotations

import html
import itertools
import json
import logging
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from warren.trainers.config import TrainConfig
from warren.trainers.data import shard_files

log = logging.getLogger("warren.trainers.compare")


def data_stats(data: str, captions: bool = False) -> tuple[dict[str, Any], set[str]]:
    """What a recipe's output holds: rows, the largest sources, caption length in words and the
    CLIP score (when the rows carry one), as (stats, the set of row ids); `captions` adds the
    captions themselves."""
    ids: set[str] = set()
    sources: Counter[str] = Counter()
    words: list[int] = []
    scores: list[float] = []
    texts: list[str] = []
    for path in shard_files(data):
        names = set(pq.read_schema(path).names)
        wanted = [c for c in ("id", "source", "caption", "clip_score") if c in names]
        table = pq.read_table(path, columns=wanted).to_pydict()
        ids.update(str(i) for i in table.get("id", []))
        sources.update(str(s) for s in table.get("source", []) if s is not None)
        words += [len(str(c).split()) for c in table.get("caption", []) if c]
        if captions:
            texts += [str(c) for c in table.get("caption", []) if c]
        scores += [float(s) for s in table.get("clip_score", []) if s is not None]
    stats: dict[str, Any] = {
        "rows": len(ids),
        "sources": dict(sources.most_common(8)),
        "caption_words": _quantiles(words),
        "clip_score": _quantiles(scores),
    }
    if captions:
        stats["captions"] = texts
    return stats, ids


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def q(p: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(p * len(ordered)))])

    return {"mean": float(statistics.fmean(ordered)), "p10": q(0.1), "p50": q(0.5), "p90": q(0.9)}


def overlap(ids: Mapping[str, set[str]]) -> dict[str, dict[str, dict[str, float]]]:
    """Rows each pair of recipes both kept, and their Jaccard index."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for a, b in itertools.combinations(ids, 2):
        shared = len(ids[a] & ids[b])
        union = len(ids[a] | ids[b])
        out.setdefault(a, {})[b] = {"shared": shared, "jaccard": shared / union if union else 0.0}
    return out


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation, range and the values themselves."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


def verdicts(scores: Mapping[str, Mapping[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """`scores[task][recipe]` is a spread. For each task and pair of recipes: the better one
    when every seed of it beats every seed of the other (their ranges do not overlap), else
    "within the seed spread"."""
    out = []
    for task, by_recipe in scores.items():
        for a, b in itertools.combinations(by_recipe, 2):
            sa, sb = by_recipe[a], by_recipe[b]
            if sa["min"] > sb["max"]:
                winner, loser = a, b
            elif sb["min"] > sa["max"]:
                winner, loser = b, a
            else:
                out.append({"task": task, "recipes": [a, b], "winner": None,
                            "difference": sa["mean"] - sb["mean"]})  # fmt: skip
                continue
            diff = by_recipe[winner]["mean"] - by_recipe[loser]["mean"]
            out.append(
                {"task": task, "recipes": [a, b], "winner": winner, "loser": loser,
                 "difference": diff}
            )  # fmt: skip
    return out


def headline(metrics: Mapping[str, float]) -> tuple[str, float]:
    """A task's first metric: accuracy, or CIDEr for captions (trainers.evaluate's order)."""
    name = next(iter(metrics))
    return name, metrics[name]


def compare(
    recipes: Mapping[str, str],
    output: str,
    *,
    tasks: Sequence[str],
    eval_data: Sequence[str],
    train: TrainConfig,
    seeds: Sequence[int] = (0, 1, 2),
    eval_batch_size: int = 8,
    limit: int | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Train `train` (its data and output replaced) on each recipe once per seed, evaluate
    every checkpoint, and write OUTPUT/compare.json and OUTPUT/compare.html; return the
    results. `recipes` maps a name to a stage folder or Parquet files."""
    import dataclasses

    from warren.trainers.evaluate import evaluate
    from warren.trainers.llava import resolve
    from warren.trainers.llava import train as run_training

    if len(recipes) < 2:
        raise ValueError("compare needs at least two recipes")
    if len(seeds) < 2:
        raise ValueError("compare needs at least two seeds to measure their spread (three or more)")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stats, ids = {}, {}
    for name, data in recipes.items():
        stats[name], ids[name] = data_stats(data)
        if not ids[name]:
            raise ValueError(f"recipe {name!r}: {data} holds no rows to train on")
    runs: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in recipes}
    for seed in seeds:
        for name, data in recipes.items():
            folder = out / "runs" / name / f"seed-{seed}"
            log.info("recipe %s, seed %d: training in %s", name, seed, folder)
            config = dataclasses.replace(
                train, data=[data], output=str(folder / "model"), seed=seed, workers=0
            )
            summary = run_training(config)
            if train.max_tokens and not summary.get("max_tokens_reached"):
                raise ValueError(
                    f"recipe {name!r}, seed {seed}: {summary['steps']} steps trained "
                    f"{summary['tokens']:,} tokens, short of the budget of {train.max_tokens:,}: "
                    "raise --steps (the cap) so every run reaches the budget"
                )
            results = evaluate(
                str(folder / "model"), tasks, eval_data, str(folder / "eval"),
                batch_size=eval_batch_size, limit=limit, max_new_tokens=max_new_tokens,
                device=train.device,
            )  # fmt: skip
            runs[name][seed] = {
                "tokens": summary["tokens"],
                "samples": summary["samples"],
                "steps": summary["steps"],
                "last_loss": summary["last_loss"],
                "metrics": {t: r["metrics"] for t, r in results["tasks"].items()},
            }
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for task in tasks:
        for name in recipes:
            values = [headline(runs[name][s]["metrics"][task])[1] for s in seeds]
            scores.setdefault(task, {})[name] = spread(values)
    metric_names = {
        t: headline(runs[next(iter(recipes))][seeds[0]]["metrics"][t])[0] for t in tasks
    }
    report = {
        "recipes": dict(recipes),
        "seeds": list(seeds),
        "budget": {
            "stage": train.stage,
            "steps": train.max_steps,
            "batch_size": train.batch_size,
            "grad_accum": train.grad_accum,
            "lr": resolve(dataclasses.replace(train, data=["-"], output="-")).lr,
            "samples": train.max_steps * train.batch_size * train.grad_accum
            if train.max_steps and not train.max_tokens
            else None,
            "tokens": train.max_tokens,
        },
        "tasks": list(tasks),
        "metric": metric_names,
        "scores": scores,
        "verdicts": verdicts(scores),
        "data": stats,
        "overlap": overlap(ids),
        "runs": {n: {str(s): r for s, r in by.items()} for n, by in runs.items()},
    }
    (out / "compare.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "compare.html").write_text(render_html(report))
    return report


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 980px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border-bottom: 1px solid #ddd; padding: .35em .7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { font-size: 1.15em; padding: .7em 1em; border-radius: 6px; margin: .5em 0; }
.win { background: #e3f4e1; border-left: 6px solid #2e8b2e; }
.tie { background: #f1f1f1; border-left: 6px solid #999; }
.note { color: #666; font-size: .9em; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _dots(values_by_recipe: Mapping[str, Sequence[float]]) -> str:
    """An inline SVG: one row per recipe, a dot per seed and a bar at the mean, on one axis."""
    everything = [v for vs in values_by_recipe.values() for v in vs]
    lo, hi = min(everything), max(everything)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.08
    lo, hi = lo - pad, hi + pad
    width, row, left = 520, 26, 150

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (width - left - 20)

    parts = [f'<svg width="{width}" height="{row * len(values_by_recipe) + 24}" role="img">']
    for i, (name, vs) in enumerate(values_by_recipe.items()):
        y = 16 + i * row
        parts.append(f'<text x="4" y="{y + 4}" font-size="12">{_e(name)}</text>')
        parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{y}" y2="{y}" stroke="#eee"/>')
        for v in vs:
            parts.append(f'<circle cx="{x(v):.1f}" cy="{y}" r="4" fill="#3366aa" opacity=".75"/>')
        m = statistics.fmean(vs)
        parts.append(
            f'<line x1="{x(m):.1f}" x2="{x(m):.1f}" y1="{y - 8}" y2="{y + 8}" stroke="#c33" '
            'stroke-width="2"/>'
        )
    y = 16 + len(values_by_recipe) * row
    parts.append(f'<text x="{left}" y="{y}" font-size="11" fill="#666">{_fmt(lo)}</text>')
    parts.append(
        f'<text x="{width - 20}" y="{y}" font-size="11" fill="#666" text-anchor="end">'
        f"{_fmt(hi)}</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: Mapping[str, Any]) -> str:
    """The comparison as one self-contained page: verdicts first, then the scores, the data."""
    names = list(report["recipes"])
    seeds = report["seeds"]
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>warren compare</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Which recipe made the better model: {' vs '.join(_e(n) for n in names)}</h1>",
    ]
    b = report["budget"]
    length = (
        f"up to {_e(b['steps'])} steps, each run ending at {b['tokens']:,} tokens, "
        if b.get("tokens")
        else f"{_e(b['steps'])} steps "
    )
    out.append(
        f"<p class='note'>The same proxy, {_e(b['stage'])} stage, {length}of "
        f"{_e(b['batch_size'])} x {_e(b['grad_accum'])} samples at lr {_e(b['lr'])}, on each "
        f"recipe, once per seed ({', '.join(map(str, seeds))}). A recipe wins a task only when "
        "every seed of it beats every seed of the other.</p>"
    )
    out.append("<h2>Verdict</h2>")
    for v in report["verdicts"]:
        metric = report["metric"][v["task"]]
        if v["winner"]:
            out.append(
                f"<div class='verdict win'><b>{_e(v['winner'])}</b> beats {_e(v['loser'])} on "
                f"<b>{_e(v['task'])}</b> ({_e(metric)} +{_fmt(v['difference'])}, beyond the "
                "seed spread)</div>"
            )
        else:
            a, c = v["recipes"]
            out.append(
                f"<div class='verdict tie'>No verdict on <b>{_e(v['task'])}</b> between "
                f"{_e(a)} and {_e(c)}: the difference ({_e(metric)}, {_e(a)} minus {_e(c)}: "
                f"{_fmt(v['difference'])}) is within the seed spread</div>"
            )
    out.append("<h2>Scores over seeds</h2>")
    for task, by_recipe in report["scores"].items():
        metric = report["metric"][task]
        out.append(f"<h3>{_e(task)} ({_e(metric)})</h3><table><tr><th>recipe</th>")
        out.append("<th>mean</th><th>std</th><th>min</th><th>max</th><th>per seed</th></tr>")
        for name, s in by_recipe.items():
            values = ", ".join(_fmt(v) for v in s["values"])
            out.append(
                f"<tr><td>{_e(name)}</td><td class='num'>{_fmt(s['mean'])}</td>"
                f"<td class='num'>{_fmt(s['std'])}</td><td class='num'>{_fmt(s['min'])}</td>"
                f"<td class='num'>{_fmt(s['max'])}</td><td class='num'>{values}</td></tr>"
            )
        out.append("</table>")
        out.append(_dots({n: s["values"] for n, s in by_recipe.items()}))
    out.append("<h2>The data behind each recipe</h2><table><tr><th>recipe</th><th>rows</th>")
    out.append("<th>caption words (p10 / p50 / p90)</th><th>CLIP score (p10 / p50 / p90)</th>")
    out.append("<th>samples / tokens trained (mean over seeds)</th><th>largest sources</th></tr>")
    for name in names:
        d = report["data"][name]
        words, clip = d["caption_words"], d["clip_score"]
        runs = report["runs"][name].values()
        tokens = statistics.fmean(r["tokens"] for r in runs)
        samples = statistics.fmean(r.get("samples", 0) for r in runs)
        sources = ", ".join(f"{_e(k)} {v}" for k, v in d["sources"].items())
        out.append(
            f"<tr><td>{_e(name)}</td><td class='num'>{d['rows']}</td>"
            f"<td class='num'>{_q(words, 0)}</td><td class='num'>{_q(clip, 3)}</td>"
            f"<td class='num'>{samples:,.0f} / {tokens:,.0f}</td><td>{sources or '-'}</td></tr>"
        )
    out.append("</table><h2>Overlap of the kept rows</h2><table>")
    out.append("<tr><th>recipes</th><th>rows in both</th><th>Jaccard</th></tr>")
    for a, others in report["overlap"].items():
        for c, o in others.items():
            out.append(
                f"<tr><td>{_e(a)} / {_e(c)}</td><td class='num'>{o['shared']}</td>"
                f"<td class='num'>{_fmt(o['jaccard'], 3)}</td></tr>"
            )
    out.append("</table>")
    out.append(
        "<p class='note'>Each run's checkpoint, evaluation and predictions: "
        "runs/RECIPE/seed-K/model and runs/RECIPE/seed-K/eval; every number here is in "
        "compare.json.</p></body></html>"
    )
    return "\n".join(out)


def _q(q: Mapping[str, float] | None, digits: int) -> str:
    if not q:
        return "-"
    return " / ".join(_fmt(q[k], digits) for k in ("p10", "p50", "p90"))


# --------------------------------------------------------------------------------------------
# The demo: a tiny proxy and a caption task from the demo pool
# --------------------------------------------------------------------------------------------


def word_level_tokenizer(
    corpus: Sequence[str],
    special: Sequence[str] = ("<image>",),
    plain: Sequence[str] = (),
    lowercase: bool = False,
) -> Any:
    """A word-level tokenizer over the corpus's words that, like Llama's, puts bos in front of
    what it encodes; `special` are added as special tokens (as llava-hf adds `<image>`), `plain`
    as ordinary added tokens (e.g. a newline). The demo's proxy and the tests' tiny models use
    it: no download."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    fold = str.lower if lowercase else str
    words = sorted({fold(w) for text in corpus for w, _ in pre.pre_tokenize_str(text)})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if special:
        tok.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True
        )
    if plain:
        tok.add_tokens([AddedToken(t, normalized=False) for t in plain])
    return tok


def tiny_proxy(root: Path, texts: Sequence[str], seed: int = 0) -> tuple[str, str]:
    """A tiny CLIP tower and Llama LM from configs (random weights, `seed`), with a word-level
    tokenizer over `texts`: a proxy that trains in seconds on a CPU, for the demo."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tok = word_level_tokenizer(texts, lowercase=True)
    torch.manual_seed(seed)
    tower = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128)
    vision = CLIPVisionModel(CLIPVisionConfig(**tower, num_hidden_layers=2, num_attention_heads=4))
    vision.save_pretrained(root / "vision")
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(root / "vision")
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )
    lm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return str(root / "vision"), str(root / "llm")


def caption_task(data: str, folder: Path, n: int, *, exclude: set[str] = frozenset()) -> int:
    """Write up to `n` rows of `data` that are not in `exclude` as a COCO-format caption task
    (`folder/captions.json` and the images): held-out rows to score captions on. Returns the
    number written."""
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for path in shard_files(data):
        table = pq.read_table(path, columns=["id", "images", "caption"]).to_pylist()
        for row in table:
            pictures = row.get("images") or []
            if row["id"] in exclude or not row.get("caption") or not pictures:
                continue
            data_bytes = pictures[0].get("bytes")
            if not data_bytes:
                continue
            k = len(images)
            name = f"{k:05d}.{_suffix(data_bytes)}"
            (folder / name).write_bytes(data_bytes)
            images.append({"id": k, "file_name": name})
            annotations.append({"image_id": k, "caption": row["caption"]})
            if len(images) >= n:
                break
        if len(images) >= n:
            break
    (folder / "captions.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )
    return len(images)


def _suffix(data: bytes) -> str:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return {"JPEG": "jpg"}.get(img.format or "", (img.format or "png").lower())
    except Exception:  # an undecodable image: the evaluation reports it when it asks
        return "png"
