"""What every generation stage shares: the endpoint client's parameters, the budget counted across
batches, the provenance and usage columns, and the choice of backend (a model in each actor or an
OpenAI-compatible endpoint).

`GenerateStage` is the base of the endpoint stages (stages/generate.py) and, through
`ModelOrEndpointStage`, of the stages with two backends (stages/recaption.py, stages/capfusion.py).
The request machinery itself (limits, retries, cache, budget) is stages/llm_client.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from warren.prompts import Prompt
from warren.stages import watchdog
from warren.stages.base import (
    BatchStage,
    Resources,
    param,
    params_to_dict,
    put_columns,
    reject,
    stable_hash,
)
from warren.stages.llm_client import (
    BUDGET_STOP,
    ChatRequest,
    ClientConfig,
    Result,
    read_api_key,
    run_requests,
    summarize,
)
from warren.stages.replies import BadReply
from warren.stages.schema import KNOWN_TYPES

USAGE_TYPES: dict[str, pa.DataType] = {
    "gen_prompt_tokens": pa.int64(),
    "gen_completion_tokens": pa.int64(),
    "gen_cache_hits": pa.int32(),
}
#: What every generation stage writes on every row: its provenance, the model's text of a rejected
#: reply, and the usage behind the row.
GEN_COLUMNS = ("gen_model", "gen_prompt", "gen_params", "gen_raw", *USAGE_TYPES)


def prompt_ref(prompt: Prompt) -> str:
    return f"{prompt.id}#{prompt.sha256[:12]}"


# --- parameters ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClientParams:
    model: str = param("gpt-4o-mini", "Model name sent to the endpoint.")
    base_url: str = param(
        "", "OpenAI-compatible endpoint, e.g. http://host:8000/v1 for vLLM ('' = api.openai.com)."
    )
    api_key_env: str = param(
        "OPENAI_API_KEY",
        "Environment variable holding the API key (the key itself is never a parameter).",
    )
    cache_dir: str = param(
        "~/.cache/warren/llm",
        "On-disk response cache ('' = none); a re-run sends no request answered before. On a "
        "cluster, use a path every node shares.",
    )
    max_concurrency: int = param(16, "Requests in flight at once, for the whole stage.")
    requests_per_minute: float = param(0.0, "Request rate limit for the stage (0 = none).")
    tokens_per_minute: float = param(0.0, "Token rate limit for the stage (0 = none).")
    max_total_tokens: int = param(
        0, "Token budget of one run of the stage (0 = none); rows not sent: 'not done'."
    )
    max_cost: float = param(
        0.0, "Cost budget of one run of the stage, at the per-1k prices below (0 = none)."
    )
    price_prompt_per_1k: float = param(0.0, "Price of 1,000 prompt tokens (for max_cost).")
    price_completion_per_1k: float = param(0.0, "Price of 1,000 completion tokens (for max_cost).")
    temperature: float = param(0.7, "Sampling temperature.")
    max_tokens: int = param(1024, "Completion cap per request; a reply cut at it is rejected.")
    timeout_s: float = param(120.0, "Time limit of one attempt of one request, in seconds.")
    max_attempts: int = param(6, "Attempts per request (retries on 429, 5xx, time-outs).")


class GenerateStage(BatchStage):
    """What both generators share: client config, budget across batches, output columns."""

    uses_model = True  # an actor: one per stage, holding the budget spent so far
    # waits on the network; leaves CPU for reading and writing shards
    resources = Resources(concurrency=(1, 1), num_cpus=0.5)
    summed_columns = ("gen_prompt_tokens", "gen_completion_tokens", "gen_cache_hits")
    adds = GEN_COLUMNS

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._spent_tokens = 0
        self._spent_cost = 0.0

    def prompts(self) -> dict[str, Prompt]:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self) -> None:
        # A worker whose run is gone (driver killed) stops sending at once and exits once its
        # answers in flight are cached, instead of paying on until Ray notices.
        watchdog.start()

    def check_params(self) -> None:
        self.client_config()  # ClientConfig validates limits and budget
        self.prompts()  # PromptError (a ValueError) for a version that does not exist
        if self.params.max_tokens < 1:
            raise ValueError(f"{self.name}: max_tokens must be >= 1")

    @property
    def params_hash(self) -> str:
        # "latest" prompt versions and edited prompt files must change the cache key too.
        refs = sorted(prompt_ref(p) for p in self.prompts().values())
        return stable_hash(
            {"params": params_to_dict(self.params), "version": self.version, "prompts": refs}
        )

    def client_config(self, **overrides: Any) -> ClientConfig:
        p = self.params
        cache = os.path.expanduser(p.cache_dir) if p.cache_dir else None
        settings: dict[str, Any] = dict(
            model=p.model,
            base_url=p.base_url or None,
            api_key_env=p.api_key_env,
            max_concurrency=p.max_concurrency,
            requests_per_minute=p.requests_per_minute or None,
            tokens_per_minute=p.tokens_per_minute or None,
            max_attempts=p.max_attempts,
            timeout_s=p.timeout_s,
            max_total_tokens=p.max_total_tokens or None,
            max_cost=p.max_cost or None,
            price_prompt_per_1k=p.price_prompt_per_1k,
            price_completion_per_1k=p.price_completion_per_1k,
            default_max_tokens=p.max_tokens,
            cache_dir=cache,
        )
        settings.update(overrides)
        return ClientConfig(**settings)

    def request_params(self) -> dict[str, Any]:
        return {"temperature": self.params.temperature, "max_tokens": self.params.max_tokens}

    def gen_params_json(self) -> str:
        return json.dumps(self.request_params(), sort_keys=True, separators=(",", ":"))

    def ask(self, requests: Sequence[ChatRequest]) -> list[Result]:
        """Send one round concurrently, within what is left of this run's budget."""
        if not requests:
            return []
        # Raised here, in a batch, rather than in setup(): Ray reports an actor that failed to
        # start as "actor died" and hides this message, which names the variable to set.
        read_api_key(self.client_config())
        p = self.params
        overrides: dict[str, Any] = {}
        if p.max_total_tokens:
            overrides["max_total_tokens"] = p.max_total_tokens - self._spent_tokens
        if p.max_cost:
            overrides["max_cost"] = p.max_cost - self._spent_cost
        if any(v <= 0 for v in overrides.values()):
            return [Result("", None, None, None, False, BUDGET_STOP, 0) for _ in requests]
        config = self.client_config(**overrides)
        results = run_requests(requests, config)
        summary = summarize(results, config)
        self._spent_tokens += summary.prompt_tokens + summary.completion_tokens
        self._spent_cost += summary.cost
        return results

    def failure(self, result: Result) -> BadReply:
        if result.error == BUDGET_STOP:
            return BadReply("not done", "budget")
        return BadReply("request failed", result.error or "")

    def finish(
        self,
        batch: pa.Table,
        *,
        conversations: list[Any],
        reasons: list[str | None],
        raws: list[str | None],
        usage: np.ndarray,
        gen_prompt: list[str | None],
        extra: dict[str, pa.Array] | None = None,
    ) -> pa.Table:
        """The batch with the generated columns set and failed rows rejected."""
        n = batch.num_rows
        columns: dict[str, pa.Array] = {
            "conversations": pa.array(conversations, type=KNOWN_TYPES["conversations"]),
            "gen_model": pa.array([self.params.model] * n, type=pa.string()),
            "gen_prompt": pa.array(gen_prompt, type=pa.string()),
            "gen_params": pa.array([self.gen_params_json()] * n, type=pa.string()),
            "gen_raw": pa.array(raws, type=pa.string()),
        }
        for j, (name, t) in enumerate(USAGE_TYPES.items()):
            columns[name] = pa.array(usage[:, j], type=t)
        columns.update(extra or {})
        mask = [r is not None for r in reasons]
        return reject(put_columns(batch, columns), mask, [r or "" for r in reasons])

    def reason(self, err: BadReply) -> str:
        return f"{self.name}: {err}"


MODEL_BACKENDS = ("transformers", "endpoint")


@dataclasses.dataclass(frozen=True)
class ModelOrEndpointParams(ClientParams):
    backend: str = param(
        "transformers", "transformers (a model in each actor) or endpoint (OpenAI-compatible API)."
    )
    batch_size: int = param(8, "Rows per generate call (transformers backend).")
    dtype: str = param("auto", "auto (bf16 on CUDA, fp32 on CPU), float32 or bfloat16.")
    seed: int = param(0, "Seed of sampled decoding (temperature > 0).")
    prompt_version: int = param(0, "Version of the stage's prompt (0 = latest).")


class ModelOrEndpointStage(GenerateStage):
    """A generation stage with two backends (`params.backend`): `transformers`, a model in every
    actor (a GPU each when the cluster has them; the runner gives none on a CPU-only cluster), or
    `endpoint`, one network-bound actor sending requests through the machinery above."""

    def default_resources(self) -> Resources:
        if self.params.backend == "transformers":
            return type(self).resources.replace(concurrency=None, num_cpus=1.0, num_gpus=1.0)
        return type(self).resources

    def check_params(self) -> None:
        if self.params.backend not in MODEL_BACKENDS:
            raise ValueError(f"{self.name}: backend must be one of {', '.join(MODEL_BACKENDS)}")
        self.check_decoding()
        if self.params.backend == "endpoint":
            self.client_config()
        self.prompts()

    def check_decoding(self) -> None:
        """Raise ValueError for decoding parameters that can never work."""

    def __getstate__(self) -> dict[str, Any]:
        # A model loaded on the driver (a test, a notebook) must not ride along to every worker:
        # each actor loads its own in setup().
        state = self.__dict__.copy()
        for loaded in ("_lm", "_vlm"):
            if loaded in state:
                state[loaded] = None
        return state


def generate_each(generate: Any, items: Sequence[Any]) -> list[Any]:
    """`generate(items)` (one result per item); when the batch raises, each item alone, and an
    item that raises alone gets `BadReply("generation failed", <error>)`, so one bad row does not
    take its batch mates down."""
    try:
        return list(generate(items))
    except Exception:  # noqa: BLE001 - isolate the item that breaks generation
        out: list[Any] = []
        for item in items:
            try:
                out.extend(generate([item]))
            except Exception as exc:  # noqa: BLE001 - any model error rejects its own row
                detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                out.append(BadReply("generation failed", detail))
        return out


def column_or_nulls(batch: pa.Table, name: str) -> list[Any]:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


def add_usage(usage: np.ndarray, i: int, result: Result) -> None:
    u = result.usage or {}
    usage[i, 0] += u.get("prompt_tokens", 0)
    usage[i, 1] += u.get("completion_tokens", 0)
    usage[i, 2] += int(result.cached)
