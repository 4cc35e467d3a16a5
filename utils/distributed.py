"""One training run across processes: torch.distributed set up from torchrun's environment, and the few
collectives training needs (decide on rank 0 and share, sum over ranks, streamed scores summed over ranks).

Without torchrun (no WORLD_SIZE in the environment) every helper is the single-process identity, so the same
code runs either way. Under torchrun: gloo on CPU, nccl on CUDA, LOCAL_RANK picks the GPU.

Every rank must call the same collectives in the same order with the same shapes, or the ranks wait on each
other: each collective gives up after a timeout (init(timeout=...)) with an error that names the rank and the
collective, instead of hanging.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from utils.data import to_float
from utils.device import pick_device
from utils.metrics import per_class_accuracy

# How long a collective waits for the other ranks. Rank 0 alone times precision or writes a checkpoint while
# the others wait (seconds); anything longer is a fault: a dead peer, or ranks that ran different collectives.
TIMEOUT = timedelta(minutes=10)
# How long the ranks wait for each other to start (imports, CUDA, a busy machine) before the first collective.
JOIN_TIMEOUT = timedelta(minutes=30)
TOPK = (1, 3, 5)


@dataclass(frozen=True)
class Group:
    """This process's place in the run: rank among world_size, and the device it trains on."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, history and the result."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True in a process started by torchrun (or another launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def restarted() -> bool:
    """True when torchrun restarted the workers after one failed (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def init(device: str | torch.device = "auto", timeout: timedelta = TIMEOUT) -> Group:
    """Join the run torchrun started (gloo on CPU, nccl on CUDA), or a one-process Group without it.
    timeout: how long any collective waits for the other ranks before it fails."""
    if not launched():
        return Group(device=device if isinstance(device, torch.device) else pick_device(device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = device if isinstance(device, torch.device) else pick_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    elif chosen.type != "cpu":
        raise ValueError(f"distributed training runs on CUDA (nccl) or the CPU (gloo), not {chosen.type}: "
                         f"pass --device cpu")
    if not dist.is_initialized():
        # The agent's store outlives a restart (--max-restarts) and still holds the dead workers' addresses:
        # each attempt keeps its keys apart, or a new rank may dial a dead peer.
        store, _, _ = next(dist.rendezvous("env://", timeout=JOIN_TIMEOUT))
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        _join(store, rank, world_size)
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world_size, timeout=timeout,
                                device_id=chosen if chosen.type == "cuda" else None)
    return Group(rank, world_size, local_rank, chosen)


def _join(store: dist.Store, rank: int, world_size: int) -> None:
    """Wait up to JOIN_TIMEOUT until every rank has started: the process group's connections wait only the
    (shorter) collective timeout, which a rank slow to import would otherwise exceed."""
    if store.add("started", 1) == world_size:
        store.set("all started", "1")
    try:
        store.wait(["all started"], JOIN_TIMEOUT)
    except dist.DistStoreError as e:
        started = store.add("started", 0)
        raise RuntimeError(f"rank {rank}: only {started} of {world_size} ranks started within {JOIN_TIMEOUT}") from e


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def _collective(what: str, group: Group):
    """A failed collective names the rank and what it waited for (gloo's own error says only that a send or
    receive timed out)."""
    try:
        yield
    except RuntimeError as e:  # DistBackendError and the backends' timeouts
        raise RuntimeError(f"rank {group.rank} of {group.world_size}: {what} failed (another rank is stuck or gone, or "
                           f"the ranks ran different collectives): {e}") from e


def barrier(group: Group) -> None:
    if group.active:
        with _collective("barrier", group):
            dist.barrier()


def share(obj: Any, group: Group) -> Any:
    """Rank 0's obj on every rank (any picklable value): decisions that must be the same everywhere."""
    if not group.active:
        return obj
    box = [obj]
    with _collective("broadcast from rank 0", group):
        dist.broadcast_object_list(box, src=0, device=group.device if group.device.type == "cuda" else None)
    return box[0]


def on_rank0(fn: Callable[[], Any], group: Group) -> Any:
    """fn() run on rank 0 alone and its result shared with every rank; if it raises, every rank raises its error,
    so that no rank waits on a collective that rank 0 will never join."""
    outcome = None
    if group.main:
        try:
            outcome = (True, fn())
        except Exception as error:  # noqa: BLE001 - carried to every rank and raised there
            outcome = (False, error)
    ok, value = share(outcome, group)
    if not ok:
        raise value
    return value


def sum_all(values: dict[str, torch.Tensor], group: Group) -> dict[str, torch.Tensor]:
    """Element-wise sums over ranks of a dict of tensors (one all-reduce per dtype, in the order the dtypes first
    appear in the sorted keys); values come back on the CPU."""
    if not group.active:
        return {k: v.cpu() for k, v in values.items()}
    keys = sorted(values)
    out = {}
    # One flat buffer per dtype (integer counts stay exact), in an order every rank computes alike: a set's
    # order follows the dtypes' hashes, their addresses, which differ between processes, and two ranks
    # reducing different buffers wait on each other.
    for dtype in dict.fromkeys(values[k].dtype for k in keys):
        same = [k for k in keys if values[k].dtype == dtype]
        flat = torch.cat([values[k].reshape(-1) for k in same]).to(group.device)
        with _collective(f"sum of {', '.join(same)}", group):
            dist.all_reduce(flat)
        flat, at = flat.cpu(), 0
        for k in same:
            n = values[k].numel()
            out[k] = flat[at:at + n].view(values[k].shape)
            at += n
    return out


def scale_lr(lr: float, optimizer: str, global_batch: int, lr_batch: int) -> float:
    """The rate for global_batch of a recipe tuned at lr_batch: linear for SGD, square root for Adam(W)."""
    ratio = global_batch / lr_batch
    return lr * (ratio if optimizer == "sgd" else math.sqrt(ratio))


# --------------------------------------------------------------------------------------------- scores

@torch.no_grad()
def score_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_classes: int,
               device: torch.device, bf16: bool = False, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Additive tallies of the scores over uint8 batches (x (B,28,28), y (B,)): loss sum, confusion counts,
    top-k hits, the MAP@3 sum and the count, in eval mode (the mode is restored after)."""
    was_training = model.training
    model.eval()
    sums = dict(loss=torch.zeros((), dtype=torch.float64), map3=torch.zeros((), dtype=torch.float64),
                n=torch.zeros((), dtype=torch.int64), confusion=torch.zeros(n_classes * n_classes, dtype=torch.int64),
                **{f"top{k}": torch.zeros((), dtype=torch.int64) for k in TOPK[1:]})
    try:
        for x, y in batches:
            x, y = to_float(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x).float()  # (B,C)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="sum")
            hits = (logits.topk(min(max(TOPK), n_classes), dim=1).indices == y[:, None]).cpu()  # (B,k)
            y = y.cpu()
            sums["loss"] += loss.double().cpu()
            sums["n"] += len(y)
            sums["confusion"] += torch.bincount(y * n_classes + logits.argmax(1).cpu(), minlength=n_classes ** 2)
            for k in TOPK[1:]:
                sums[f"top{k}"] += hits[:, :k].any(1).sum()
            ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)[:3]
            sums["map3"] += (hits[:, :3].double() / ranks).sum()
    finally:
        model.train(was_training)
    return sums


def finish_scores(sums: dict[str, torch.Tensor], n_classes: int) -> dict:
    """Tallies (summed over ranks) -> the scores of utils.metrics.evaluate_model, plus the mean loss."""
    n = int(sums["n"])
    if n == 0:
        raise ValueError("no samples to score")
    cm = sums["confusion"].view(n_classes, n_classes)
    return {"top1": int(cm.trace()) / n, **{f"top{k}": int(sums[f"top{k}"]) / n for k in TOPK[1:]},
            "map3": float(sums["map3"]) / n, "per_class": per_class_accuracy(cm).tolist(), "confusion": cm.tolist(),
            "n": n, "loss": float(sums["loss"]) / n}
