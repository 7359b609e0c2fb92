"""Finding model weights: whether the Hugging Face hub may be asked (not offline, its host
resolves), transformers loads that fall back to the local cache, checked cache files, and the
`ModelNotFoundError` that names the spec and the flag to give another model with. Shared by the
embedding models (stages/models.py) and the language models (stages/lm.py).
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The models module's logger: its messages stay where they were logged before.
log = logging.getLogger("warren.stages.models")

DEFAULT_FLAG = "--embed.model"
_TRUE = {"1", "on", "yes", "true"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class ModelNotFoundError(ValueError):
    """A model spec names weights that are not on this machine and cannot be downloaded."""


def is_offline() -> bool:
    """True when the user asked for no hub access (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    if any(os.environ.get(k, "").strip().lower() in _TRUE for k in _OFFLINE_VARS):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


@functools.cache
def hub_resolves() -> bool:
    """False when the hub's host name does not resolve (a machine without network) and no proxy
    is set: huggingface_hub would otherwise retry each file for about 25 seconds before failing."""
    if any(os.environ.get(k) for k in _PROXY_VARS):
        return True
    try:
        from huggingface_hub import constants

        host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        socket.getaddrinfo(host, 443)
    except (ImportError, OSError):
        log.warning("the Hugging Face hub cannot be reached: looking in local caches only")
        return False
    return True


def may_download() -> bool:
    return not is_offline() and hub_resolves()


def not_found(
    spec: str, why: str, flag: str = DEFAULT_FLAG, example: str | None = None
) -> ModelNotFoundError:
    """The error for a model spec that cannot be had here; `example` replaces the CLIP examples
    of what to give instead."""
    if is_offline():
        offline = " (offline: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)"
    else:
        offline = "" if hub_resolves() else " (offline: the hub cannot be reached)"
    why = " ".join(why.split()).rstrip(". ")
    example = example or (
        f"{flag} open_clip:ViT-B-32:laion2b_s34b_b79k once its weights are cached, {flag} "
        f"open_clip:<arch>:/path/to/checkpoint.pt, or {flag} hf:/path/to/model_dir"
    )
    return ModelNotFoundError(
        f"model {spec!r} is not available{offline}: {why}. Give a model that is on this machine "
        f"with {flag}, e.g. {example}"
    )


def weights_cache() -> Path:
    """Where downloaded weight files are kept: $WARREN_WEIGHTS_CACHE, else
    ~/.cache/warren/weights."""
    return Path(os.environ.get("WARREN_WEIGHTS_CACHE") or "~/.cache/warren/weights").expanduser()


def weights_file(spec: str, flag: str) -> str:
    """The local file a weights spec names: a path on this machine; `hf:ORG/REPO/FILE`, from the
    Hugging Face cache, else the hub; an http(s) URL, from warren's weights cache
    (`weights_cache()`), else downloaded into it. Offline, only what is on this machine is used;
    anything else is a ModelNotFoundError naming `flag`."""
    example = f"{flag} /path/to/weights.pth"
    if spec.startswith("hf:"):
        from huggingface_hub import hf_hub_download

        parts = spec[3:].split("/", 2)
        if len(parts) < 3 or not all(parts):
            raise not_found(spec, "an hf: spec is hf:ORG/REPO/PATH/TO/FILE", flag, example)
        repo, name = f"{parts[0]}/{parts[1]}", parts[2]
        last: BaseException | None = None
        for local_only in [True] + ([False] if may_download() else []):
            try:
                return hf_hub_download(repo, name, local_files_only=local_only)
            except fetch_errors() as exc:
                last = exc
        raise not_found(spec, f"{type(last).__name__}: {last}", flag, example) from last
    if spec.startswith(("http://", "https://")):
        name = os.path.basename(urllib.parse.urlparse(spec).path) or "weights"
        key = hashlib.sha256(spec.encode()).hexdigest()[:12]
        path = weights_cache() / f"{key}-{urllib.parse.unquote(name)}"
        if path.is_file():
            return str(path)
        if is_offline():
            raise not_found(spec, f"it is not in {weights_cache()}", flag, example)
        return str(_download(spec, path, flag, example))
    if os.path.isfile(spec):
        return spec
    raise not_found(spec, "no such file", flag, example)


def _download(url: str, path: Path, flag: str, example: str) -> Path:
    """`url` into `path`, whole or not at all (a temporary name, then a rename)."""
    import shutil
    import tempfile
    import urllib.request

    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, path)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                expected = int(response.headers.get("Content-Length") or -1)
                shutil.copyfileobj(response, tmp)
            got = tmp.tell()
            if got == 0 or (expected >= 0 and got != expected):
                raise OSError(f"{got} bytes received, {expected} announced")
        except (OSError, http.client.HTTPException) as exc:  # URLError, time-outs, cut bodies
            tmp.close()
            os.unlink(tmp.name)
            raise not_found(url, f"the download failed ({exc})", flag, example) from exc
    os.replace(tmp.name, path)
    return path


def checked_cache_file(path: str, url: str) -> str:
    """`path` if it holds the file `url` names (SHA-256 prefix checked where the URL gives one, as
    open_clip does), else FileNotFoundError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    expected = ""
    if "openaipublic" in url:
        expected = url.split("/")[-2]
    elif "mlfoundations" in url:
        expected = os.path.splitext(os.path.basename(url))[0].split("-")[-1]
    if expected:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        if not digest.hexdigest().startswith(expected):
            raise FileNotFoundError(f"{path} (checksum mismatch, a partial download?)")
    return path


def fetch_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "could not find or download": OSError covers transformers' and
    huggingface_hub's not-found and offline errors; HTTP clients raise their own."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import EntryNotFoundError

        errors.append(EntryNotFoundError)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def from_hub(spec: str, ident: str, load: Callable, flag: str, **kwargs: Any) -> Any:
    """`load(ident, ...)` (a transformers `from_pretrained`) without a hub when `ident` is a local
    directory or the user is offline; a failed download falls back to the cache."""
    local_only = [True] if os.path.isdir(ident) or not may_download() else [False, True]
    last: BaseException | None = None
    for lo in local_only:
        try:
            return load(ident, local_files_only=lo, **kwargs)
        except fetch_errors() as exc:
            last = exc
    raise not_found(spec, f"{type(last).__name__}: {str(last).strip()}", flag) from last
