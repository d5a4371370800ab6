"""One-file checkpoints: weights + config (plain dict) + extra + optional training state.

Everything stored must load under ``torch.load(weights_only=True)``: tensors, state dicts and
plain Python values (dict, list, tuple, str, int, float, bool, None).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vae_core.model import ConvVAE, VAEConfig, unwrap

_RESERVED = ("config", "model", "extra")


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, *, extra: dict | None = None, **state: Any
) -> None:
    """Save ``model`` (bare or DDP-wrapped) with ``extra`` metadata and any ``state``.

    ``state`` holds e.g. optimizer=opt.state_dict(), scheduler=..., epoch=3, rng=...
    Written to a temporary file beside ``path`` and renamed, so a crash never leaves a
    half-written checkpoint under the final name.
    """
    clash = sorted(set(state) & set(_RESERVED))
    if clash:
        raise ValueError(f"save_checkpoint: state keys {clash} are reserved")
    core = unwrap(model)
    config = asdict(core.config)
    config["widths"] = list(config["widths"])
    payload = {"config": config, "model": core.state_dict(), "extra": dict(extra or {}), **state}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict: "config", "model", "extra" and any saved state."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # unpickling errors come in many types; name the file once
        raise ValueError(f"{os.fspath(path)}: not a readable checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or not all(key in payload for key in _RESERVED):
        raise ValueError(f"{os.fspath(path)}: not a retina-vae checkpoint (missing config/model)")
    return payload


def rebuild(payload: dict[str, Any]) -> ConvVAE:
    """The ConvVAE of a checkpoint dict (:func:`read_checkpoint`) with its weights, in eval
    mode, where its tensors were mapped to; the one place a checkpoint becomes a model."""
    model = ConvVAE(VAEConfig(**payload["config"]))
    model.load_state_dict(payload["model"])
    return model.eval()


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> ConvVAE:
    """Rebuild the ConvVAE saved at ``path`` and load its weights; returned in eval mode."""
    model = rebuild(read_checkpoint(path, map_location))
    if isinstance(map_location, (str, torch.device)):  # a dict or callable map stays on CPU
        model.to(map_location)
    return model
