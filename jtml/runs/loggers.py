"""W&B logging that runs anywhere: offline without an API key (``wandb sync`` uploads later)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Literal

from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger


def wandb_key_configured() -> bool:
    """True when wandb could authenticate: ``WANDB_API_KEY`` or a ``~/.netrc`` entry for W&B."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (OSError, netrc.NetrcParseError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return rc.authenticators(host) is not None


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger with jtml's defaults.

    ``offline=None`` decides at start-up: online when a key is configured and ``WANDB_MODE`` is
    not ``offline``/``disabled``, else offline. Checkpoints are logged as artifacts only online.
    """

    def __init__(
        self,
        project: str = "jtml",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        job_type: str | None = None,
        notes: str | None = None,
        save_dir: str = ".",
        offline: bool | None = None,
        id: str | None = None,
        log_model: bool | Literal["all"] | None = None,
        resume: Literal["allow", "must", "never"] | None = None,
    ) -> None:
        mode = os.environ.get("WANDB_MODE", "").lower()
        if offline is None:
            offline = mode in ("offline", "dryrun", "disabled") or not wandb_key_configured()
        if log_model is None:
            log_model = not offline
        kwargs: dict[str, Any] = {"group": group, "tags": tags, "job_type": job_type, "notes": notes}
        if resume is not None:
            kwargs["resume"] = resume
        super().__init__(
            name=name,
            save_dir=save_dir,
            offline=offline,
            id=id,
            project=project,
            log_model=log_model,
            **{k: v for k, v in kwargs.items() if v is not None},
        )
