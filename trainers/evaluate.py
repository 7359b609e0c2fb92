"""evaluate: `warren eval CHECKPOINT --tasks ...`, a checkpoint's scores on benchmark files.

```
warren eval runs/instruct --tasks pope,textvqa,mmbench --data /data/eval --output runs/instruct/eval
warren eval llava-1.5-7b --endpoint http://127.0.0.1:8000/v1 --tasks pope --data /data/eval
```

The model answers in-process (`LlavaForConditionalGeneration` and the checkpoint's processor,
batched greedy generation, on the GPU when there is one), or through an OpenAI-compatible chat
endpoint such as vLLM serving the checkpoint (`--endpoint URL`, `--model` its served name; the
requests go through stages.llm_client, with its retries and concurrency limit). Prompts go
through the checkpoint's chat template in both cases (warren's checkpoints carry the one they
were trained with), with the image first, as LLaVA asks.

What it writes under OUTPUT: `results.json` (per task: the metrics, the counts of items asked,
answered, failed and without an image, and the metrics per category), `results.md` (the same as a
table, also printed), and `predictions/<task>.jsonl` (per item: the prompt, the answer, what was
read from it, the references and its score) for a person to look at. An item whose image is not
found, or whose request failed, is counted and listed, never scored as if it had been asked; a task
with no answered item fails the command.

Tasks and their files: trainers/eval_tasks.py; metrics: trainers/eval_metrics.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from warren.trainers.eval_metrics import (
    choice_letter,
    cider,
    gqa_match,
    pope_answer,
    pope_metrics,
    require_java,
    vqa_accuracy,
)
from warren.trainers.eval_tasks import TASKS, EvalItem, Task, TaskDataError

log = logging.getLogger("warren.trainers.evaluate")


class Backend(Protocol):
    def answer(self, items: Sequence[EvalItem], max_new_tokens: int) -> list[str | None]:
        """One answer per item, None where the model could not be asked (a failed request)."""
        ...


def _image_bytes(item: EvalItem) -> bytes:
    if isinstance(item.image, bytes):
        return item.image
    with open(str(item.image), "rb") as f:
        return f.read()


class LocalModel:
    """A Hugging Face LLaVA checkpoint, generating greedily in batches of `batch_size`."""

    def __init__(self, checkpoint: str, *, batch_size: int = 8, device: str = "auto"):
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.torch = torch
        self.device = device
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(
                f"{checkpoint}: the processor has no chat template, so the prompt format the "
                "model was trained with is unknown (checkpoints from warren train carry it; set "
                "processor.chat_template and save the processor again)"
            )
        # Decoder-only generation in batches: pad on the left so every prompt ends where the
        # answer starts.
        self.processor.tokenizer.padding_side = "left"
        self.model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
        self.model.to(device).eval()

    def answer(self, items: Sequence[EvalItem], max_new_tokens: int) -> list[str | None]:
        from warren.stages.images import decode_image

        out: list[str | None] = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            prompts = [
                self.processor.apply_chat_template(
                    _messages(item.prompt), add_generation_prompt=True
                )
                for item in batch
            ]
            images = [decode_image(_image_bytes(item)) for item in batch]
            inputs = self.processor(
                text=prompts, images=images, padding=True, return_tensors="pt"
            ).to(self.device)
            with self.torch.inference_mode():
                generated = self.model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.processor.tokenizer.pad_token_id,
                )
            new = generated[:, inputs["input_ids"].shape[1] :]
            out += [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]
        return out


class Endpoint:
    """An OpenAI-compatible chat endpoint (vLLM, SGLang, ...) serving the model as `model`."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        concurrency: int = 8,
        api_key_env: str = "OPENAI_API_KEY",
    ):
        from warren.stages.llm_client import ClientConfig

        self.config = ClientConfig(
            model=model,
            base_url=base_url,
            api_key_env=api_key_env,
            max_concurrency=concurrency,
        )
        self.errors: dict[str, str] = {}

    def answer(self, items: Sequence[EvalItem], max_new_tokens: int) -> list[str | None]:
        from warren.prompts import image_data_url
        from warren.stages.images import endpoint_image_bytes
        from warren.stages.llm_client import ChatRequest, run_requests

        requests = []
        for item in items:
            url = image_data_url(endpoint_image_bytes(_image_bytes(item)))
            content = [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": item.prompt},
            ]
            requests.append(
                ChatRequest(
                    messages=[{"role": "user", "content": content}],
                    params={"max_tokens": max_new_tokens, "temperature": 0.0},
                )
            )
        results = run_requests(requests, self.config)
        answers: list[str | None] = []
        for item, result in zip(items, results, strict=True):
            if result.ok and result.text is not None:
                answers.append(result.text.strip())
            else:
                self.errors[item.id] = result.error or "no text in the reply"
                answers.append(None)
        return answers


def _messages(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def score(task: Task, items: Sequence[EvalItem], answers: Sequence[str | None]) -> dict[str, Any]:
    """The task's metrics over the answered items (percentages; CIDEr times 100, as papers give
    it), the metrics per category, and per item what was read from its answer and its score."""
    asked = [(i, a) for i, a in zip(items, answers, strict=True) if a is not None]
    read: dict[str, str | None] = {}
    per_item: dict[str, float] = {}
    metrics: dict[str, float] = {}
    by_category: dict[str, dict[str, float]] = {}
    if not asked:
        return {"metrics": {}, "by_category": {}, "read": read, "scores": per_item}
    if task.kind in ("vqa", "gqa"):
        for item, answer in asked:
            per_item[item.id] = (
                vqa_accuracy(answer, item.answers)
                if task.kind == "vqa"
                else gqa_match(answer, item.answers[0])
            )
        metrics = {"accuracy": _mean_pct(per_item.values())}
        by_category = _per_category(asked, per_item, "accuracy")
    elif task.kind == "pope":
        for item, answer in asked:
            read[item.id] = pope_answer(answer)
            per_item[item.id] = float(read[item.id] == item.answers[0])
        metrics = _pope(asked, read)
        groups: dict[str, list] = defaultdict(list)
        for item, answer in asked:
            groups[item.category].append((item, answer))
        by_category = (
            {c: _pope(g, read) for c, g in sorted(groups.items())} if len(groups) > 1 else {}
        )
    elif task.kind == "choice":
        for item, answer in asked:
            read[item.id] = choice_letter(answer, item.options)
            per_item[item.id] = float(read[item.id] == item.answers[0])
        metrics, by_category = _choices(items, answers, per_item, read)
    elif task.kind == "caption":
        corpus, each = cider({i.id: a for i, a in asked}, {i.id: list(i.answers) for i, _ in asked})
        per_item = {k: 100 * v for k, v in each.items()}
        metrics = {"cider": 100 * corpus}
    else:  # pragma: no cover - TASKS names only the kinds above
        raise ValueError(f"unknown task kind {task.kind!r}")
    return {"metrics": metrics, "by_category": by_category, "read": read, "scores": per_item}


def _mean_pct(values: Any) -> float:
    values = list(values)
    return 100 * sum(values) / len(values) if values else 0.0


def _per_category(asked: list, per_item: dict[str, float], name: str) -> dict[str, dict]:
    groups: dict[str, list[float]] = defaultdict(list)
    for item, _ in asked:
        if item.category:
            groups[item.category].append(per_item[item.id])
    if len(groups) < 2:
        return {}
    return {c: {name: _mean_pct(v), "n": len(v)} for c, v in sorted(groups.items())}


def _pope(asked: list, read: dict[str, str | None]) -> dict[str, float]:
    got = pope_metrics([read[i.id] for i, _ in asked], [i.answers[0] for i, _ in asked])
    return {k: 100 * v for k, v in got.items()}


def _choices(
    items: Sequence[EvalItem],
    answers: Sequence[str | None],
    per_item: dict[str, float],
    read: dict[str, str | None],
) -> tuple[dict[str, float], dict[str, dict]]:
    """Accuracy over questions: a question asked in several rotations (MMBench's circular
    evaluation) is right only when every rotation is, and is left out when one was not asked."""
    groups: dict[str, list[tuple[EvalItem, str | None]]] = defaultdict(list)
    for item, answer in zip(items, answers, strict=True):
        groups[item.group or item.id].append((item, answer))
    right: dict[str, float] = {}
    category: dict[str, str] = {}
    for key, members in groups.items():
        if all(a is not None for _, a in members):
            right[key] = float(all(per_item[i.id] == 1.0 for i, _ in members))
            category[key] = members[0][0].category
    metrics = {
        "accuracy": _mean_pct(right.values()),
        "unreadable": _mean_pct(float(read[k] is None) for k in per_item),
    }
    if any(len(m) > 1 for m in groups.values()):
        # The plain accuracy of the first rotation, for comparison with single-pass numbers.
        metrics["accuracy_first_pass"] = _mean_pct(
            per_item[m[0][0].id] for m in groups.values() if m[0][1] is not None
        )
    cats: dict[str, list[float]] = defaultdict(list)
    for key, value in right.items():
        if category[key]:
            cats[category[key]].append(value)
    by_category = (
        {c: {"accuracy": _mean_pct(v), "n": len(v)} for c, v in sorted(cats.items())}
        if len(cats) > 1
        else {}
    )
    return metrics, by_category


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def task_folders(tasks: Sequence[str], data: Sequence[str]) -> dict[str, Path]:
    """Each task's folder: `TASK=FOLDER` entries of `data`, else ROOT/TASK under the one ROOT."""
    named = {}
    roots = []
    for entry in data:
        name, sep, folder = entry.partition("=")
        if sep and name in TASKS:
            named[name] = Path(folder)
        else:
            roots.append(Path(entry))
    out = {}
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        if task in named:
            out[task] = named[task]
            continue
        found = [r / task for r in roots if (r / task).is_dir()]
        if len(found) != 1:
            where = ", ".join(str(r) for r in roots) or "no --data root"
            raise ValueError(
                f"task {task!r}: {'no' if not found else 'more than one'} folder {task}/ under "
                f"{where}; give --data ROOT (holding {task}/) or --data {task}=FOLDER"
            )
        out[task] = found[0]
    for task, folder in out.items():
        if not folder.is_dir():
            raise ValueError(f"task {task!r}: {folder} is not a folder")
    return out


def evaluate(
    checkpoint: str | None,
    tasks: Sequence[str],
    data: Sequence[str],
    output: str,
    *,
    endpoint: str | None = None,
    model: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    device: str = "auto",
    backend: Backend | None = None,
) -> dict[str, Any]:
    """Evaluate and write OUTPUT/results.json, results.md and predictions/; return the results.
    `backend` replaces the model (tests). Raises ValueError (TaskDataError) for tasks, data or
    settings that cannot run, before any model loads, and when a task has no answered item."""
    if not tasks:
        raise ValueError("give at least one task (--tasks pope,textvqa,...)")
    if limit is not None and limit < 1:
        raise ValueError("--limit must be at least 1")
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    folders = task_folders(tasks, data)
    loaded = {t: TASKS[t].load(folders[t], limit) for t in tasks}  # bad files fail here, early
    for t, items in loaded.items():
        if not items:
            raise TaskDataError(f"task {t!r}: {folders[t]} holds no item to ask")
    if any(TASKS[t].kind == "caption" for t in tasks):
        require_java()
    if backend is None:
        if endpoint:
            if not model:
                raise ValueError("--endpoint needs --model, the name the server serves it as")
            backend = Endpoint(endpoint, model, concurrency=batch_size)
        elif checkpoint:
            backend = LocalModel(checkpoint, batch_size=batch_size, device=device)
        else:
            raise ValueError("give a CHECKPOINT to load, or --endpoint URL --model NAME")
    out = Path(output)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "checkpoint": checkpoint,
        "endpoint": endpoint,
        "model": model,
        "limit": limit,
        "tasks": {},
    }
    problems = []
    for name in tasks:
        task, items = TASKS[name], loaded[name]
        present = [i for i in items if i.image is not None]
        start = time.perf_counter()
        log.info(
            "%s: asking %d items (%d without an image)",
            name,
            len(present),
            len(items) - len(present),
        )
        got = backend.answer(present, max_new_tokens or task.max_new_tokens) if present else []
        answers = dict(zip((i.id for i in present), got, strict=True))
        ordered = [answers.get(i.id) for i in items]
        scored = score(task, items, ordered)
        errors = getattr(backend, "errors", {})
        failed = [i.id for i in present if answers[i.id] is None]
        missing = [i.id for i in items if i.image is None]
        entry = {
            "metrics": scored["metrics"],
            "items": len(items),
            "answered": len(present) - len(failed),
            "failed": len(failed),
            "missing_images": len(missing),
            "by_category": scored["by_category"],
            "seconds": round(time.perf_counter() - start, 2),
            "folder": str(folders[name]),
        }
        if missing:
            entry["missing_image_ids"] = missing[:20]
        if failed:
            entry["failed_ids"] = failed[:20]
        results["tasks"][name] = entry
        _write_predictions(out / "predictions" / f"{name}.jsonl", items, ordered, scored, errors)
        if entry["answered"] == 0:
            problems.append(
                f"{name}: no item was answered ({len(missing)} without an image, {len(failed)} failed)"
            )
        elif missing or failed:
            log.warning(
                "%s: %d of %d items not scored (%d without an image, %d failed requests): see "
                "predictions/%s.jsonl",
                name, len(missing) + len(failed), len(items), len(missing), len(failed), name,
            )  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    if checkpoint:
        record_in_runs(checkpoint, out / "results.json", results)
    table = results_table(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    if problems:
        raise ValueError("; ".join(problems))
    return results


def _write_predictions(
    path: Path,
    items: Sequence[EvalItem],
    answers: Sequence[str | None],
    scored: dict[str, Any],
    errors: dict[str, str],
) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for item, answer in zip(items, answers, strict=True):
            row: dict[str, Any] = {
                "id": item.id,
                "prompt": item.prompt,
                "prediction": answer,
                "references": list(item.answers),
                "score": scored["scores"].get(item.id),
            }
            if item.id in scored["read"]:
                row["read"] = scored["read"][item.id]
            if item.category:
                row["category"] = item.category
            if item.image is None:
                row["problem"] = "image not found"
            elif answer is None:
                row["problem"] = errors.get(item.id, "not answered")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def results_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table: a row per task, its metrics, and its counts."""
    lines = ["| task | metric | value | answered / items |", "|---|---|---|---|"]
    for name, entry in results["tasks"].items():
        counts = f"{entry['answered']} / {entry['items']}"
        for k, (metric, value) in enumerate(entry["metrics"].items()):
            lines.append(
                f"| {name if k == 0 else ''} | {metric} | {value:.2f} | {counts if k == 0 else ''} |"
            )
        if not entry["metrics"]:
            lines.append(f"| {name} | - | - | {counts} |")
    return "\n".join(lines)


EVALUATIONS = "evaluations.json"


def record_in_runs(checkpoint: str, results_path: Path, results: dict[str, Any]) -> list[Path]:
    """Note this evaluation in the output folder of every warren run the checkpoint was trained
    on (from its train_summary.json), as OUTPUT/evaluations.json, which the run's report links.
    Returns the files written; a checkpoint not trained by warren, or on data that is not a
    run's, writes none."""
    from warren.stages.run_layout import is_run
    from warren.stages.shards import Location

    summary_file = Path(checkpoint) / "train_summary.json"
    if not summary_file.is_file():
        return []
    try:
        data = json.loads(summary_file.read_text())["config"]["data"]
    except (KeyError, ValueError, TypeError):
        return []
    entry = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "results": str(results_path.resolve()),
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metrics": {t: r["metrics"] for t, r in results["tasks"].items()},
    }
    written = []
    for d in data if isinstance(data, list) else [data]:
        path = Path(str(d).removeprefix("file://"))
        for folder in (path, path.parent):
            try:
                run = folder.is_dir() and is_run(Location.of(str(folder)))
            except (OSError, ValueError):
                run = False
            if not run:
                continue
            file = folder / EVALUATIONS
            try:
                entries = json.loads(file.read_text()) if file.exists() else []
            except ValueError:
                entries = []
            entries = [e for e in entries if e.get("results") != entry["results"]] + [entry]
            file.write_text(json.dumps(entries, indent=2))
            written.append(file)
            break
    return written


def default_output(checkpoint: str | None) -> str:
    if checkpoint and os.path.isdir(checkpoint):
        return os.path.join(checkpoint, "eval")
    raise ValueError("give --output: there is no local checkpoint folder to write next to")
