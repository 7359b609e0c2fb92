"""The on-disk response cache of the chat client: one JSON file per response, keyed by the sha256
of the request (`ChatRequest.cache_key`), written atomically and durably, so a killed run loses no
paid response and a re-run sends no request that already has one."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

# The client's logger: its cache and budget messages stay where they were logged before.
log = logging.getLogger("warren.stages.llm_client")


class ResponseCache:
    """One JSON file per response under `root/ab/abcdef....json`, written atomically."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        # 256 subfolders keep directories small when a run caches millions of responses.
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            # os.replace means no torn files from us; a damaged file is re-requested, not fatal.
            log.warning("ignoring unreadable cache entry %s: %s", key, err)
            return None
        return entry if entry.get("key") == key and "text" in entry else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"key": key, **entry}, f, ensure_ascii=False)
                f.flush()
                # The response is paid for: make it durable before it becomes visible.
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
