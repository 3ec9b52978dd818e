"""Checkpoints of :func:`bnlab.train.train`: written atomically, read with ``weights_only=True``, checked
before a run resumes from one.

A checkpoint is a ``torch.save``'d dict of plain types (tensors, numbers, strings, lists, dicts), so
``torch.load(path, weights_only=True)`` reads it and loading one never runs code from the file::

    model      the model's state dict
    optimizer  the optimizer's state dict
    history    History.to_dict() so far
    state      where the run stands between two steps: epoch, batch, step, seconds, the running sums
               of the unfinished epoch ([loss·n, correct, n], or None), and schedule_start (the epoch
               its learning-rate schedule began at: 0, or where a finished run was extended; older
               checkpoints lack it and mean 0)
    config     TrainConfig.to_dict() of the run that wrote it
    rng_cpu    torch.get_rng_state()
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from bnlab.errors import UserError

__all__ = ["CHECKPOINT_KEYS", "RESUMABLE_CHANGES", "atomic_write_text", "save_checkpoint", "read_torch_file",
           "load_checkpoint", "check_resumable", "is_finished"]

CHECKPOINT_KEYS = ("model", "optimizer", "history", "state", "config", "rng_cpu")
# config fields a resumed run may change: more epochs or steps extend it; the checkpoint may have moved
RESUMABLE_CHANGES = ("resume", "checkpoint", "epochs", "max_steps")


# --------------------------------------------------------------------------------------------------
# writing: a temporary file beside the target, then a rename, so a crash never leaves half a file
# --------------------------------------------------------------------------------------------------

def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (the directory is made if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def save_checkpoint(path, state: dict) -> None:
    """``torch.save(state)`` to a temporary file beside ``path``, then rename: a crash never leaves half a
    file, and an interruption while saving leaves the previous checkpoint and no debris."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as tmp:
        try:
            torch.save(state, tmp)
        except BaseException:  # a second Ctrl-C while saving: leave the previous checkpoint, no debris
            tmp.close()
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------

def read_torch_file(path, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` on the CPU; raises :class:`UserError` naming the file
    when it is missing or is not a file PyTorch saved with plain types."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"{what} {path}: no such file") from None
    except Exception as error:  # noqa: BLE001 — torch raises many types for a file that is not its own
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{what} {path}: not a PyTorch file saved with plain types ({type(error).__name__}: "
                        f"{first_line}); expected a file from torch.save, such as the checkpoint.pt or "
                        f"model.pt that `bnlab train` writes") from None


def load_checkpoint(path) -> dict:
    """A checkpoint written by :func:`bnlab.train.train` (plain types: loads with ``weights_only=True``).

    Raises :class:`bnlab.errors.UserError` naming the file when it is missing or not such a checkpoint."""
    saved = read_torch_file(path)
    missing = set(CHECKPOINT_KEYS) - set(saved if isinstance(saved, dict) else {})
    if missing:
        raise UserError(f"checkpoint {path}: not a training checkpoint (missing {', '.join(sorted(missing))}); "
                        f"resuming needs the checkpoint.pt that `bnlab train` writes")
    return saved


# --------------------------------------------------------------------------------------------------
# resume checks
# --------------------------------------------------------------------------------------------------

def check_resumable(saved: dict, config: dict, path) -> None:
    """Raise :class:`UserError` unless a run configured as ``config`` (``TrainConfig.to_dict()``) may
    continue the checkpoint ``saved``: every setting must match except :data:`RESUMABLE_CHANGES`, and
    ``epochs`` may not be fewer than the epochs already trained (a run is extended, never shortened)."""
    diff = {k: (saved["config"].get(k), v) for k, v in config.items()
            if saved["config"].get(k) != v and k not in RESUMABLE_CHANGES}
    if diff:
        raise UserError(f"resume: {path} was written with a different config; (saved, now): {diff}")
    trained, partial = saved["state"]["epoch"], saved["state"]["batch"] > 0
    if config["epochs"] < trained + partial:
        epochs = f"{trained} trained epoch{'s' * (trained != 1)}{' and part of another' if partial else ''}"
        raise UserError(f"resume: {path} holds {epochs}; epochs={config['epochs']} would shorten the run, which "
                        f"resuming cannot do: nothing was trained (ask for at least {trained + partial} epochs)")


def is_finished(saved: dict, epochs: int, max_steps: Optional[int]) -> bool:
    """Whether continuing the checkpoint ``saved`` with ``epochs`` and ``max_steps`` has nothing left to
    train: the run diverged (a diverged run is never continued), or it is done and neither number goes
    beyond what it ran."""
    status, state = saved["history"]["status"], saved["state"]
    if status != "done":
        return status == "diverged"
    return not (state["epoch"] < epochs and (max_steps is None or state["step"] < max_steps))
