"""Training across processes with torchrun: a 2-rank run on a tiny generated pack (gloo, one thread each), its
scores against one process's, which rank writes, a restart from the last checkpoint, a stuck rank failing on
the collective timeout; and the helpers."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from utils import distributed
from utils.data import QuickDrawSet
from utils.download import bitmap_path
from utils.metrics import evaluate_model
from utils.pack import PackedSet, pack
from utils.train import TrainConfig, batches_per_epoch, epoch_batches, history_path, last_path, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["square", "circle", "line"]
ROWS = 400  # per class: a pack of 1,200 drawings
RUN_SECONDS = 60  # a 2-rank run of the tiny pack takes about 12 s on 2 busy cores; past this it has failed
# What torchrun sets for its workers: a test run itself under a launcher must not hand its own to the runs.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
               "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Run by torchrun in each rank: records every file a rank writes (all go through utils.io.atomic_write), can
# kill rank 1 during an epoch of the first attempt, then runs the command itself.
PROBE = textwrap.dedent("""
    import os, signal, sys
    from contextlib import contextmanager
    import utils.checkpoint, utils.io, utils.train

    rank, attempt = os.environ["RANK"], int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = sys.argv[1]
    real_write, real_epoch = utils.io.atomic_write, utils.train.train_one_epoch

    @contextmanager
    def logged_write(path, *a, **k):
        with open(log, "a") as f:
            f.write(f"write {rank} {os.path.basename(path)}\\n")
        with real_write(path, *a, **k) as out:
            yield out

    epochs = []

    def epoch(*a, **k):
        epochs.append(1)
        with open(log, "a") as f:
            f.write(f"epoch {rank} {attempt}\\n")
        kill_at = int(os.environ.get("KILL_RANK1_IN_EPOCH", "0"))
        if rank == "1" and attempt == 0 and len(epochs) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_epoch(*a, **k)

    utils.io.atomic_write = utils.checkpoint.atomic_write = logged_write
    utils.train.train_one_epoch = epoch
    result = utils.train.main(sys.argv[2:])
    if result["distributed"]["rank"] == 0:
        import json
        print(json.dumps(result))
""")


def shapes(n: int, kind: int, seed: int) -> np.ndarray:
    """(n, 784) uint8 drawings of one learnable kind, random size and place: 0 a square outline, 1 a filled
    square, 2 a horizontal bar."""
    rng = np.random.default_rng([seed, kind])
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        side = int(rng.integers(8, 16))
        r, c = rng.integers(0, 28 - side, 2)
        if kind == 2:
            out[i, r + side // 2 - 1:r + side // 2 + 2, c:c + side] = 255
            continue
        out[i, r:r + side, c:c + side] = 255
        if kind == 0:
            out[i, r + 2:r + side - 2, c + 2:c + side - 2] = 0
    return out.reshape(n, 784)


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    for kind, name in enumerate(NAMES):
        path = bitmap_path(root / "data", name)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, shapes(ROWS, kind, seed=0))
    return pack(NAMES, root / "data", root / "pack", progress=False)


def torchrun(script: Path, args: list[str], nproc: int = 2, env: dict | None = None, max_restarts: int = 0,
             timeout: float = RUN_SECONDS) -> subprocess.CompletedProcess:
    """`torchrun --standalone script args` with one thread per rank, this checkout's utils, no launcher variables
    of this process, and a deadline."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", str(script), *args]
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("TORCHELASTIC_")}
    return run_group(cmd, dict(inherited, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {})), timeout)


def train_under_probe(tmp_path: Path, args: list[str], **kw) -> tuple[subprocess.CompletedProcess, list[str]]:
    """torchrun with the probe around `python -m utils.train args`: (process, the probe's log)."""
    probe, log = tmp_path / "probe.py", tmp_path / "probe.log"
    probe.write_text(PROBE)
    log.write_text("")
    return torchrun(probe, [str(log), *args], **kw), log.read_text().splitlines()


def run_group(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run cmd in its own session; past `timeout` s the test fails with its output. torchrun starts each worker
    in a session of its own, so it is stopped with SIGTERM, on which it stops its workers, and killed after."""
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(cmd[:7])} ... still running after {timeout} s; stdout:\n{out[-3000:]}\n"
                        f"stderr:\n{err[-6000:]}")
        finally:
            stop(proc)  # also when the test is interrupted
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stop(proc: subprocess.Popen, grace: float = 40) -> None:
    """SIGTERM to torchrun (it stops its workers, waiting up to 30 s for them), SIGKILL after `grace` s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def train_args(pack_path: Path, out: Path, epochs: int) -> list[str]:
    return ["--model", "v1", "--packed", str(pack_path), "--epochs", str(epochs), "--batch-size", "16", "--lr", "3e-3",
            "--out", str(out), "--no-progress", "--num-threads", "1", "--device", "cpu", "--no-bf16",
            "--no-channels-last", "--dist-timeout", "30"]


def counts(scores: dict) -> dict:
    """Top-k hit counts (the scores are fractions of n, kept as float32 by utils.metrics)."""
    return {k: round(scores[k] * scores["n"]) for k in ("top1", "top3", "top5")}


def result_line(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # one JSON line for the run, from rank 0
    return json.loads(lines[0])


def test_two_ranks_train_one_model_score_as_one_process_and_only_rank_0_writes(tiny_pack, tmp_path):
    out = tmp_path / "m" / "v1.pt"
    done, log = train_under_probe(tmp_path, train_args(tiny_pack, out, epochs=4))
    result = result_line(done)
    assert result["distributed"] == dict(world_size=2, global_batch=32, lr=pytest.approx(3e-3 * 2 ** 0.5),
                                         backend="gloo", rank=0, resumed=False)
    writers = {line.split()[1] for line in log if line.startswith("write")}
    written = {line.split()[2] for line in log if line.startswith("write")}
    assert writers == {"0"} and written == {"v1.pt", "v1.last.pt", "v1.history.json"}
    assert sum(line.startswith("epoch 1") for line in log) == 4  # rank 1 trained every epoch, wrote nothing

    history = json.loads(history_path(out).read_text())
    ps = PackedSet.open(tiny_pack)
    assert history["train_images"] == 4 * len(ps.train)  # each rank half of every epoch
    assert history["data"]["packed"] == str(tiny_pack.resolve()) and history["data"]["seed"] == 0
    assert result["val"]["top1"] > 0.8  # it learned the three shapes

    # The scores gathered from both ranks are one process's over the whole split, count for count.
    model, ckpt = load_checkpoint(out)
    for name in ("val", "test"):
        single = evaluate_model(model, ps.splits[name].load(), batch_size=1024)
        assert ckpt["metrics"][name] == result[name]
        assert result[name]["n"] == single["n"] == len(ps.splits[name])
        assert counts(result[name]) == counts(single)


def test_gathered_confusion_counts_equal_one_process(tiny_pack, tmp_path):
    """score_split in 2 ranks (each its shard, tallies summed) against evaluate_model in this process."""
    torch.manual_seed(0)
    from utils.models import build_model
    model = build_model("v1", len(NAMES))
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    script = tmp_path / "score.py"
    script.write_text(textwrap.dedent(f"""
        import json, torch
        from utils import distributed
        from utils.models import build_model
        from utils.pack import PackedSet
        from utils.train import score_split
        group = distributed.init("cpu")
        model = build_model("v1", {len(NAMES)})
        model.load_state_dict(torch.load({str(weights)!r}))
        scores = score_split(model, PackedSet.open({str(tiny_pack)!r}).test, group.device, batch_size=50, group=group)
        if group.main:
            open({str(tmp_path / "scores.json")!r}, "w").write(json.dumps(scores))
        distributed.teardown()
    """))
    done = torchrun(script, [])
    assert done.returncode == 0, done.stderr[-3000:]
    gathered = json.loads((tmp_path / "scores.json").read_text())
    single = evaluate_model(model, PackedSet.open(tiny_pack).test.load(), batch_size=1024)
    assert gathered["confusion"] == single["confusion"] and gathered["n"] == single["n"] == 120
    assert counts(gathered) == counts(single)


def test_a_killed_rank_restarts_the_run_from_its_last_checkpoint(tiny_pack, tmp_path):
    out = tmp_path / "m" / "v1.pt"
    done, log = train_under_probe(tmp_path, train_args(tiny_pack, out, epochs=4), max_restarts=1,
                                  env={"KILL_RANK1_IN_EPOCH": "3"}, timeout=1.5 * RUN_SECONDS)  # two attempts
    result = result_line(done)
    assert result["distributed"]["resumed"] is True and result["epochs"] == 4
    # first attempt: epochs 1-2 saved, killed in the third; second attempt: epochs 3 and 4 only, on both ranks
    assert sorted(line for line in log if line.startswith("epoch")) == sorted(
        ["epoch 0 0"] * 3 + ["epoch 1 0"] * 3 + ["epoch 0 1"] * 2 + ["epoch 1 1"] * 2)
    history = json.loads(history_path(out).read_text())
    assert len(history["train_loss"]) == 4 and last_path(out).is_file()


def test_a_late_rank_joins_and_a_stuck_one_fails_the_run_on_the_collective_timeout(tmp_path):
    """Rank 1 starts after more than the collective timeout (the join waits for it), then stops answering: rank 0's
    next sum fails within the timeout, naming itself and the sum, and torchrun stops the run."""
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent("""
        import os, time, torch
        from datetime import timedelta
        from utils import distributed
        if os.environ["RANK"] == "1":
            time.sleep(5)
        group = distributed.init("cpu", timeout=timedelta(seconds=3))
        try:
            total = distributed.sum_all({"rank": torch.tensor(group.rank)}, group)["rank"]
            print(f"joined {group.rank} {int(total)}", flush=True)
            if group.rank == 1:
                time.sleep(600)
            t0 = time.monotonic()
            try:
                distributed.sum_all({"x": torch.ones(3)}, group)
            finally:
                print(f"gave up after {time.monotonic() - t0:.1f} s", flush=True)
        finally:
            distributed.teardown()
    """))
    t0 = time.monotonic()
    done = torchrun(script, [])
    assert done.returncode != 0
    # the ranks share torchrun's stdout, so their lines may interleave
    assert sorted(re.findall(r"joined (\d) (\d)", done.stdout)) == [("0", "1"), ("1", "1")]
    waited = float(re.search(r"gave up after ([\d.]+) s", done.stdout)[1])
    assert 2.5 <= waited < 20  # the 3 s timeout, not forever
    assert "rank 0 of 2: sum of x failed" in done.stderr and "Timed out" in done.stderr
    assert time.monotonic() - t0 < RUN_SECONDS


def test_rank_0s_result_or_its_error_reaches_every_rank(tmp_path):
    """on_rank0: rank 0's value on every rank; its error raised on every rank at once, not after a timeout."""
    script = tmp_path / "rank0.py"
    script.write_text(textwrap.dedent("""
        import time
        from datetime import timedelta
        from utils import distributed
        group = distributed.init("cpu", timeout=timedelta(seconds=60))
        try:
            got = distributed.on_rank0(lambda: 40 + 2 if group.main else 0, group)
            print(f"rank {group.rank} got {got}", flush=True)
            t0 = time.monotonic()
            try:
                distributed.on_rank0(lambda: 1 / 0 if group.main else 1, group)
            except ZeroDivisionError as error:
                print(f"rank {group.rank} raised {error} after {time.monotonic() - t0:.1f} s", flush=True)
        finally:
            distributed.teardown()
    """))
    done = torchrun(script, [])
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(re.findall(r"rank (\d) got (\d+)", done.stdout)) == [("0", "42"), ("1", "42")]
    raised = re.findall(r"rank (\d) raised division by zero after ([\d.]+) s", done.stdout)
    assert sorted(r for r, _ in raised) == ["0", "1"] and all(float(s) < 20 for _, s in raised)


# ------------------------------------------------------------------------------------------- helpers

def test_every_rank_sums_its_dtypes_in_the_same_order(monkeypatch):
    """One all-reduce per dtype, in the order the dtypes first appear in the sorted keys: not a set's order, which
    follows the dtypes' addresses and so differs between processes (the ranks then wait on each other)."""
    dtypes = [torch.float64, torch.int64, torch.float32, torch.int32, torch.int16, torch.float16, torch.bfloat16,
              torch.uint8]
    values = {f"{name}{i}": torch.full((i + 1,), i, dtype=d) for i, d in enumerate(dtypes) for name in "ba"}
    reduced = []
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t: reduced.append(t.dtype))  # a group of one's sum
    for order in (values, dict(reversed(values.items()))):
        reduced.clear()
        sums = distributed.sum_all(order, distributed.Group(0, 2))
        assert reduced == dtypes
        assert all(torch.equal(sums[k], v) for k, v in values.items())

def test_each_rank_reads_a_disjoint_equal_share_of_every_epoch(tiny_pack):
    n = 203
    mem = QuickDrawSet(torch.zeros(n, 28, 28, dtype=torch.uint8), torch.arange(n), [str(i) for i in range(n)])
    config = TrainConfig(model="v1", batch_size=16, seed=3, progress=False)
    orders = []
    for epoch in (0, 1):
        shares = [torch.cat([y for _, y in epoch_batches(mem, config, epoch, distributed.Group(rank, 2))])
                  for rank in (0, 1)]  # labels are the drawings' numbers
        assert len(shares[0]) == len(shares[1]) == n // 2
        assert not set(shares[0].tolist()) & set(shares[1].tolist())
        orders.append(torch.cat(shares))
    assert not torch.equal(orders[0], orders[1])  # reshuffled every epoch
    one = torch.cat([y for _, y in epoch_batches(mem, config, 0, distributed.Group())])
    assert sorted(one.tolist()) == list(range(n))  # one process: the whole split
    ps = PackedSet.open(tiny_pack)
    for rank in (0, 1):
        group = distributed.Group(rank, 2)
        batches = list(epoch_batches(ps.train, config, 0, group))
        assert len(batches) == batches_per_epoch(ps.train, 16, group) == len(ps.train) // 2 // 16
        assert sum(len(y) for _, y in batches) == len(ps.train) // 2


def test_learning_rate_scales_with_the_global_batch():
    assert distributed.scale_lr(0.1, "sgd", 1024, 256) == pytest.approx(0.4)  # linear
    assert distributed.scale_lr(1e-3, "adamw", 1024, 256) == pytest.approx(2e-3)  # square root
    assert distributed.scale_lr(1e-3, "adam", 256, 256) == 1e-3


def test_one_process_is_a_group_of_one_and_sums_are_its_own():
    group = distributed.init("cpu") if not distributed.launched() else None
    assert group == distributed.Group() and group.main and not group.active
    assert distributed.share({"a": 1}, group) == {"a": 1}
    sums = distributed.sum_all(dict(n=torch.tensor(3), x=torch.ones(2, dtype=torch.float64)), group)
    assert sums["n"] == 3 and torch.equal(sums["x"], torch.ones(2, dtype=torch.float64))


def test_xl_is_refused_for_a_pack_with_the_alternative_named(tiny_pack):
    from utils.models import build_model
    from utils.train import fit
    ps = PackedSet.open(tiny_pack)
    with pytest.raises(ValueError, match="--augment online"):
        fit(build_model("v1", 3), ps.train, ps.val, TrainConfig(model="v1", augment="xl", progress=False))


def test_scores_from_memory_and_from_the_pack_agree(tiny_pack):
    from utils.models import build_model
    from utils.train import score_split
    torch.manual_seed(0)
    model = build_model("v1", 3)
    ps = PackedSet.open(tiny_pack)
    packed = score_split(model, ps.val, torch.device("cpu"), batch_size=64)
    mem = score_split(model, ps.val.load(), torch.device("cpu"), batch_size=64)
    single = evaluate_model(model, ps.val.load())
    assert packed["confusion"] == mem["confusion"] == single["confusion"]
    assert packed["top3"] == single["top3"] and packed["map3"] == pytest.approx(single["map3"])


def test_a_resume_from_other_data_is_refused_and_a_moved_pack_is_not(tmp_path):
    from utils.models import build_model
    from utils.train import fit
    images = torch.from_numpy(np.concatenate([shapes(40, k, seed=1) for k in range(3)])).view(-1, 28, 28)
    data = QuickDrawSet(images, torch.arange(120) // 40, NAMES)
    config = TrainConfig(model="v1", epochs=1, batch_size=16, progress=False, num_threads=1, bf16=False,
                         channels_last=False)
    source = dict(packed="/a/pack", seed=0, manifest_sha256="ab" * 32)
    out = tmp_path / "m.pt"
    fit(build_model("v1", 3), data, data, config, out=out, source=source)
    moved = fit(build_model("v1", 3), data, data, config, out=out, resume=True, source=dict(source, packed="/b/pack"))
    assert moved["data"] == source  # the run as saved: finished, nothing trained
    with pytest.raises(ValueError, match="from other data"):
        fit(build_model("v1", 3), data, data, config, out=out, resume=True,
            source=dict(source, manifest_sha256="cd" * 32))


def test_the_command_names_flags_a_pack_fixes(tiny_pack, capsys):
    from utils.train import parse_args
    for argv, named in ((["--packed", str(tiny_pack), "--max-per-class", "10"], "--max-per-class"),
                        (["--packed", str(tiny_pack), "--categories", "cat"], "not both"), ([], "--packed"),
                        (["--packed", str(tiny_pack), "--dist-timeout", "0"], "--dist-timeout")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert named in capsys.readouterr().err
