"""Checkpoints: one file holds the weights and everything needed to rebuild and describe them.

Loading needs only the model definitions (utils.models), never the training code, so a service can
load a checkpoint without the training stack.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from utils.io import atomic_write
from utils.models import build_model


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not hold what a checkpoint holds."""


def save_state(obj, path) -> None:
    """torch.save through atomic_write: a reader never sees half a file."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def read_checkpoint(path) -> dict:
    """The checkpoint dict as stored (weights on the CPU), checked to be one of ours."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message is pages of advice on weights_only=False, which would run a foreign pickle
        raise CheckpointError(f"{path} is not a checkpoint written by utils.train, or is damaged "
                              f"(torch.load: {type(e).__name__})") from e
    if not isinstance(ckpt, dict) or not {"state_dict", "model_name", "classes"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a checkpoint written by utils.train (no state_dict, model_name, classes)")
    return ckpt


def save_checkpoint(path, model: nn.Module, model_name: str, classes: list[str], config, history: dict,
                    metrics: dict | None = None) -> None:
    """Write the weights with everything needed to rebuild and describe them (atomically).

    `config` is a dataclass (utils.train.TrainConfig) or a dict of its fields.
    """
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_state(dict(state_dict=state, model_name=model_name, classes=list(classes), config=config,
                    history=history, metrics=metrics), path)


def load_checkpoint(path, device="cpu") -> tuple[nn.Module, dict]:
    """The model rebuilt by name (eval mode, on device) and the checkpoint dict.

    A missing file raises FileNotFoundError; a directory, an unreadable or a foreign file CheckpointError;
    each a single line naming the path.
    """
    ckpt = read_checkpoint(path)
    try:
        model = build_model(ckpt["model_name"], len(ckpt["classes"]))
        model.load_state_dict(ckpt["state_dict"])
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit model {ckpt['model_name']!r}: {e}") from e
    ckpt.setdefault("config", {})
    ckpt.setdefault("history", {})
    ckpt.setdefault("metrics", None)
    return model.to(device).eval(), ckpt
