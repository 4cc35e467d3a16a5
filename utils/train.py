"""Training: settings, one epoch, evaluation, the whole fit with early stopping, checkpoints, CLI.

    python -m utils.train --model v2 --categories cat "alarm clock" --max-per-class 5000 --epochs 10 \
        --augment none --data data --out models/v2.pt
    python -m utils.train --recipe v2-tuned --packed data/packed/all-100k --out models/all.pt   # from a pack
    torchrun --standalone --nproc_per_node 2 -m utils.train --recipe v2-tuned --packed ...       # DDP, 2 ranks

The command's last line on stdout is one JSON object with the validation and test scores. Under torchrun
--batch-size is per rank: the global batch is K times it, and the rate is scaled for it (see TrainConfig.lr_batch).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import sys
import time
import types
import typing
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import numpy as np
from torch.nn.parallel import DistributedDataParallel

from utils import distributed
from utils.augment import RandomAugment, xl_augment
from utils.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint, save_state  # noqa: F401
from utils.data import SIDE, QuickDrawSet, iterate_batches, load_bitmaps, split, to_float
from utils.device import pick_device, set_seed  # noqa: F401  (re-exported for callers of utils.train)
from utils.categories import resolve_categories
from utils.download import download_bitmaps
from utils.io import write_json
from utils.metrics import predict_logits
from utils.models import MODELS, build_model, count_parameters
from utils.pack import PackedSet, PackedSplit, device_batches, shard

Augment = Literal["none", "xl", "online"]
Optimizer = Literal["adam", "adamw", "sgd"]
Schedule = Literal["none", "onecycle", "cosine"]
AUGMENTS, OPTIMIZERS, SCHEDULES = typing.get_args(Augment), typing.get_args(Optimizer), typing.get_args(Schedule)
POSTFIX_SECONDS = 0.5  # how often the progress bar's loss and accuracy are refreshed


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in every checkpoint."""
    model: str = "v2"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3                 # the peak rate for onecycle, for a global batch of lr_batch
    # The global batch is batch_size (per rank) x the number of ranks; the rate is scaled from lr_batch to it:
    # linearly for sgd, by the square root for adam/adamw. None: lr_batch = batch_size (one process: no change).
    lr_batch: int | None = None
    optimizer: Optimizer = "adam"    # adam | adamw | sgd (with Nesterov momentum)
    momentum: float = 0.9            # sgd only
    weight_decay: float = 0.0
    schedule: Schedule = "none"      # none | onecycle | cosine (both stepped every batch)
    label_smoothing: float = 0.0
    augment: Augment = "none"        # none | xl (materialized copies of the train split) | online (RandomAugment)
    aug_degrees: float = 15.0        # online: uniform turn in [-d, d]
    aug_hflip: float = 0.5           # online: probability of a left-right mirror
    aug_vflip: float = 0.0           # online: probability of a top-bottom mirror
    aug_scale: float = 0.0           # online: zoom in [1-s, 1+s]
    aug_shift: float = 0.0           # online: shift by up to this fraction of the side
    patience: int | None = 3         # epochs without a lower validation loss before stopping; None or 0: never
    seed: int = 0                    # batch order and online augmentation (weights: set_seed before building)
    device: str = "auto"
    # "auto": timed before training (choose_precision), the fastest kept; True/False force a choice.
    channels_last: bool | Literal["auto"] = False  # NHWC activations (often faster convolutions on CPU)
    bf16: bool | Literal["auto"] = False  # low-precision autocast: bfloat16 (CPU, GPUs with it), else float16 on CUDA
    num_threads: int | None = None   # torch intra-op threads during the fit; None: torch's choice
    max_minutes: float | None = None  # wall-clock budget for the whole fit: sizes the schedule (at most `epochs`)
    eval_batch_size: int = 1024
    dry_run: bool = False            # two batches per epoch: a quick check that everything runs
    progress: bool = True            # tqdm bars

    def __post_init__(self):
        for name, value, allowed in (("model", self.model, tuple(MODELS)), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("schedule", self.schedule, SCHEDULES), ("augment", self.augment, AUGMENTS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        for name in ("bf16", "channels_last"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ValueError(f"{name} must be True, False or 'auto', got {getattr(self, name)!r}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"epochs, batch_size and lr must be positive (got {self.epochs}, {self.batch_size}, {self.lr})")


# Named recipes (RECIPES): the TrainConfig fields each sets, with its label and a line about it. The original
# study's: Adam at 1e-3, batches of 64, all 10 epochs, float32 and NCHW. Ours: a fresh random turn, flip, zoom
# and shift per batch, one-cycle AdamW, label smoothing, large batches; precision and memory format chosen by
# timing ("auto"), since bfloat16 is several times faster than float32 on CPUs with AMX/AVX512-BF16 and several
# times slower on the rest. They were developed on the seed-0 split, whose test scores were seen before the
# epoch counts of v2-tuned and resnet were raised; seed 1 (the same drawings split afresh) checked them once
# fixed. One-cycle ends at its best epoch, so no early stopping. "v2-xl" is V2 on the training split plus its
# rotated and flipped copies (augment="xl", made after the split). A max_minutes budget sizes the schedule: as
# many of `epochs` as fit, measured early in the first epoch.
ORIGINAL_RECIPE = dict(epochs=10, batch_size=64, optimizer="adam", lr=1e-3, patience=None, bf16=False,
                       channels_last=False)
OUR_RECIPE = dict(batch_size=256, optimizer="adamw", lr=3e-3, schedule="onecycle", label_smoothing=0.1,
                  augment="online", aug_degrees=15.0, aug_hflip=0.5, aug_scale=0.1, aug_shift=0.05,
                  bf16="auto", channels_last="auto", patience=None)


@dataclass(frozen=True)
class Recipe:
    """A named recipe. name: what --recipe, benchmarks/bench_train.py --runs and their files call it; label:
    how the notebook's tables and figures show it; about: one line saying what it is; settings: the
    TrainConfig fields it sets (read-only; the rest keep their defaults)."""
    name: str
    label: str
    about: str
    settings: Mapping[str, Any]

    def __post_init__(self):
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        TrainConfig(**self.settings)  # an unknown field or value fails here, not when a run starts

    @property
    def stem(self) -> str:
        """The label as a file name (the notebook's checkpoints and figures): "V2-XL" -> "v2-xl"."""
        return self.label.lower().replace(" ", "-")

    def config(self, **overrides) -> TrainConfig:
        """The recipe's TrainConfig, with `overrides` (TrainConfig fields) on top."""
        return TrainConfig(**{**self.settings, **overrides})

    def variant(self, name: str, label: str, about: str, **changes) -> Recipe:
        """This recipe with `changes` to its settings, under another name."""
        return Recipe(name, label, about, {**self.settings, **changes})


def by_name(*recipes: Recipe) -> dict[str, Recipe]:
    """{name: recipe}, in the order given; a name given twice is an error."""
    named = {recipe.name: recipe for recipe in recipes}
    if len(named) != len(recipes):
        raise ValueError(f"recipe names repeat: {[recipe.name for recipe in recipes]}")
    return named


RECIPES: dict[str, Recipe] = by_name(
    Recipe("v1", "V1", "V1, the original recipe: Adam 1e-3, batch 64, 10 epochs, no augmentation, fp32",
           dict(ORIGINAL_RECIPE, model="v1")),
    Recipe("v2", "V2", "V2, the original recipe",
           dict(ORIGINAL_RECIPE, model="v2")),
    Recipe("v2-xl", "V2-XL", "V2-XL: V2, the original recipe, on the training split plus its rotated and "
           "flipped copies",
           dict(ORIGINAL_RECIPE, model="v2", augment="xl")),
    (_tuned := Recipe("v2-tuned", "V2-tuned", "V2, our recipe: online turns/flips/zooms/shifts, AdamW one-cycle, "
                      "label smoothing 0.1, batch 256, precision and memory format timed",
                      dict(OUR_RECIPE, model="v2", epochs=25, weight_decay=1e-4))),
    # What the precision choice alone brings to v2-tuned's speed: the same run in float32, NCHW.
    _tuned.variant("v2-tuned-fp32", "V2-tuned fp32", "v2-tuned forced to float32 and NCHW, all else the same",
                   bf16=False, channels_last=False),
    Recipe("resnet", "ResNet", "QuickDrawResNet with the same kind of recipe, schedule sized to 14.5 min",
           dict(OUR_RECIPE, model="resnet", epochs=20, weight_decay=5e-4, max_minutes=14.5)),
    # Batches of 128 at the square-root-scaled rate: twice the updates per epoch at the same float32 speed; in
    # development (bench_qdnet, seed-0 split, two seeds each) they beat batches of 256 on validation at the
    # epochs an AVX2 CPU fits into 15 minutes.
    Recipe("qdnet", "QuickDrawNet", "QuickDrawNet (ours, built for float32 FLOPs) with the same kind of recipe in "
           "batches of 128, schedule sized to 15 min",
           dict(OUR_RECIPE, model="qdnet", epochs=40, batch_size=128, lr=2.1e-3, weight_decay=5e-4, max_minutes=15.0)),
)


# Settings a resumed run may change: where and how fast it runs, not what it computes.
RUNTIME_FIELDS = ("device", "num_threads", "max_minutes", "eval_batch_size", "progress")
CLOCK = time.perf_counter  # every duration fit measures or plans with (tests put a fake clock here)


def amp_dtype(device: torch.device, bf16: bool) -> torch.dtype | None:
    """The autocast dtype `bf16=True` means on `device`: bfloat16 on CPUs and on GPUs that support it,
    float16 (with a gradient scaler) on older CUDA GPUs; None: float32 (also on MPS)."""
    if not bf16 or device.type not in ("cpu", "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None, channels_last: bool) -> str:
    """e.g. "bf16 NHWC", "fp32 NCHW"."""
    kind = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return f"{kind} {'NHWC' if channels_last else 'NCHW'}"


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, dtype: torch.dtype | None, channels_last: bool,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and optimizer step on one batch x (B,1,28,28), y (B,). Returns (loss, logits (B,C))."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(x)  # (B,C)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # float16 only: scaled so that small gradients do not underflow
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


def train_one_epoch(model: nn.Module, batches, optimizer: torch.optim.Optimizer, device: torch.device,
                    scheduler=None, label_smoothing: float = 0.0, dtype: torch.dtype | None = None,
                    channels_last: bool = False, max_batches: int | None = None, bar: tqdm | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> tuple[float, float, int]:
    """One pass over `batches` of (x (B,1,28,28), y (B,)). Returns (mean loss, accuracy, images seen).

    dtype: the autocast dtype (None: float32); stops early after max_batches.
    """
    model.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, shown = 0, time.perf_counter()
    for i, (x, y) in enumerate(batches):
        loss, logits = train_step(model, x, y, optimizer, scaler, dtype, channels_last, label_smoothing)
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if bar is not None:
            bar.update(1)
            if time.perf_counter() - shown >= POSTFIX_SECONDS:  # .item() synchronizes a GPU: not every batch
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.2%}", refresh=False)
                shown = time.perf_counter()
        if max_batches is not None and i + 1 >= max_batches:
            break
    if bar is not None:
        bar.set_postfix(loss=f"{loss_sum.item() / max(seen, 1):.4f}", acc=f"{correct.item() / max(seen, 1):.2%}")
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), seen


def evaluate(model: nn.Module, ds: QuickDrawSet | PackedSplit, device: torch.device, batch_size: int = 1024,
             bf16: bool = False, label_smoothing: float = 0.0, group: distributed.Group | None = None
             ) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) on the whole of ds, in eval mode, streamed; under torchrun each rank
    scores its shard and the tallies are summed.

    The loss is the training objective (same label smoothing), so early stopping watches what is optimized.
    """
    scores = score_split(model, ds, device, batch_size, bf16, label_smoothing, group)
    return scores["loss"], scores["top1"]


def score_split(model: nn.Module, ds: QuickDrawSet | PackedSplit, device: torch.device, batch_size: int = 1024,
                bf16: bool = False, label_smoothing: float = 0.0, group: distributed.Group | None = None) -> dict:
    """Every score of utils.metrics.evaluate_model (and the mean loss) on the whole split, streamed: each rank
    scores its contiguous shard, and the tallies summed over ranks are those of one process."""
    group = group or distributed.Group(device=device)
    sums = distributed.score_sums(model, eval_batches(ds, batch_size, group), len(ds.classes), device, bf16,
                                  label_smoothing)
    return distributed.finish_scores(distributed.sum_all(sums, group), len(ds.classes))


# ------------------------------------------------------------------------------- data: in memory or packed

def eval_batches(ds: QuickDrawSet | PackedSplit, batch_size: int, group: distributed.Group):
    """Rank's contiguous shard of ds in stored order, as uint8 batches (x (B,28,28), y (B,)) on the CPU."""
    if isinstance(ds, PackedSplit):
        yield from ds.ordered(batch_size, group.rank, group.world_size)
        return
    start, stop = shard(len(ds), group.rank, group.world_size)
    for a in range(start, stop, batch_size):
        b = min(a + batch_size, stop)
        yield ds.images[a:b], ds.labels[a:b]


def epoch_batches(train: QuickDrawSet | PackedSplit, config: TrainConfig, epoch: int, group: distributed.Group,
                  transform=None):
    """Rank's disjoint share of one epoch as float batches on the device. The order depends on (seed, epoch)
    only, so a resumed run sees the same batches; every rank gets the same number of batches."""
    if isinstance(train, PackedSplit):  # blocks in a fresh order, rows shuffled within a buffer
        return device_batches(train.batches(config.batch_size, epoch=epoch, seed=config.seed, rank=group.rank,
                                            world_size=group.world_size), group.device, transform)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 10_007 + epoch))
    per_rank = len(train) // group.world_size
    return iterate_batches(train.images, train.labels, config.batch_size, shuffle=False, device=group.device,
                           transform=transform, index=order[group.rank * per_rank:(group.rank + 1) * per_rank])


def batches_per_epoch(train: QuickDrawSet | PackedSplit, batch_size: int, group: distributed.Group) -> int:
    if isinstance(train, PackedSplit):
        return train.num_batches(batch_size, group.world_size)
    return -(-(len(train) // group.world_size) // batch_size)


def head(ds: QuickDrawSet | PackedSplit, n: int) -> QuickDrawSet:
    """The first n drawings of ds in memory (what precision and budget timing run on)."""
    if isinstance(ds, QuickDrawSet):
        return ds.subset(torch.arange(min(n, len(ds))))
    images = torch.from_numpy(np.array(ds.images[:n])).view(-1, SIDE, SIDE)
    return QuickDrawSet(images, torch.from_numpy(ds.labels[:n].astype(np.int64)), ds.classes)


@dataclass
class _Probe:
    """What the budget planner times validation on: the first drawings, and how many this rank scores."""
    images: torch.Tensor
    rows: int

    def __len__(self) -> int:
        return self.rows


# ------------------------------------------------------------------------------- precision by measurement

def time_candidates(steps: dict, images_per_step: int | dict, seconds: float = 1.0, rounds: int = 3,
                    clock=time.perf_counter) -> dict:
    """Images/s of each candidate's step function ({name: step()}), measured in turns.

    images_per_step: one count for all, or {name: count}. Each candidate runs one untimed warm-up step
    (kernel selection, allocation), then `rounds` turns of about seconds/rounds each, taken in turn so that a
    busy moment hits them alike. Its rate is that of its fastest step: other work on the machine can only slow
    a step down. After the first turn, candidates at under half the best rate drop out: noise cannot make them
    win, and on a CPU without native bf16 a bf16 step can take seconds.
    """
    images = images_per_step if isinstance(images_per_step, dict) else dict.fromkeys(steps, images_per_step)
    fastest: dict = {}  # {name: seconds of its fastest step}

    def rates() -> dict:
        return {name: images[name] / max(t, 1e-9) for name, t in fastest.items()}

    for step in steps.values():
        step()
    alive = list(steps)
    for turn in range(rounds):
        for name in alive:
            start = last = clock()
            while last == start or last - start < seconds / rounds:
                steps[name]()
                now = clock()
                fastest[name] = min(fastest.get(name, float("inf")), now - last)
                last = now
        rate = rates()
        alive = [name for name in alive if 2 * rate[name] >= max(rate.values())]
    return rates()


def precision_candidates(config: TrainConfig, device: torch.device) -> list[tuple[bool, bool]]:
    """(bf16, channels_last) pairs "auto" may choose from; a forced setting is the only value of its field."""
    bf16 = [False, True] if config.bf16 == "auto" else [bool(config.bf16)]
    if amp_dtype(device, True) is None:  # no low-precision autocast on this device
        bf16 = [False]
    cl = [False, True] if config.channels_last == "auto" else [bool(config.channels_last)]
    return [(b, c) for b in bf16 for c in cl]


def precision_steps(model: nn.Module, train: QuickDrawSet, config: TrainConfig, device: torch.device) -> dict:
    """{precision name: (step(), (bf16, channels_last))} for each candidate of config: a training step on a copy
    of `model` with its own optimizer, on the first config.batch_size training drawings."""
    n = min(config.batch_size, len(train))
    x, y = to_float(train.images[:n].to(device)), train.labels[:n].to(device)  # (n,1,28,28), (n,)
    steps = {}
    for bf16, cl in precision_candidates(config, device):
        replica = copy.deepcopy(model).to(device)
        if cl:
            replica = replica.to(memory_format=torch.channels_last)
        dtype = amp_dtype(device, bf16)
        optimizer = make_optimizer(replica, config)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        steps[precision_name(dtype, cl)] = (partial(_synced_step, replica, x, y, optimizer, scaler, dtype, cl,
                                                    config.label_smoothing), (bf16, cl))
    return steps


def choose_precision(model: nn.Module, train: QuickDrawSet, config: TrainConfig, device: torch.device,
                     seconds: float = 1.0, clock=time.perf_counter) -> dict:
    """Resolve config.bf16 / config.channels_last ("auto": time each candidate's training step).

    The steps run on copies of `model` with their own optimizers, on the first config.batch_size training
    drawings, so the run itself starts untouched (random state included). Returns dict(bf16, channels_last,
    precision (e.g. "bf16 NHWC"), how ("measured" or "forced"), images_per_s {precision: rate} if measured).
    """
    candidates = precision_candidates(config, device)
    if len(candidates) == 1:
        bf16, cl = candidates[0]
        return dict(bf16=bf16, channels_last=cl, precision=precision_name(amp_dtype(device, bf16), cl), how="forced",
                    images_per_s={})
    steps = precision_steps(model, train, config, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        rates = time_candidates({k: step for k, (step, _) in steps.items()}, min(config.batch_size, len(train)),
                                seconds=seconds, clock=clock)
    best = max(rates, key=rates.get)
    bf16, cl = steps[best][1]
    return dict(bf16=bf16, channels_last=cl, precision=best, how="measured",
                images_per_s={k: round(v, 1) for k, v in rates.items()})


def _synced_step(model, x, y, optimizer, scaler, dtype, cl, label_smoothing) -> None:
    train_step(model, x, y, optimizer, scaler, dtype, cl, label_smoothing)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)  # a GPU step is timed when done, not when queued


def describe_precision(choice: dict) -> str:
    """e.g. "bf16 NHWC (measured images/s: fp32 NCHW 3,797, ..., bf16 NHWC 8,055)"."""
    if choice["how"] == "forced":
        return f"{choice['precision']} (set)"
    rates = ", ".join(f"{k} {v:,.0f}" for k, v in choice["images_per_s"].items())
    return f"{choice['precision']} (fastest; measured training images/s: {rates})"



def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params, lr, wd = model.parameters(), config.lr, config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, nesterov=True, weight_decay=wd)
    return (torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam)(params, lr=lr, weight_decay=wd)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """A per-batch schedule over total_steps, or None."""
    if config.schedule == "onecycle" and total_steps >= 8:  # OneCycleLR needs a few steps per phase
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.25)
    if config.schedule != "none":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None


# ------------------------------------------------------------------------------------------ checkpoints

def history_path(out: Path) -> Path:
    """models/name.pt -> models/name.history.json"""
    return Path(out).with_suffix(".history.json")


def last_path(out: Path) -> Path:
    """models/name.pt -> models/name.last.pt: the latest epoch with optimizer state, for resuming."""
    return Path(out).with_suffix(".last.pt")


# ---------------------------------------------------------------------------------------------- fit

def _new_history() -> dict:
    return dict(train_loss=[], train_acc=[], val_loss=[], val_acc=[], lr=[], epoch_seconds=[], train_epoch_seconds=[],
                train_images=0, train_seconds=0.0, train_images_per_s=0.0, fit_seconds=0.0, best_epoch=None, best_val_loss=None,
                stopped="completed", precision=None, budget=None)


def plan_epochs(budget_s: float, elapsed_s: float, batch_s: float, batches_per_epoch: int, batches_done: int,
                val_s: float, max_epochs: int, margin: float = 0.05) -> int:
    """How many epochs (at most max_epochs, at least 1) fit in budget_s, all validation included.

    elapsed_s have passed and batches_done batches of the first epoch are done; a batch takes batch_s and a
    validation val_s. `margin` of the budget is kept for what was not measured (checkpoints, jitter).
    """
    left = budget_s * (1 - margin) - elapsed_s - (batches_per_epoch - batches_done) * batch_s - val_s
    per_epoch = batches_per_epoch * batch_s + val_s
    return max(1, min(max_epochs, 1 + int(left // per_epoch))) if left >= 0 else 1


def describe_budget(budget: dict | None) -> str:
    """e.g. "7 epochs, sized to 15 min" ("" without a budget)."""
    if not budget:
        return ""
    return f"{budget['epochs']} epoch{'s' * (budget['epochs'] != 1)}, sized to {budget['minutes']:g} min"


class SizedSchedule:
    """A per-batch schedule whose length is set early in the run.

    It starts as build(total_steps) (the recipe's length); after each batch, plan(batches done) may
    return the measured length, and the schedule is then rebuilt to it and brought to the same batch.
    The first batches barely differ: one-cycle and cosine both start slowly.
    """

    def __init__(self, build, total_steps: int, plan=None):
        self.build, self.plan, self.done = build, plan, 0
        self.inner = build(total_steps)

    def step(self) -> None:
        self.done += 1
        if self.inner is not None:
            self.inner.step()
        total = self.plan(self.done) if self.plan is not None else None
        if total is not None:
            self.plan = None
            self.resize(total)

    def resize(self, total_steps: int) -> None:
        """Rebuild the schedule to total_steps and bring it to the batches done (a shorter one jumps ahead)."""
        self.inner = self.build(total_steps)
        for _ in range(self.done if self.inner is not None else 0):
            self.inner.step()

    def state_dict(self) -> dict | None:
        return None if self.inner is None else self.inner.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None:
            self.inner.load_state_dict(state)


def fit(model: nn.Module, train: QuickDrawSet | PackedSplit, val: QuickDrawSet | PackedSplit, config: TrainConfig,
        out: Path | None = None, resume: bool = False, device: torch.device | None = None,
        group: distributed.Group | None = None, source: dict | None = None) -> dict:
    """Train on `train` (augmented here if config.augment says so), keep the epoch with the lowest validation
    loss, stop after config.patience epochs without one. Returns the history.

    Before training, "auto" precision and memory format are resolved by timing (choose_precision;
    history["precision"]). With config.max_minutes, the run times its first batches and a validation pass
    and sets its epoch count, and so its schedule's length, to what fits in the budget (at most
    config.epochs; history["budget"]); it then runs that schedule to its end.
    With `out`, the best epoch is saved there (save_checkpoint), the latest epoch with its optimizer state
    beside it (last_path) and the history as JSON (history_path). resume=True continues, from last_path(out),
    an interrupted run with the same settings (only RUNTIME_FIELDS may differ, else ValueError; "auto" takes
    the saved choice, and the saved budget plan holds); a finished run (all epochs, or early stopping) is
    returned as saved, untrained. The checkpoints' config holds the resolved precision.
    On return the model holds the best epoch's weights, on `device` (default: pick_device(config.device)).

    fit seeds its batch order and augmentation from config.seed; callers call set_seed(config.seed)
    before building the model, so that its initial weights repeat too.

    train and val are in memory (QuickDrawSet) or splits of a pack (PackedSplit, streamed in bounded memory).
    group (utils.distributed.init()): under torchrun, the model trains with DistributedDataParallel, each rank on
    its disjoint share of every epoch; precision and budget are decided on rank 0 and shared, and only rank 0
    writes. source (e.g. the pack's path and manifest checksum) is kept in history["data"]; resuming from
    another source is refused.
    """
    if resume and out is None:
        raise ValueError("resume=True needs the checkpoint path `out`")
    if config.augment == "xl" and isinstance(train, PackedSplit):
        raise ValueError("--augment xl makes five in-memory copies of the training split, which a pack is meant "
                         "never to need: with --packed use --augment online (a random turn, flips, zoom and shift "
                         "per batch, made on the device)")
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        group = group or distributed.Group(device=device or pick_device(config.device))
        return _fit(model, train, val, config, out, resume, group, source)
    finally:
        torch.set_num_threads(threads)  # the setting is process-wide: leave it as found


def _check_resumable(saved: dict, config: TrainConfig, path) -> None:
    """A resumed run must compute what the saved one did: only RUNTIME_FIELDS may differ ("auto" matches
    the choice the saved run made)."""
    new = dataclasses.asdict(config)
    differ = [k for k in new if k in saved and k not in RUNTIME_FIELDS and saved[k] != new[k]
              and not (k in ("bf16", "channels_last") and new[k] == "auto")]
    if differ:
        changes = ", ".join(f"{k} {saved[k]!r} -> {new[k]!r}" for k in differ)
        raise ValueError(f"cannot resume {path} with other settings than it was saved with: {changes}")


def resolved(config: TrainConfig, history: dict) -> TrainConfig:
    """config with "auto" replaced by the choice its run made (history["precision"])."""
    choice = history.get("precision") or {}
    if not choice:
        return config
    return dataclasses.replace(config, bf16=choice["bf16"], channels_last=choice["channels_last"])


def _budget_planner(config: TrainConfig, model: nn.Module, val: QuickDrawSet, device: torch.device, t_fit: float,
                    steps: int, history: dict, dtype, decide=lambda budget: budget):
    """plan(batches done) for SizedSchedule: None until enough batches of the first epoch are timed, then the
    schedule's length in batches, with the plan recorded in history["budget"]. decide(plan) -> the plan kept
    (under torchrun: rank 0's, on every rank, so that all run the same schedule)."""
    measure_at = min(steps, max(3, steps // 10))  # about 10% of the first epoch
    marks = {}

    def plan(done: int):
        marks[done] = CLOCK()
        if done < measure_at:
            return None
        first = min(marks)  # the first batch (warm-up) is not counted
        batch_s = (marks[done] - marks[first]) / max(done - first, 1) if done > first else marks[done] - t_fit
        n = min(len(val), config.eval_batch_size)
        t0 = CLOCK()
        predict_logits(model, val.images[:n], batch_size=config.eval_batch_size, device=device, bf16=dtype is not None)
        val_s = (CLOCK() - t0) * len(val) / max(n, 1)
        elapsed = CLOCK() - t_fit
        epochs = plan_epochs(60 * config.max_minutes, elapsed, batch_s, steps, done, val_s, config.epochs)
        history["budget"] = dict(minutes=config.max_minutes, epochs=epochs, max_epochs=config.epochs,
                                 batch_seconds=batch_s, val_seconds=val_s, measured_after_batches=done,
                                 planned_seconds=elapsed + (epochs * steps - done) * batch_s + epochs * val_s)
        history["budget"]["label"] = describe_budget(history["budget"])
        history["budget"] = decide(history["budget"])
        return history["budget"]["epochs"] * steps

    return plan


def _shorten_if_late(history: dict, done: int, epochs: int, config: TrainConfig, scheduler: SizedSchedule,
                     steps: int) -> int:
    """After epoch `done` of a budget-sized run: if the epochs so far, at their mean length, say the plan
    would end after the budget (the machine got busier), drop epochs and rebuild the schedule so that it
    still ends, annealed, inside it. Returns the epoch count."""
    per_epoch = sum(history["epoch_seconds"]) / len(history["epoch_seconds"])
    left = 60 * history["budget"]["minutes"] * 0.97 - history["fit_seconds"]  # the plan's budget, also on resume
    kept = max(done + 1, done + int(left // per_epoch))
    if kept >= epochs:
        return epochs
    scheduler.resize(kept * steps)
    history["budget"].update(epochs=kept, shortened_after_epoch=done)
    history["budget"]["label"] = describe_budget(history["budget"]) + f" (shortened after epoch {done})"
    if config.progress:
        tqdm.write(f"budget: behind plan, {history['budget']['label']}", file=sys.stderr)
    return kept


def _same_data(saved: dict | None, source: dict | None) -> bool:
    """Whether a run may resume on `source`: the same pack contents and seed wherever it now lies, or the same
    categories and split (nothing recorded on either side: not checked)."""
    if saved is None or source is None:
        return True
    return {k: v for k, v in saved.items() if k != "packed"} == {k: v for k, v in source.items() if k != "packed"}


def _fit(model: nn.Module, train, val, config: TrainConfig, out: Path | None, resume: bool,
         group: distributed.Group, source: dict | None) -> dict:
    device = group.device
    history, best_state, since_best, last = _new_history(), None, 0, None
    history["data"] = source
    t_fit = CLOCK()
    if resume:
        # Only rank 0 writes checkpoints, so only it reads them: the other ranks (on other machines too) get its
        # copy, and every rank carries on from the same epoch.
        last, best_state = distributed.on_rank0(lambda: (
            read_checkpoint(last_path(out)), read_checkpoint(out)["state_dict"] if Path(out).is_file() else None), group)
        _check_resumable(last["config"], config, last_path(out))
        if not _same_data(last["history"].get("data"), source):
            raise ValueError(f"cannot resume {last_path(out)} from other data: it trained on "
                             f"{last['history']['data']}, this run reads {source}")
        history, since_best = last["history"], last["since_best"]
        t_fit -= history["fit_seconds"]
        config = dataclasses.replace(config, bf16=last["config"]["bf16"], channels_last=last["config"]["channels_last"])
    epochs = (history.get("budget") or {}).get("epochs", config.epochs)
    if last is not None and (history["stopped"] == "early_stopping" or len(history["train_loss"]) >= epochs):
        if best_state is not None:  # finished: nothing left to train
            model.load_state_dict(best_state)
        return history
    model.to(device)
    if history.get("precision") is None:  # decided on rank 0: every rank must run the same arithmetic
        history["precision"] = distributed.on_rank0(
            lambda: choose_precision(model, head(train, config.batch_size), config, device), group)
        if history["precision"]["how"] == "measured" and group.main:
            print(f"precision: {describe_precision(history['precision'])}", file=sys.stderr, flush=True)
    config = resolved(config, history)
    dtype = amp_dtype(device, config.bf16)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.augment == "xl":
        train = xl_augment(train)
    transform = None
    if config.augment == "online":
        augment = RandomAugment(config.aug_degrees, config.aug_hflip, config.aug_vflip, config.aug_scale, config.aug_shift)
        transform = partial(augment, generator=torch.Generator(device).manual_seed(config.seed))

    steps = 2 if config.dry_run else batches_per_epoch(train, config.batch_size, group)
    global_batch = config.batch_size * group.world_size
    lr = distributed.scale_lr(config.lr, config.optimizer, global_batch, config.lr_batch or config.batch_size)
    history["distributed"] = dict(world_size=group.world_size, global_batch=global_batch, lr=lr,
                                  backend=torch.distributed.get_backend() if group.active else None)
    run_config = dataclasses.replace(config, lr=lr)  # what the optimizer and schedule use; config is what is saved
    optimizer = make_optimizer(model, run_config)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    plan = None
    if config.max_minutes and last is None:
        probe = _Probe(head(val, config.eval_batch_size).images, -(-len(val) // group.world_size))
        plan = _budget_planner(config, model, probe, device, t_fit, steps, history, dtype,
                               decide=partial(distributed.share, group=group))
    scheduler = SizedSchedule(partial(make_scheduler, optimizer, run_config), steps * epochs, plan)
    net = model
    if group.active:  # gradients averaged over ranks in the backward pass
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if last is not None:  # interrupted: carry on
        model.load_state_dict(last["state_dict"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        if last.get("scaler"):
            scaler.load_state_dict(last["scaler"])
        torch.set_rng_state(last["rng"])
        if transform is not None:
            transform.keywords["generator"].set_state(last["aug_rng"])
        history["stopped"] = "completed"
    epoch = len(history["train_loss"])
    while epoch < epochs:
        t0 = CLOCK()
        if transform is not None:  # augmentation draws by (seed, epoch, rank): the same after a resume
            transform.keywords["generator"].manual_seed((config.seed * 10_007 + epoch) * 1_009 + group.rank)
        batches = epoch_batches(train, config, epoch, group, transform)
        with tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                  disable=not config.progress or not group.main, file=sys.stderr) as bar:
            lr = optimizer.param_groups[0]["lr"]
            loss, acc, seen = train_one_epoch(net, batches, optimizer, device, scheduler, config.label_smoothing,
                                              dtype, config.channels_last, 2 if config.dry_run else None, bar, scaler)
            if group.active:  # the epoch's figures over all ranks
                tally = distributed.sum_all(dict(loss=torch.tensor(loss * seen, dtype=torch.float64),
                                                 correct=torch.tensor(round(acc * seen)), seen=torch.tensor(seen)), group)
                seen = int(tally["seen"])
                loss, acc = float(tally["loss"]) / max(seen, 1), int(tally["correct"]) / max(seen, 1)
            t_train = CLOCK() - t0
            val_loss, val_acc = evaluate(model, val, device, config.eval_batch_size, dtype is not None,
                                         config.label_smoothing, group)
        if history["budget"] and epochs != history["budget"]["epochs"]:
            epochs = history["budget"]["epochs"]  # sized during this (the first) epoch
            if config.progress and group.main:
                tqdm.write(f"budget: {history['budget']['label']} (of at most {config.epochs})", file=sys.stderr)
        seconds = CLOCK() - t0
        for key, value in (("train_loss", loss), ("train_acc", acc), ("val_loss", val_loss), ("val_acc", val_acc),
                           ("lr", lr), ("epoch_seconds", seconds), ("train_epoch_seconds", t_train)):
            history[key].append(value)
        history["train_images"] += seen
        history["train_seconds"] += t_train
        history["fit_seconds"] = CLOCK() - t_fit
        history["train_images_per_s"] = history["train_images"] / max(history["train_seconds"], 1e-9)
        improved = history["best_val_loss"] is None or val_loss < history["best_val_loss"]
        if improved:
            history["best_val_loss"], history["best_epoch"], since_best = val_loss, epoch + 1, 0
            best_state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
        else:
            since_best += 1
        if config.progress and group.main:
            tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {loss:.4f} acc {acc:.2%} | val loss {val_loss:.4f} "
                       f"acc {val_acc:.2%} | {seconds:.1f} s, {seen / t_train:.0f} img/s{' *' if improved else ''}",
                       file=sys.stderr)
        if history["budget"] and epoch + 1 < epochs:
            # rank 0's clock decides, so that every rank keeps running the same schedule
            late = distributed.share((history["epoch_seconds"], history["fit_seconds"]), group)
            history["epoch_seconds"], history["fit_seconds"] = list(late[0]), late[1]
            epochs = _shorten_if_late(history, epoch + 1, epochs, config, scheduler, steps)
        stop = config.patience and since_best >= config.patience
        if stop:
            history["stopped"] = "early_stopping"
        if out is not None and group.main:
            _save_progress(out, model, best_state if improved else None, train.classes, config, history, optimizer,
                           scheduler, since_best, transform, scaler)
        distributed.barrier(group)  # no rank runs ahead of the checkpoint a restart resumes from
        epoch += 1
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    if out is not None and group.main:
        write_json(history_path(out), history, indent=1)
    return history


def _save_progress(out, model, best_state, classes, config, history, optimizer, scheduler, since_best, transform,
                   scaler):
    """After an epoch: the best checkpoint if this epoch is the best, the resumable "last" one always."""
    if best_state is not None:
        save_checkpoint(out, model, config.model, classes, config, history)
    save_state(dict(state_dict=model.state_dict(), model_name=config.model, classes=list(classes),
                      config=dataclasses.asdict(config), history=history, optimizer=optimizer.state_dict(),
                      scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), since_best=since_best,
                      rng=torch.get_rng_state(),
                      aug_rng=None if transform is None else transform.keywords["generator"].get_state()),
                 last_path(out))
    write_json(history_path(out), history, indent=1)


# ------------------------------------------------------------------------- one run: seed, build, fit, score

SUMMARY = ("top1", "top3", "top5", "map3", "n")  # the scores a checkpoint stores for each split


def summary(scores: dict[str, dict]) -> dict[str, dict]:
    """{split: the SUMMARY of its scores}: what a checkpoint's "metrics" hold."""
    return {name: {k: s[k] for k in SUMMARY} for name, s in scores.items()}


def score_and_save(out, model: nn.Module, config: TrainConfig, classes: list[str], history: dict,
                   device: torch.device | None = None, group: distributed.Group | None = None,
                   **splits: QuickDrawSet | PackedSplit) -> tuple[dict, dict]:
    """Score the model on each whole split (on `device`: the one it trained on; streamed, each rank its shard
    under torchrun) and re-save its checkpoint with those scores (rank 0). Returns (full scores per split, as
    evaluate_model gives them, plus the mean loss; the summary stored in the checkpoint).
    """
    group = group or distributed.Group(device=device or pick_device(config.device))
    config = resolved(config, history)
    model.to(group.device)
    scores = {name: score_split(model, part, group.device, config.eval_batch_size, group=group)
              for name, part in splits.items()}
    metrics = summary(scores)
    if group.main:
        save_checkpoint(out, model, config.model, classes, config, history, metrics=metrics)
    return scores, metrics


@dataclass(frozen=True)
class RunResult:
    """What train_run did: the settings it was given, fit's history, every score of each split (score_split's),
    the checkpoint written and the model it holds (the best epoch, NCHW, on the device it trained on)."""
    config: TrainConfig
    history: dict
    scores: dict[str, dict]
    checkpoint: Path
    model: nn.Module

    @property
    def metrics(self) -> dict[str, dict]:
        """{split: top1, top3, top5, map3, n}, as the checkpoint stores them."""
        return summary(self.scores)

    @property
    def trained_config(self) -> TrainConfig:
        """config with "auto" replaced by the precision and memory format the run chose."""
        return resolved(self.config, self.history)

    @property
    def precision(self) -> dict:
        """The precision decision (choose_precision): chosen, how, and the rates timed."""
        return self.history["precision"]

    @property
    def budget(self) -> dict | None:
        """The time budget's plan (epochs, max_epochs, minutes, ...), None without max_minutes."""
        return self.history["budget"]

    @property
    def epochs(self) -> int:
        return len(self.history["train_loss"])

    @property
    def params(self) -> int:
        return count_parameters(self.model)

    @property
    def train_seconds(self) -> float:
        """Time spent in training steps (validation excluded)."""
        return self.history["train_seconds"]

    @property
    def fit_seconds(self) -> float:
        """The whole fit: training, validation, checkpoints."""
        return self.history["fit_seconds"]

    @property
    def images_per_s(self) -> float:
        """Training images per second of training time."""
        return self.history["train_images_per_s"]


def train_run(config: TrainConfig, train: QuickDrawSet | PackedSplit, val: QuickDrawSet | PackedSplit,
              test: QuickDrawSet | PackedSplit, out: str | Path, *, device: torch.device | None = None,
              group: distributed.Group | None = None, resume: bool = False, source: dict | None = None) -> RunResult:
    """One training run from a seeded start: set_seed(config.seed), build config.model for train.classes, fit
    (checkpoints at `out`), then score the best epoch on the whole val and test splits on the device it trained
    on and re-save the checkpoint `out` with those scores.

    device: where to train and score (default: pick_device(config.device)); under torchrun give the group
    (utils.distributed.init()) instead. resume and source are fit's.
    """
    group = group or distributed.Group(device=device or pick_device(config.device))
    set_seed(config.seed)  # the same initial weights for every rerun
    model = build_model(config.model, len(train.classes))
    history = fit(model, train, val, config, out=out, resume=resume, group=group, source=source)
    # fit returns with the best epoch's weights: a fresh model holds them as load_checkpoint(out) would
    best = build_model(config.model, len(train.classes))
    best.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    scores, _ = score_and_save(out, best, config, train.classes, history, group=group, val=val, test=test)
    distributed.barrier(group)
    return RunResult(config, history, scores, Path(out), best)


# --------------------------------------------------------------------------------------------- command line

def _categories(values: list[str]) -> list[str]:
    """Names as separate arguments or comma-separated (no official name has a comma)."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _flag_kinds(hint) -> tuple[list, tuple]:
    """(the types, the Literal values) of a TrainConfig annotation: `int | None` -> ([int], ()),
    `Literal["a", "b"]` -> ([], ("a", "b")), `bool | Literal["auto"]` -> ([bool], ("auto",))."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = [h for h in (typing.get_args(hint) if union else (hint,)) if h is not type(None)]
    literal = [h for h in members if typing.get_origin(h) is Literal]
    return [h for h in members if h not in literal], tuple(v for h in literal for v in typing.get_args(h))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m utils.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model, choices=sorted(MODELS))
    p.add_argument("--categories", nargs="+", help='official names: cat "alarm clock" (or comma-separated)')
    p.add_argument("--packed", help="train from this pack (python -m utils.pack) instead of --categories")
    p.add_argument("--max-per-class", type=int, help="first N drawings of each category (default: all)")
    p.add_argument("--data", default="data", help="folder of the bitmaps; missing ones are downloaded into it")
    p.add_argument("--base-url", help="bucket root or mirror (URL or folder); default: $QUICKDRAW_BASE_URL or the official bucket")
    p.add_argument("--out", default=None, help="checkpoint path (default: models/<model>.pt)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.last.pt")
    p.add_argument("--split-seed", type=int, default=None, help="seed of the 80/10/10 split (default: --seed)")
    p.add_argument("--dist-timeout", type=float, default=distributed.TIMEOUT.total_seconds(),
                   help="under torchrun: seconds a collective waits for the other ranks before the run fails")
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="start from a named recipe (utils.train.RECIPES); flags given as well override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model",):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        kinds, choices = _flag_kinds(hints[f.name])
        if bool in kinds and "auto" in choices:  # neither flag: "auto", timed before training
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default="auto",
                           help="force on or off (default: auto, the faster of the two as timed before training)")
        elif bool in kinds:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif choices:
            p.add_argument(flag, default=default, choices=choices)
        elif len(kinds) == 1:
            p.add_argument(flag, type=kinds[0], default=default)
        else:
            raise TypeError(f"TrainConfig.{f.name}: no command-line flag for a field of type {hints[f.name]}")
    recipe = p.parse_known_args(argv)[0].recipe
    if recipe:
        p.set_defaults(**RECIPES[recipe].settings)
    args = p.parse_args(argv)
    if args.dist_timeout <= 0:
        p.error(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout:g}")
    if bool(args.categories) == bool(args.packed):
        p.error("give --categories (bitmaps, loaded into memory) or --packed (a pack, streamed), not both")
    fixed = [flag for flag, value in (("--max-per-class", args.max_per_class), ("--split-seed", args.split_seed),
                                      ("--base-url", args.base_url)) if args.packed and value is not None]
    if fixed:
        p.error(f"{', '.join(fixed)} cannot apply to --packed: the pack fixed its drawings and split when it was "
                f"made (python -m utils.pack)")
    return args


def load_data(args, config: TrainConfig, group: distributed.Group) -> tuple[tuple, dict]:
    """((train, val, test), where they came from): a pack's splits, or bitmaps (downloaded where missing)
    loaded and split in memory."""
    if args.packed:
        pack = PackedSet.open(args.packed)
        source = dict(packed=str(Path(args.packed).resolve()), seed=pack.manifest["seed"],
                      manifest_sha256=hashlib.sha256((pack.path / "manifest.json").read_bytes()).hexdigest())
        return (pack.train, pack.val, pack.test), source
    categories = resolve_categories(_categories(args.categories))
    # Every rank: each file is fetched once under its lock while the others wait on the lock, not in a
    # collective, whose timeout a long download would exceed.
    download_bitmaps(categories, root=args.data, max_per_class=args.max_per_class, base_url=args.base_url,
                     progress=config.progress and group.local_rank == 0)
    split_seed = config.seed if args.split_seed is None else args.split_seed
    ds = load_bitmaps(categories, root=args.data, max_per_class=args.max_per_class)
    source = dict(categories=categories, max_per_class=args.max_per_class, split_seed=split_seed)
    return split(ds, seed=split_seed), source


def main(argv: list[str] | None = None) -> dict:
    """The command: one process, or one rank of a torchrun run (the same code). Returns the result (every rank)."""
    args = parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    out = Path(args.out or f"models/{config.model}.pt")
    group = distributed.init(pick_device(config.device), timedelta(seconds=args.dist_timeout))
    try:
        (train, val, test), source = load_data(args, config, group)
        # torchrun --max-restarts starts every rank again after one failed: carry on from the last epoch saved
        # (as rank 0, which wrote it, sees it: every rank must take the same path).
        resume = distributed.share(args.resume or (distributed.restarted() and last_path(out).is_file()), group)
        run = train_run(config, train, val, test, out, group=group, resume=resume, source=source)
    finally:
        distributed.teardown()
    history = run.history
    return dict(model=config.model, params=run.params, checkpoint=str(out), **run.metrics,
                train_images_per_s=run.images_per_s, train_seconds=run.train_seconds,
                epochs=run.epochs, best_epoch=history["best_epoch"], stopped=history["stopped"],
                precision=run.precision, budget=run.budget, data=source,
                distributed=dict(history.get("distributed") or {}, rank=group.rank, resumed=resume),
                sizes=dict(train=len(train), val=len(val), test=len(test)), loadavg=os.getloadavg())


if __name__ == "__main__":
    try:
        result = main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        rank = f" (rank {os.environ['RANK']})" if distributed.launched() else ""  # which of torchrun's logs
        print(f"error{rank}: {e}", file=sys.stderr)
        sys.exit(1)
    if result["distributed"]["rank"] == 0:  # one JSON line for the run
        print(json.dumps(result))
