"""notebook.ipynb runs top to bottom on a small real configuration; utils/study.py's settings and reports."""
import dataclasses
import json
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from utils import study
from utils.download import Fetched

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["airplane", "alarm clock", "cloud", "smiley face"]  # 4 of the mirror's 17 bitmap categories
FIGURES = ["samples", "heatmaps", "counts", "augmentation", "curves_v1", "curves_v2", "curves_v2-xl",
           "curves_v2-tuned", "curves_quickdrawnet", "accuracy", "confusion", "per_class", "misclassified"]
PNG = b"\x89PNG\r\n\x1a\n"


def venv_kernel(tmp_path: Path) -> KernelManager:
    """A kernel on this very interpreter (the project venv), whatever kernelspecs the machine has."""
    spec = tmp_path / "kernels" / "study"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "study", "language": "python"}))
    return KernelManager(kernel_name="study", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))


def outputs_of(nb, snippet: str) -> str:
    """All text a cell whose source holds `snippet` showed."""
    cell = next(c for c in nb.cells if c.cell_type == "code" and snippet in c.source)
    parts = []
    for out in cell.outputs:
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts.append(data.get("text/markdown", data.get("text/plain", "")))
    return "\n".join(parts)


def test_figure_list_matches_the_committed_figures():
    assert set(FIGURES) == {p.stem for p in (ROOT / "reports" / "figures").glob("*.png")}


def test_notebook_runs_on_mirror_and_writes_every_figure(mirror_url, tmp_path, monkeypatch):
    env = {"QD_CATEGORIES": ",".join(SMALL), "QD_MAX_PER_CLASS": "1000", "QD_EPOCHS": "1", "QD_SEED": "0",
           "QD_DEVICE": "cpu", "QUICKDRAW_BASE_URL": mirror_url,
           "QD_THREADS": "1", "QD_PROGRESS": "0",  # one thread: no slowdown from oversubscribed cores
           "QD_DATA_DIR": str(tmp_path / "data"), "QD_MODELS_DIR": str(tmp_path / "models"),
           "QD_FIGURES_DIR": str(tmp_path / "figures")}
    for key in study.ENV:  # nothing from the caller's environment leaks into the small run
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(ROOT / "notebook.ipynb", as_version=4)
    client = NotebookClient(nb, km=venv_kernel(tmp_path), timeout=600,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError naming the cell if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]  # QD_PROGRESS=0
    assert "QD_EPOCHS" in outputs_of(nb, "config.describe()")
    assert {p.stem for p in (tmp_path / "figures").glob("*.png")} == set(FIGURES)
    for name in FIGURES:
        data = (tmp_path / "figures" / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    fetched = outputs_of(nb, "study.summary_on_disk(")
    assert all(f"{c}  " in fetched for c in SMALL) and fetched.count("MB fetched") == len(SMALL) + 1

    table = outputs_of(nb, "study.comparison_table(results)")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "%" in line]
    assert [r.split("|")[1].strip().rstrip(" *") for r in rows] == list(study.RUNS)
    assert sum("*" in r.split("|")[1] for r in rows) == 1

    for run in study.RUNS:
        assert (tmp_path / "models" / f"{study.RUNS[run].stem}.pt").stat().st_size > 0
    assert (tmp_path / "models" / "best.pt").stat().st_size > 0
    found = next(c for c in nb.cells if c.cell_type == "code" and "study.findings(results)" in c.source).outputs
    markdown = found[0]["data"]["text/markdown"]
    assert markdown.startswith("- Best by validation top-1") and "\n\n**In short:** " in markdown
    assert "nan" not in markdown and "{" not in markdown  # every run trained, every figure filled in
    assert sorted(p.name for p in (tmp_path / "data" / "numpy_bitmap").glob("*.npy")) == sorted(f"{c}.npy" for c in SMALL)


def test_config_from_env_overrides_and_names_bad_values():
    config = study.StudyConfig.from_env({"QD_CATEGORIES": "alarm clock, dog", "QD_MAX_PER_CLASS": "all",
                                         "QD_EPOCHS": "2", "QD_MODELS": "V1,V2-XL", "QD_DATA_DIR": "/tmp/x"})
    assert config.categories == ["alarm clock", "dog"]
    assert config.max_per_class is None and config.epochs == 2 and config.data_dir == "/tmp/x"
    assert config.models == ["V1", "V2-XL"]
    assert config.overrides["epochs"] == "QD_EPOCHS"
    assert study.StudyConfig.from_env({"QD_PROGRESS": "off", "QD_THREADS": "1"}).train_config("V1").progress is False
    assert "epochs: 2   <- QD_EPOCHS" in config.describe()
    assert "max_per_class: all   <- QD_MAX_PER_CLASS" in config.describe()
    default = study.StudyConfig.from_env({})
    assert default.categories == study.ORIGINAL_CATEGORIES and default.epochs is None
    with pytest.raises(ValueError, match="QD_EPOCHS='0'"):
        study.StudyConfig.from_env({"QD_EPOCHS": "0"})
    with pytest.raises(ValueError, match="QD_MAX_PER_CLASS='many'"):
        study.StudyConfig.from_env({"QD_MAX_PER_CLASS": "many"})
    with pytest.raises(ValueError, match="QD_PROGRESS='maybe': expected 1 or 0"):
        study.StudyConfig.from_env({"QD_PROGRESS": "maybe"})
    with pytest.raises(ValueError, match="V3"):
        study.StudyConfig.from_env({"QD_MODELS": "V1,V3"})
    with pytest.raises(ValueError, match="QD_CATEGORIES='dog,alarm_clock'.*did you mean 'alarm clock'"):
        study.StudyConfig.from_env({"QD_CATEGORIES": "dog,alarm_clock"})


def test_from_env_takes_the_notebook_values_as_defaults():
    config = study.StudyConfig.from_env({"QD_SEED": "3"}, categories=["dog"], seed=1, epochs=2)
    assert (config.categories, config.seed, config.epochs) == (["dog"], 3, 2)
    assert config.overrides == {"seed": "QD_SEED"}
    assert "seed: 3   <- QD_SEED" in config.describe() and "epochs: 2\n" in config.describe()


def test_device_is_checked_when_configured():
    with pytest.raises(ValueError, match="QD_DEVICE='gpu': unknown device 'gpu'"):
        study.StudyConfig.from_env({"QD_DEVICE": "gpu"})
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        study.StudyConfig(device="gpu")
    assert study.StudyConfig.from_env({"QD_DEVICE": "cpu"}).device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: cuda is available")
def test_unavailable_device_is_an_early_error():
    with pytest.raises(ValueError, match="QD_DEVICE='cuda': device 'cuda' cannot be used on this machine"):
        study.StudyConfig.from_env({"QD_DEVICE": "cuda"})


def test_paths_are_shown_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "numpy_bitmap").mkdir(parents=True)
    np.save(tmp_path / "data" / "numpy_bitmap" / "dog.npy", np.zeros((3, 784), np.uint8))
    (tmp_path / "mirror").mkdir()
    config = study.StudyConfig(categories=["dog"], data_dir="data", base_url="mirror")
    assert "base_url: mirror\n" in config.describe()
    summary = study.summary_on_disk(config, {"dog": Fetched(Path("data/numpy_bitmap/dog.npy"), 3, 2480, True)})
    assert summary.splitlines()[0].endswith("(3 used)  0.0 MB fetched")
    assert summary.splitlines()[-1].endswith("in data  0.0 MB fetched")
    assert str(tmp_path) not in config.describe() + summary
    cached = study.summary_on_disk(config, {"dog": Fetched(Path("data/numpy_bitmap/dog.npy"), 3, 0, True)})
    assert cached.splitlines()[0].endswith("(3 used)  cached")


def test_train_config_applies_study_overrides_to_recipes():
    config = study.StudyConfig(categories=["dog"], epochs=1, seed=3, device="cpu")
    tc = config.train_config("V2-XL")
    assert (tc.model, tc.augment, tc.epochs, tc.seed, tc.device) == ("v2", "xl", 1, 3, "cpu")
    assert tc.batch_size == study.RUNS["V2-XL"].settings["batch_size"]
    assert study.StudyConfig(categories=["dog"]).train_config("V1").epochs == study.RUNS["V1"].settings["epochs"]


def scores(top1):
    return dict(top1=top1, top3=min(1, top1 + 0.1), map3=top1 + 0.05, n=100)


def fake_result(name, val, test, seconds=10.0, epochs=3, stopped="completed"):
    return dict(name=name, params=1234, train_seconds=seconds, images_per_s=5000.0 / seconds, epochs=epochs,
                planned_epochs=3, stopped=stopped, best_epoch=epochs, val=scores(val), test=scores(test),
                classes=["a", "b"], per_class=[0.9, 0.6], confusion=[[9, 1], [4, 6]])


def test_best_is_chosen_by_validation_and_reported():
    results = [fake_result("V1", val=0.80, test=0.90), fake_result("V2", val=0.85, test=0.70, seconds=20)]
    assert study.best_result(results)["name"] == "V2"
    table = str(study.comparison_table(results))
    lines = table.splitlines()
    assert lines[0].startswith("| model") and "test top-1" in lines[0]
    assert lines[2].startswith("| V1 ") and "90.00%" in lines[2] and "1,234" in lines[2]
    assert lines[3].startswith("| V2 *")
    found = study.findings(results)
    assert (found.best, found.params, found.n_classes, found.test["top1"]) == ("V2", 1234, 2, 0.70)
    v2 = found.gains["V2 vs V1"]
    assert (v2.baseline_top1, v2.top1) == (0.90, 0.70)
    assert v2.points == pytest.approx(-20.0) and v2.time_ratio == pytest.approx(2.0)
    assert found.gains["best vs V2"].points == 0 and found.gains["best vs V2"].time_ratio == 1
    assert np.isnan(found.gains["V2-XL vs V2"].points)  # V2-XL was not trained
    assert (found.fastest, found.fastest_images_per_s) == ("V1", 500.0)
    assert (found.hardest, found.hardest_accuracy) == ("b", 0.6)
    assert found.confused[:2] == ("b", "a") and found.confused[2] == pytest.approx(0.4)  # 4 of b's 10 taken for a
    assert found.val_test_gap == pytest.approx(15.0)
    with pytest.raises(ValueError, match="no run was trained"):
        study.findings([])


def test_gains_weigh_test_points_against_training_time():
    results = [fake_result("V2", val=0.80, test=0.80), fake_result("V2-XL", val=0.81, test=0.805, seconds=50),
               fake_result("QuickDrawNet", val=0.90, test=0.85, seconds=30)]
    found = study.findings(results)
    xl, net, best = found.gains["V2-XL vs V2"], found.gains["QuickDrawNet vs V2"], found.gains["best vs V2"]
    assert (xl.points, xl.time_ratio) == (pytest.approx(0.5), pytest.approx(5.0))
    assert (net.points, net.time_ratio) == (pytest.approx(5.0), pytest.approx(3.0))
    assert found.best == "QuickDrawNet" and best == net


def test_budget_and_precision_are_shown():
    sized = fake_result("QuickDrawNet", 0.9, 0.9, epochs=7, seconds=600)
    sized.update(fit_seconds=840.0, budget=dict(minutes=14.5, epochs=7, max_epochs=30),
                 precision=dict(precision="bf16 NHWC", how="measured", bf16=True, channels_last=True,
                                images_per_s={"fp32 NCHW": 1000.0, "bf16 NHWC": 2500.0}))
    forced = fake_result("V2", val=0.8, test=0.8)
    forced["precision"] = dict(precision="fp32 NCHW", how="forced", bf16=False, channels_last=False, images_per_s={})
    capped = fake_result("V1", 0.7, 0.7, epochs=2, stopped="time_budget")  # an older run stopped by its cap
    rows = [[c.strip() for c in line.split("|")] for line in
            str(study.comparison_table([forced, sized, capped])).splitlines()]
    assert rows[0][5:7] == ["precision", "epochs"]
    assert rows[2][5:7] == ["fp32 NCHW (set)", "3"]
    assert rows[3][5:7] == ["bf16 NHWC (timed)", "7 of 30, sized to 14.5 min"]
    assert rows[4][5:7] == ["fp32 NCHW", "2 of 3 (time cap)"]
    found = study.findings([forced, sized, capped])
    assert found.budgets == {"QuickDrawNet": dict(minutes=14.5, epochs=7, max_epochs=30, fit_minutes=14.0)}
    assert found.precisions == {"QuickDrawNet": dict(chosen="bf16 NHWC",
                                                     images_per_s={"fp32 NCHW": 1000.0, "bf16 NHWC": 2500.0})}
    assert found.stops == {"V1": dict(epochs=2, planned_epochs=3, why="time cap", best_epoch=2)}


def test_history_table_marks_the_kept_epoch():
    history = dict(train_loss=[1.0, 0.5], train_acc=[0.5, 0.8], val_loss=[0.9, 0.95], val_acc=[0.6, 0.7],
                   epoch_seconds=[1.25, 1.0], best_epoch=1)
    lines = str(study.history_table(history)).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| epoch")
    assert lines[2].startswith("| 1 *") and "60.00%" in lines[2] and "0.9000" in lines[2]
    assert "*" not in lines[3] and "0.9500" in lines[3]


def test_every_setting_has_an_environment_variable_and_help():
    fields = [f for f in dataclasses.fields(study.StudyConfig) if f.name != "overrides"]
    assert [f.name for f in study.settings()] == [f.name for f in fields]
    variables = [f.metadata["env"] for f in fields]
    assert len(set(variables)) == len(variables) and all(v.startswith(("QD_", "QUICKDRAW_")) for v in variables)
    assert all(f.metadata["help"] for f in fields)
    table = str(study.settings_table())
    assert all(f"| {v} " in table for v in variables)
    assert "| QD_SEED            | seed          | 1 " in table  # the committed notebook run's seed


def as_env(value, none_word) -> str:
    """How a user writes `value` in the environment."""
    if value is None:
        return none_word
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return ", ".join(value)
    return str(value)


@pytest.mark.parametrize("name, value", [
    ("categories", ["alarm clock", "dog"]), ("max_per_class", 250), ("max_per_class", None), ("epochs", 3),
    ("epochs", None), ("seed", -7), ("device", "cpu"), ("models", ["V1", "V2-XL"]), ("data_dir", "/tmp/d x"),
    ("base_url", "http://127.0.0.1:9/q/"), ("threads", None), ("progress", False), ("progress", True), ("workers", 2),
])
def test_settings_round_trip_through_the_environment(name, value):
    f = next(f for f in study.settings() if f.name == name)
    raw = as_env(value, f.metadata["none"])
    assert study.parse_setting(f, raw) == value
    config = study.StudyConfig.from_env({f.metadata["env"]: raw})
    assert getattr(config, name) == value and config.overrides == {name: f.metadata["env"]}


def test_a_bad_setting_from_the_environment_names_its_variable():
    with pytest.raises(ValueError, match="QD_WORKERS='0': workers must be a positive integer"):
        study.StudyConfig.from_env({"QD_WORKERS": "0"})
    with pytest.raises(ValueError, match="QD_SEED='one': expected an integer"):
        study.StudyConfig.from_env({"QD_SEED": "one"})
