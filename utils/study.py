"""The study behind notebook.ipynb: its settings, its training runs and how their results are reported.

Settings come from StudyConfig: each field names the environment variable that overrides it and what
it means, and `settings_table()` lists them with their defaults (the notebook's configuration cell shows it).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils import plots
from utils.data import QuickDrawSet
from utils.categories import resolve_categories
from utils.download import Fetched, bitmap_path, download_bitmaps, resolve_base_url
from utils.io import atomic_write
from utils.metrics import predict_logits
from utils.report import Table
from utils.train import RECIPES, Recipe, TrainConfig, pick_device, train_run

ORIGINAL_CATEGORIES = ["dog", "axe", "bat", "alarm clock", "backpack", "blueberry", "elephant", "broom",
                       "cruise ship", "beard"]
# The notebook's runs, by their recipes' labels (utils.train.RECIPES). QuickDrawNet replaced the earlier
# ResNet (RECIPES["resnet"], still in benchmarks/bench_train.py): as accurate, and within its time budget on
# CPUs without native bfloat16 too.
RUNS: dict[str, Recipe] = {RECIPES[name].label: RECIPES[name] for name in ("v1", "v2", "v2-xl", "v2-tuned", "qdnet")}
METRICS = ("top1", "top3", "map3")
DEVICES = ("auto", "cpu", "cuda", "mps")
POSITIVE = ("max_per_class", "epochs", "batch_size", "threads", "workers")  # settings that must be >= 1


def setting(default=dataclasses.MISSING, *, env: str, help: str, none: str | None = None, shown: str | None = None,
            default_factory=dataclasses.MISSING):
    """A StudyConfig field with the environment variable that overrides it and what it means. `none`: the word
    that sets an optional field to None from the environment; `shown`: how None is shown."""
    return field(default=default, default_factory=default_factory,
                 metadata=dict(env=env, help=help, none=none, shown=shown))


@dataclass
class StudyConfig:
    """Everything the notebook's run depends on; `from_env()` applies the environment overrides named in
    each field (`settings_table()` lists them)."""
    categories: list[str] = setting(default_factory=lambda: list(ORIGINAL_CATEGORIES), env="QD_CATEGORIES",
                                    help='comma-separated official names, e.g. "dog,alarm clock"')
    # The first 10,000 of each category keep a CPU run near an hour; "all" (None) is 100,000+ each.
    max_per_class: int | None = setting(10_000, env="QD_MAX_PER_CLASS", help="drawings per category",
                                        none="all", shown="all")
    epochs: int | None = setting(None, env="QD_EPOCHS", help="epochs for every run (the original study's: 10)",
                                 none="recipe", shown="each run's recipe")
    batch_size: int | None = setting(None, env="QD_BATCH_SIZE", help="batch size for every run (the original's: 64)",
                                     none="recipe", shown="each run's recipe")
    # The committed notebook run used seed 1.
    seed: int = setting(1, env="QD_SEED", help="seed of the split, the initial weights and the batches")
    device: str = setting("auto", env="QD_DEVICE", help="auto, cpu, cuda[:N] or mps, available here")
    models: list[str] = setting(default_factory=lambda: list(RUNS), env="QD_MODELS",
                                help="comma-separated runs to train, from RUNS")
    data_dir: str = setting("data", env="QD_DATA_DIR", help="folder of the downloaded bitmaps")
    base_url: str | None = setting(None, env="QUICKDRAW_BASE_URL", shown="the official bucket",
                                   help="data source: the bucket root or a mirror of its layout, URL or folder")
    models_dir: str = setting("models", env="QD_MODELS_DIR", help="folder of the checkpoints")
    figures_dir: str = setting("reports/figures", env="QD_FIGURES_DIR", help="folder of the figures")
    threads: int | None = setting(None, env="QD_THREADS", help="torch CPU threads", none="auto",
                                  shown="torch's choice")
    progress: bool = setting(True, env="QD_PROGRESS",
                             help="live progress bars, 1 or 0 (0 for headless runs: a saved notebook keeps only "
                                  "their first frame); per-epoch summaries are printed either way")
    workers: int = setting(4, env="QD_WORKERS", help="parallel downloads")
    overrides: dict[str, str] = field(default_factory=dict, repr=False)  # field -> the variable that set it

    def __post_init__(self):
        for f in settings():
            setattr(self, f.name, _checked(f.name, getattr(self, f.name)))

    @classmethod
    def from_env(cls, environ=None, **defaults) -> "StudyConfig":
        """`defaults` (fields; StudyConfig's own for the rest), overridden by whichever of the fields'
        environment variables are set."""
        environ = os.environ if environ is None else environ
        values, overrides = dict(defaults), {}
        for f in settings():
            var = f.metadata["env"]
            raw = environ.get(var, "").strip()
            if raw:
                try:
                    values[f.name] = _checked(f.name, parse_setting(f, raw))
                except ValueError as e:
                    raise ValueError(f"{var}={raw!r}: {e}") from None
                overrides[f.name] = var
        return cls(**values, overrides=overrides)

    def train_config(self, run: str) -> TrainConfig:
        """The TrainConfig of one run: its recipe, with the study-wide overrides on top."""
        shared = {k: getattr(self, k) for k in ("epochs", "batch_size") if getattr(self, k) is not None}
        return RUNS[run].config(seed=self.seed, device=self.device, num_threads=self.threads, progress=self.progress,
                                **shared)

    def describe(self) -> str:
        """One line per setting, saying which came from the environment."""
        lines = []
        for f in settings():
            value = getattr(self, f.name)
            note = f"   <- {self.overrides[f.name]}" if f.name in self.overrides else ""
            if f.name == "base_url" and value is None:
                value = resolve_base_url(value)
            elif value is None:
                value = f.metadata["shown"]
            lines.append(f"{f.name:>14}: {value}{note}")
        return "\n".join(lines)


def settings() -> tuple[dataclasses.Field, ...]:
    """StudyConfig's settings: its fields that have an environment variable."""
    return tuple(f for f in dataclasses.fields(StudyConfig) if "env" in f.metadata)


def settings_table() -> Table:
    """Every setting: its environment variable, its default and what it means."""
    rows = []
    for f in settings():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, list):
            default = ",".join(default)
        shown = f.metadata["shown"] if default is None else default
        word = f', or "{f.metadata["none"]}"' if f.metadata["none"] else ""
        rows.append([f.metadata["env"], f.name, str(shown), f.metadata["help"] + word])
    return Table(["variable", "field", "default", "meaning"], rows, numbers=False)


def parse_setting(f: dataclasses.Field, raw: str):
    """The value of setting `f` written as `raw` in the environment, read by the field's type."""
    kind = _HINTS[f.name]
    if kind is bool:
        return _flag(raw)
    if kind in (int, int | None):
        return _count(raw, f.metadata["none"]) if f.metadata["none"] else _int(raw)
    if kind == list[str]:
        return _names(raw)
    if kind in (str, str | None):
        return raw
    raise TypeError(f"no parser for setting {f.name} of type {kind}")


def _checked(name: str, value):
    """`value` of setting `name`, checked and normalised (the same rules for fields and the environment)."""
    if name == "categories":
        return resolve_categories(value)
    if name == "device":
        return _device(value)  # now, not an hour into the run
    if name == "models":
        unknown = [m for m in value if m not in RUNS]
        if unknown or not value:
            raise ValueError(f"unknown runs {unknown or value}; choose from {', '.join(RUNS)}")
    if name in POSITIVE and value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _names(raw: str) -> list[str]:
    return [s.strip() for s in raw.split(",") if s.strip()]


def _count(raw: str, none_word: str) -> int | None:
    if raw.lower() == none_word:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"expected a positive integer or {none_word!r}") from None
    if value < 1:
        raise ValueError(f"expected a positive integer or {none_word!r}")
    return value


def _flag(raw: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if raw.lower() not in words:
        raise ValueError("expected 1 or 0 (true/false, yes/no, on/off)")
    return words[raw.lower()]


def _device(name: str) -> str:
    """`name` if it is a device this machine has ("auto" always is)."""
    if not isinstance(name, str) or name.split(":")[0] not in DEVICES:
        raise ValueError(f"unknown device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    try:
        pick_device(name)
    except RuntimeError as e:  # e.g. cuda on a machine without a GPU
        raise ValueError(f"device {name!r} cannot be used on this machine ({e})") from None
    return name


def _int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("expected an integer") from None


_HINTS = typing.get_type_hints(StudyConfig)
ENV = {f.metadata["env"]: f.name for f in settings()}  # variable -> field


def download(config: StudyConfig) -> dict[str, Fetched]:
    """Fetch (or find cached) the bitmaps of every category; what each fetch did, by category."""
    fetched = {}
    download_bitmaps(config.categories, root=config.data_dir, max_per_class=config.max_per_class,
                     base_url=config.base_url, workers=config.workers, progress=config.progress, stats=fetched)
    return fetched


def _moved(n_bytes: int) -> str:
    return "cached" if n_bytes == 0 else f"{n_bytes / 1e6:.1f} MB fetched"


def summary_on_disk(config: StudyConfig, fetched: dict[str, Fetched] | None = None) -> str:
    """What the study will read: drawings and megabytes per category file, and what `fetched`
    (from download) moved for it. The folder is shown as configured."""
    rows, total_n, total_mb, total_moved = [], 0, 0.0, 0
    for name in config.categories:
        path = bitmap_path(config.data_dir, name)
        n = len(np.load(path, mmap_mode="r"))
        mb = path.stat().st_size / 1e6
        total_n, total_mb = total_n + n, total_mb + mb
        used = n if config.max_per_class is None else min(n, config.max_per_class)
        moved = fetched[name].bytes_moved if fetched and name in fetched else None
        total_moved += moved or 0
        rows.append(f"{name:>16}  {n:>9,} drawings  {mb:8.1f} MB  ({used:,} used)"
                    + ("" if moved is None else f"  {_moved(moved)}"))
    rows.append(f"{'total':>16}  {total_n:>9,} drawings  {total_mb:8.1f} MB  in {config.data_dir}"
                + (f"  {_moved(total_moved)}" if fetched else ""))
    return "\n".join(rows)


def describe_splits(**splits: QuickDrawSet) -> str:
    """Sizes of each split, overall and for the smallest and largest class."""
    lines = []
    for name, ds in splits.items():
        counts = ds.counts()
        lines.append(f"{name:>6}: {len(ds):>9,} drawings, {int(counts.min()):,} to {int(counts.max()):,} per class")
    return "\n".join(lines)


def examples(ds: QuickDrawSet, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """One random drawing from each of the first n categories, uint8 (n, 28, 28), and their categories."""
    index = plots.pick_per_class(ds.labels, 1, min(n, len(ds.classes)), seed)
    return ds.images[index], list(ds.classes[:len(index)])


def train_and_evaluate(name: str, train: QuickDrawSet, val: QuickDrawSet, test: QuickDrawSet,
                       config: StudyConfig) -> dict:
    """Train run `name` (see RUNS) with utils.train.train_run: fit, then its best epoch scored on the whole
    validation and test splits. The checkpoint, with those scores, is <models_dir>/<stem>.pt (Recipe.stem)."""
    tc = config.train_config(name)
    device = pick_device(tc.device)
    run = train_run(tc, train, val, test, Path(config.models_dir) / f"{RUNS[name].stem}.pt", device=device)
    history = run.history
    return dict(
        name=name, model_name=tc.model, recipe=dataclasses.asdict(run.trained_config), params=run.params,
        train_seconds=run.train_seconds, fit_seconds=run.fit_seconds, images_per_s=run.images_per_s,
        precision=run.precision, budget=run.budget, epochs=run.epochs, planned_epochs=tc.epochs,
        stopped=history["stopped"], best_epoch=history.get("best_epoch"), history=history,
        checkpoint=str(run.checkpoint), classes=list(train.classes), **run.metrics,
        per_class=run.scores["test"]["per_class"], confusion=run.scores["test"]["confusion"],
        test_pred=predict_logits(run.model, test.images, device=device).argmax(1).tolist(),
    )


def run(name: str, train: QuickDrawSet, val: QuickDrawSet, test: QuickDrawSet, config: StudyConfig) -> dict | None:
    """train_and_evaluate, then its loss and accuracy curves (saved as curves_<stem>.png).
    None, with a note, when the run is not among config.models."""
    if name not in config.models:
        print(f"{name} skipped: not in config.models ({', '.join(config.models)})")
        return None
    tc = config.train_config(name)
    print(f"{name} on the {len(train):,} drawings of the training split: "
          + ", ".join(f"{k}={getattr(tc, k)}" for k in RUNS[name].settings))
    result = train_and_evaluate(name, train, val, test, config)
    print(history_table(result["history"]))
    axes = plots.curves(result["history"], name, label_smoothing=tc.label_smoothing)
    plots.save_figure(axes, f"curves_{RUNS[name].stem}", config.figures_dir)
    print(f"{name}: val top-1 {result['val']['top1']:.2%}, test top-1 {result['test']['top1']:.2%}, "
          f"{epochs_done(result)} epochs in {result['train_seconds']:.0f} s of training, "
          f"in {precision_cell(result)}, checkpoint {result['checkpoint']}")
    return result


def completed(*results: dict | None) -> list[dict]:
    """The runs that were trained (skipped ones are None)."""
    return [r for r in results if r is not None]


def best_result(results: list[dict], split: str = "val", metric: str = "top1") -> dict:
    """The run with the highest validation top-1 by default: chosen without looking at the test split."""
    if not results:
        raise ValueError("no results to choose from")
    return max(results, key=lambda r: r[split][metric])


def history_table(history: dict) -> Table:
    """One row per epoch of a fit() history; the kept (best) epoch is marked with *."""
    rows = [[f"{e + 1}{' *' if e + 1 == history.get('best_epoch') else ''}",
             f"{history['train_loss'][e]:.4f}", f"{history['train_acc'][e]:.2%}",
             f"{history['val_loss'][e]:.4f}", f"{history['val_acc'][e]:.2%}", f"{history['epoch_seconds'][e]:.1f}"]
            for e in range(len(history["train_loss"]))]
    return Table(["epoch", "train loss", "train acc", "val loss", "val acc", "seconds"], rows)


STOP_NOTES = {"time_budget": "time cap", "early_stopping": "early stop"}  # history["stopped"] -> words


def epochs_done(result: dict) -> str:
    """Epochs trained: "10", "9 of 30, sized to 14.5 min" where a time budget set the schedule's length,
    "16 of 20 (time cap)" or "(early stop)" when fit stopped before the planned count."""
    budget = result.get("budget")
    if budget:
        done = f"{result['epochs']} of {budget['max_epochs']}, sized to {budget['minutes']:g} min"
    else:
        done = str(result["epochs"])
    note = STOP_NOTES.get(result.get("stopped"))
    if note:
        done = f"{result['epochs']} of {budget['epochs'] if budget else result['planned_epochs']} ({note})"
    return done


def precision_cell(result: dict) -> str:
    """e.g. "bf16 NHWC (timed)": the precision and memory format a run trained in, and whether it was
    chosen by timing or set."""
    choice = result.get("precision")
    if not choice:
        return "fp32 NCHW"
    return f"{choice['precision']} ({'timed' if choice['how'] == 'measured' else 'set'})"


def comparison_table(results: list[dict]) -> Table:
    """Parameters, training time and speed, and validation and test scores of every run.
    The run chosen as best (by validation top-1) is marked with *."""
    best = best_result(results)["name"] if results else None
    columns = ["model", "params", "train s", "images/s", "precision", "epochs"] + [
        f"{split} {plots.METRIC_NAMES[m]}" for split in ("val", "test") for m in METRICS]
    rows = [[r["name"] + (" *" if r["name"] == best else ""), f"{r['params']:,}", f"{r['train_seconds']:.1f}",
             f"{r['images_per_s']:,.0f}", precision_cell(r), epochs_done(r)]
            + [f"{100 * r[split][m]:.2f}%" for split in ("val", "test") for m in METRICS] for r in results]
    return Table(columns, rows)


def _most_confused(result: dict) -> tuple[str, str, float]:
    cm = torch.tensor(result["confusion"], dtype=torch.float64)
    rates = cm / cm.sum(1, keepdim=True).clamp(min=1)
    rates.fill_diagonal_(0)
    i, j = divmod(int(rates.argmax()), len(cm))
    return result["classes"][i], result["classes"][j], float(rates[i, j])


@dataclass
class Gain:
    """Run `run` against run `baseline`: test top-1 of each, the difference in points and the training
    time as a multiple of the baseline's (NaN where either run was not trained)."""
    run: str
    baseline: str
    baseline_top1: float
    top1: float
    points: float
    time_ratio: float


@dataclass
class Findings:
    """The study's figures, from which the notebook writes its findings."""
    best: str                  # the run with the highest validation top-1 (chosen without the test split)
    params: int
    n_classes: int
    test: dict                 # the best run's test scores: top1, top3, map3, n
    val: dict                  # and validation scores
    gains: dict[str, Gain]     # "V2 vs V1", "V2-XL vs V2", "V2-tuned vs V2", "QuickDrawNet vs V2", "best vs V2"
    fastest: str               # the run with the most training images per second
    fastest_images_per_s: float
    hardest: str               # the best run's least accurate category
    hardest_accuracy: float
    confused: tuple[str, str, float]  # the best run's most frequent confusion: true, predicted, share of true
    val_test_gap: float        # |val - test| top-1 of the best run, in points
    budgets: dict[str, dict]   # run -> its time budget (epochs, max_epochs, minutes) and fit_minutes
    precisions: dict[str, dict]  # run -> chosen precision and the images/s timed for each candidate
    stops: dict[str, dict]     # run -> epochs, planned_epochs, why (a STOP_NOTES word) and best_epoch


GAINS = (("V2", "V1"), ("V2-XL", "V2"), ("V2-tuned", "V2"), ("QuickDrawNet", "V2"))


def _gain(by: dict[str, dict], a: str, b: str) -> Gain:
    if a not in by or b not in by:
        nan = float("nan")
        return Gain(a, b, nan, nan, nan, nan)
    ta, tb = by[a]["test"]["top1"], by[b]["test"]["top1"]
    return Gain(a, b, tb, ta, 100 * (ta - tb), by[a]["train_seconds"] / max(by[b]["train_seconds"], 1e-9))


def findings(results: list[dict]) -> Findings:
    """The study's figures, computed from the results of this run."""
    if not results:
        raise ValueError("no run was trained")
    by = {r["name"]: r for r in results}
    best = best_result(results)
    gains = {f"{a} vs {b}": _gain(by, a, b) for a, b in GAINS}
    gains["best vs V2"] = _gain(by, best["name"], "V2")
    fastest = max(results, key=lambda r: r["images_per_s"])
    worst = int(np.argmin(best["per_class"]))
    return Findings(
        best=best["name"], params=best["params"], n_classes=len(best["classes"]), test=best["test"], val=best["val"],
        gains=gains, fastest=fastest["name"], fastest_images_per_s=fastest["images_per_s"],
        hardest=best["classes"][worst], hardest_accuracy=float(best["per_class"][worst]),
        confused=_most_confused(best), val_test_gap=100 * abs(best["val"]["top1"] - best["test"]["top1"]),
        budgets={r["name"]: dict(r["budget"], fit_minutes=r.get("fit_seconds", r["train_seconds"]) / 60)
                 for r in results if r.get("budget")},
        precisions={r["name"]: dict(chosen=r["precision"]["precision"], images_per_s=r["precision"]["images_per_s"])
                    for r in results if r.get("precision", {}).get("how") == "measured"},
        stops={r["name"]: dict(epochs=r["epochs"], planned_epochs=r["planned_epochs"], why=STOP_NOTES[r["stopped"]],
                               best_epoch=r["best_epoch"]) for r in results if r.get("stopped") in STOP_NOTES},
    )


def save_best(best: dict, config: StudyConfig) -> Path:
    """Copy the best run's checkpoint to <models_dir>/best.pt for the web API."""
    dest = Path(config.models_dir) / "best.pt"
    with atomic_write(dest) as f, open(best["checkpoint"], "rb") as src:
        shutil.copyfileobj(src, f)
    print(f"{best['name']} saved as {dest}; serve it with: python -m app --model {dest}")
    return dest
