"""An `embed` stage that counts its model's forward passes, for tests that must prove a run
computed no embedding. Each forward pass, in whichever Ray worker, writes one file (the images or
texts it embedded) into the stage's `count_dir`, by default `calls/` beside its store folder: the
runner rebuilds stages from their parameters, so in a run the place must follow from them
(`--embed.store TMP/store` counts into TMP/calls)."""

from __future__ import annotations

import uuid
from pathlib import Path

from warren.stages.embed import Embed


def calls_dir(store: str) -> Path:
    return Path(store).parent / "calls"


class CountingEmbed(Embed):
    """`Embed` whose model's `encode_image` and `encode_text` record each call's batch size."""

    count_dir: str | None = None

    def setup(self) -> None:
        super().setup()
        module = self.model.module
        for kind in ("image", "text"):
            forward = getattr(module, f"encode_{kind}")
            setattr(module, f"encode_{kind}", self._counted(kind, forward))

    def _counted(self, kind: str, forward):
        folder = Path(self.count_dir) if self.count_dir else calls_dir(self.params.store)

        def call(x, *args, **kwargs):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{kind}-{uuid.uuid4().hex}").write_text(str(len(x)))
            return forward(x, *args, **kwargs)

        return call


def model_calls(folder: str | Path, kind: str) -> int:
    """Images (or texts) the counted models embedded into `folder`, over every worker."""
    folder = Path(folder)
    return sum(int(p.read_text()) for p in folder.glob(f"{kind}-*")) if folder.exists() else 0
