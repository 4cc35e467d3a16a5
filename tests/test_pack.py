"""utils.pack: the packed set's split, order, resumable writing, damage detection, and its readers."""
import errno
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from utils import pack as P
from utils.data import load_bitmaps, stratified_split
from utils.download import bitmap_path
from utils.pack import (DamagedPackError, IncompletePackError, PackedSet, PackError, SourceChangedError, pack,
                        shard)

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["cat", "dog", "apple", "banana", "fish"]
ROWS = [700, 400, 1000, 250, 520]


def make_bitmaps(root: Path, names=NAMES, rows=ROWS, seed=0) -> Path:
    """<root>/numpy_bitmap/<name>.npy of random drawings, different in every file."""
    for c, (name, n) in enumerate(zip(names, rows)):
        path = bitmap_path(root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.random.default_rng([seed, c]).integers(0, 256, (n, 784), dtype=np.uint8))
    return root


@pytest.fixture
def data(tmp_path):
    return make_bitmaps(tmp_path / "data")


def chi2_rejects(labels: torch.Tensor, shares: torch.Tensor, alpha=0.01) -> bool:
    """Whether a chi-square test of one batch's label counts against the class shares rejects at alpha."""
    expected = shares * len(labels)
    observed = torch.bincount(labels, minlength=len(shares)).double()
    stat = ((observed - expected) ** 2 / expected).sum()
    p = torch.special.gammaincc(torch.tensor((len(shares) - 1) / 2, dtype=torch.float64), stat / 2)
    return bool(p < alpha)


# ------------------------------------------------------------------------------------------ content

@pytest.mark.filterwarnings("ignore:max_per_class=")
@pytest.mark.parametrize("max_per_class,seed", [(None, 0), (600, 3), (300, 11)])
def test_split_members_and_rows_are_stratified_splits(data, tmp_path, max_per_class, seed):
    out = pack(NAMES, data, tmp_path / "p", max_per_class, seed, chunk_rows=333, progress=False)
    ps = PackedSet.open(out, verify=True)
    ds = load_bitmaps(NAMES, data, max_per_class)
    for split, expected in zip(P.SPLITS, stratified_split(ds.labels, seed=seed)):
        part = ps.splits[split]
        index = torch.from_numpy(np.array(part.index))
        assert torch.equal(index.sort().values, expected)  # same members
        assert not torch.equal(index, expected)  # stored shuffled, not in file order
        assert torch.equal(torch.from_numpy(np.array(part.images)).view(-1, 28, 28), ds.images[index])
        assert torch.equal(torch.from_numpy(np.array(part.labels)).long(), ds.labels[index])
        assert torch.equal(part.counts(), torch.bincount(ds.labels[expected], minlength=len(NAMES)))
    assert ps.classes == NAMES
    assert ps.manifest["rows"] == {s: len(i) for s, i in zip(P.SPLITS, stratified_split(ds.labels, seed=seed))}


def test_same_result_whatever_the_chunk_size(data, tmp_path):
    a = PackedSet.open(pack(NAMES, data, tmp_path / "a", chunk_rows=64, progress=False))
    b = PackedSet.open(pack(NAMES, data, tmp_path / "b", chunk_rows=10_000, progress=False))
    assert a.manifest["files"] == b.manifest["files"]  # byte for byte (SHA-256 of every file)


def test_stored_order_and_batches_are_class_mixed(data, tmp_path):
    ps = PackedSet.open(pack(NAMES, data, tmp_path / "p", progress=False))
    train = ps.train
    shares = train.counts().double() / len(train)
    batches = [y for epoch in range(6) for _, y in train.batches(64, epoch=epoch, block_rows=256, buffer_blocks=2,
                                                                 drop_last=True)]
    assert len(batches) >= 200
    rejected = sum(chi2_rejects(y, shares) for y in batches)
    assert rejected <= 0.03 * len(batches) + 1, f"{rejected} of {len(batches)} batches are not class-mixed"
    # The same test catches batches read in file order (one class at a time).
    grouped = torch.sort(torch.from_numpy(np.array(train.labels)).long()).values.split(64)[:-1]
    assert sum(chi2_rejects(y, shares) for y in grouped) > 0.9 * len(grouped)


def test_batches_cover_the_epoch_and_differ_between_epochs(data, tmp_path):
    ps = PackedSet.open(pack(NAMES, data, tmp_path / "p", progress=False))
    train, index = ps.train, torch.from_numpy(np.array(ps.train.index))
    pixels_to_row = {bytes(row): i for i, row in enumerate(np.array(train.images))}

    def epoch_rows(epoch, seed=0):
        rows = []
        for x, y in train.batches(50, epoch=epoch, seed=seed, block_rows=128, buffer_blocks=3):
            assert x.dtype == torch.uint8 and x.shape[1:] == (28, 28) and y.dtype == torch.int64
            got = [pixels_to_row[bytes(r)] for r in x.reshape(len(x), -1).numpy()]
            assert torch.equal(y, torch.from_numpy(np.array(train.labels)[got]).long())  # labels follow rows
            rows += got
        return rows

    first = epoch_rows(0)
    assert sorted(first) == list(range(len(train)))  # every row once
    assert len(first) == sum(1 for _ in train.batches(50, block_rows=128, buffer_blocks=3)) * 50 - \
        (-len(train)) % 50
    assert epoch_rows(0) == first  # reproducible
    assert epoch_rows(1) != first and epoch_rows(0, seed=1) != first
    assert index.numel() == len(train)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_equal_and_cover_all_but_the_remainder(data, tmp_path, world_size):
    ps = PackedSet.open(pack(NAMES, data, tmp_path / "p", progress=False))
    train = ps.train
    pixels_to_row = {bytes(row): i for i, row in enumerate(np.array(train.images))}
    for epoch in range(2):
        shares, counts = [], []
        for rank in range(world_size):
            batches = list(train.batches(32, epoch=epoch, rank=rank, world_size=world_size, block_rows=100,
                                         buffer_blocks=2))
            counts.append(len(batches))
            shares.append({pixels_to_row[bytes(r)] for x, _ in batches for r in x.reshape(len(x), -1).numpy()})
            assert len(shares[-1]) == len(train) // world_size
        assert counts == [train.num_batches(32, world_size)] * world_size  # equal: DDP does not wait forever
        assert all(not (a & b) for i, a in enumerate(shares) for b in shares[i + 1:])
        assert len(set().union(*shares)) == len(train) - len(train) % world_size


def test_ordered_shards_put_together_are_the_whole_split(data, tmp_path):
    ps = PackedSet.open(pack(NAMES, data, tmp_path / "p", progress=False))
    for part in ps.splits.values():
        whole = torch.cat([x for x, _ in part.ordered(batch_size=7, block_rows=20)])
        assert torch.equal(whole.view(len(part), -1), torch.from_numpy(np.array(part.images)))
        for world_size in (2, 3):
            pieces = [torch.cat([y for _, y in part.ordered(16, rank, world_size, block_rows=40)])
                      for rank in range(world_size)]
            assert torch.equal(torch.cat(pieces), torch.from_numpy(np.array(part.labels)).long())
            assert [len(p) for p in pieces] == [b - a for a, b in (shard(len(part), r, world_size)
                                                                   for r in range(world_size))]
    loaded = ps.val.load()
    assert torch.equal(loaded.labels, torch.from_numpy(np.array(ps.val.labels)).long()) and loaded.classes == NAMES


def test_device_batches_give_what_iterate_batches_gives(data, tmp_path):
    ps = PackedSet.open(pack(NAMES, data, tmp_path / "p", progress=False))
    x, y = next(P.device_batches(ps.test.ordered(8)))
    assert x.dtype == torch.float32 and x.shape == (8, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x.view(8, -1) * 255, torch.from_numpy(np.array(ps.test.images[:8])).float())
    assert torch.equal(y, torch.from_numpy(np.array(ps.test.labels[:8])).long())


# ------------------------------------------------------------------------------------------ reading paths

def plain_batches(split, batch_size, epoch=0, seed=0, rank=0, world_size=1, block_rows=P.BLOCK_ROWS,
                  buffer_blocks=P.BUFFER_BLOCKS, drop_last=False, direct=None):
    """What batches() is documented to give, from the split in memory, one step at a time: no threads, no
    buffers, no read ahead."""
    images, labels = np.array(split.images), np.array(split.labels).astype(np.int64)
    g = torch.Generator().manual_seed((seed * 10_007 + epoch) * 1_009 + rank)
    rest = np.empty(0, np.int64)
    for group in P.group_runs(split._epoch_runs(epoch, seed, rank, world_size, block_rows), buffer_blocks * block_rows):
        rows = np.concatenate([rest, *(np.arange(a, z) for a, z in group)])
        order = rows[torch.randperm(len(rows), generator=g).numpy()]
        full = len(order) - len(order) % batch_size
        for i in range(0, full, batch_size):
            yield images[order[i:i + batch_size]].reshape(-1, 28, 28), labels[order[i:i + batch_size]]
        rest = order[full:]
    if len(rest) and not drop_last:
        yield images[rest].reshape(-1, 28, 28), labels[rest]


def assert_same_batches(got, expected):
    got, expected = list(got), list(expected)
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert np.array_equal(x.numpy(), ex) and np.array_equal(y.numpy(), ey)


@pytest.fixture
def direct_ok(tmp_path):
    probe = tmp_path / "probe"
    probe.write_bytes(bytes(8192))
    fd = P._open_direct(probe)
    if fd is None:
        pytest.skip(f"{tmp_path} is on a file system without O_DIRECT; the direct reads cannot be checked here")
    os.close(fd)


@pytest.mark.parametrize("direct", [False, True])
def test_batches_are_the_plain_readers_row_for_row(data, tmp_path, direct, request):
    """Threads, aligned direct reads with gap rows, leftovers carried between buffers and read ahead of the
    next epoch change nothing: every epoch, rank and shape gives the plain reader's batches in its order."""
    if direct:
        request.getfixturevalue("direct_ok")
    train = PackedSet.open(pack(NAMES, data, tmp_path / "p", progress=False)).train
    assert train.reads_directly(direct) == direct
    cases = [dict(batch_size=50, block_rows=128, buffer_blocks=3),
             dict(batch_size=32, block_rows=100, buffer_blocks=2, world_size=3, rank=1, drop_last=True),
             dict(batch_size=7, block_rows=333, buffer_blocks=1, seed=4)]
    for case in cases:
        for epoch in range(3):  # in turn: each call takes over the read ahead of the one before
            assert_same_batches(train.batches(**case, epoch=epoch, direct=direct),
                                plain_batches(train, **case, epoch=epoch))
    # A call that is not the expected next one (another epoch, batch size or rank) does not take it over.
    assert_same_batches(train.batches(64, epoch=7, direct=direct), plain_batches(train, 64, epoch=7))
    assert_same_batches(train.batches(64, epoch=7, rank=1, world_size=2, direct=direct),
                        plain_batches(train, 64, epoch=7, rank=1, world_size=2))


@pytest.mark.parametrize("fault", ["no O_DIRECT", "EINVAL"])
def test_direct_reads_fall_back_to_the_cache_where_refused(data, tmp_path, monkeypatch, request, fault):
    """A file system without O_DIRECT, or one that refuses a direct read's alignment (EINVAL), still gives the
    plain reader's batches: the reads go through the page cache instead."""
    train = PackedSet.open(pack(NAMES, data, tmp_path / "p", progress=False)).train
    refused = []
    if fault == "no O_DIRECT":
        monkeypatch.setattr(P, "_open_direct", lambda path: refused.append(path) or None)
    else:
        request.getfixturevalue("direct_ok")  # a refusal needs a file system that grants O_DIRECT at all
        pread = P._pread_into

        def refuse_direct(fd, at, out, what, need=None):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
                refused.append(at)
                raise OSError(errno.EINVAL, "Invalid argument")
            return pread(fd, at, out, what, need)
        monkeypatch.setattr(P, "_pread_into", refuse_direct)
    case = dict(batch_size=50, block_rows=128, buffer_blocks=3)
    for epoch in range(2):
        assert_same_batches(train.batches(**case, epoch=epoch, direct=True), plain_batches(train, **case, epoch=epoch))
    assert refused  # the direct path was tried, and refused
    if fault == "EINVAL":  # once per call to batches(): after a refusal the rest read through the cache
        assert len(refused) <= 2 * P.DIRECT_READS
    train._reader[0].join(timeout=10)


def test_read_ahead_is_taken_over_and_an_abandoned_epoch_leaves_no_trace(data, tmp_path, monkeypatch):
    train = PackedSet.open(pack(NAMES, data, tmp_path / "p", progress=False)).train
    case = dict(batch_size=40, block_rows=120, buffer_blocks=2, direct=False)
    read = []  # bytes read from the images file
    pread = P._pread_into
    monkeypatch.setattr(P, "_pread_into", lambda fd, at, out, what, need=None: (
        read.append(need if what == train.paths["images"] else 0), pread(fd, at, out, what, need)))

    def first_group(epoch):
        return sum(z - a for a, z in P.group_runs(train._epoch_runs(epoch, 0, 0, 1, 120), 240)[0])

    list(train.batches(**case, epoch=0))
    train._reader[0].join()  # the read ahead runs on once the epoch is served
    assert sum(read) == (len(train) + first_group(1)) * P.ROW  # the epoch, then epoch 1's first buffer
    read.clear()
    assert_same_batches(train.batches(**case, epoch=1), plain_batches(train, **case, epoch=1))
    train._reader[0].join()
    assert sum(read) == (len(train) - first_group(1) + first_group(2)) * P.ROW  # its first buffer not read again
    for x, _ in train.batches(**case, epoch=2):  # stopped after one batch: the reader stops, nothing is left
        break
    assert_same_batches(train.batches(**case, epoch=3), plain_batches(train, **case, epoch=3))
    assert_same_batches(train.batches(**case, epoch=2), plain_batches(train, **case, epoch=2))
    train._reader[0].join(timeout=10)
    assert not [t for t in threading.enumerate() if t.name.startswith("pack-reader")]


@pytest.mark.parametrize("direct", [False, True])
def test_ordered_reads_the_same_either_way(data, tmp_path, direct, request):
    if direct:
        request.getfixturevalue("direct_ok")
    ps = PackedSet.open(pack(NAMES, data, tmp_path / "p", progress=False))
    for part in ps.splits.values():
        whole = torch.cat([x for x, _ in part.ordered(batch_size=7, block_rows=20, direct=direct)])
        assert torch.equal(whole.view(len(part), -1), torch.from_numpy(np.array(part.images)))
        labels = torch.cat([y for _, y in part.ordered(16, 1, 3, block_rows=40, direct=direct)])
        a, b = shard(len(part), 1, 3)
        assert torch.equal(labels, torch.from_numpy(np.array(part.labels[a:b])).long())


@pytest.mark.parametrize("offset", [128, 80, 4096 + 16])
def test_layout_aligns_every_read_and_no_read_touches_another_run(offset):
    rng = np.random.default_rng(offset)
    group = [(a, a + n) for a, n in zip(rng.integers(0, 10**6, 6), [1, 5, 300, 4096, 17, 1000])]
    for align in (512, 4096):
        segments, reads, rows = P.layout(group, 9, offset, align)
        assert rows * P.ROW >= max(pos + span for _, pos, span, _ in reads)
        taken = np.zeros(rows * P.ROW, bool)  # bytes some read writes
        for (a, z), (p, q), (at, pos, span, need) in zip(group, segments, reads):
            assert q - p == z - a and p >= 9
            assert at % align == pos % align == span % align == 0  # what O_DIRECT asks
            assert at <= offset + a * P.ROW < at + align and pos == p * P.ROW - (offset + a * P.ROW - at)
            assert need == offset + z * P.ROW - at <= span  # the run's last byte is read; the rest may be past EOF
            assert not taken[pos:pos + span].any()  # spans never overlap, so no read clobbers another run's rows
            taken[pos:pos + span] = True
        assert not taken[:9 * P.ROW].any()  # the leftover rows before head stay as they are
    segments, reads, rows = P.layout(group, 9, offset)
    assert segments[0][0] == 9 and all(b[0] == a[1] for a, b in zip(segments, segments[1:]))  # end to end
    assert rows == 9 + sum(z - a for a, z in group)
    with pytest.raises(ValueError, match="cannot be aligned"):
        P.layout(group, 0, 100, 4096)  # a header of 100 bytes: rows never fall on a 16-byte boundary



@pytest.mark.parametrize("version", [1, 2])
def test_cache_room_is_the_cgroup_limit_less_what_its_processes_hold(tmp_path, version):
    proc = tmp_path / "cgroup"
    if version == 1:
        proc.write_text("5:cpu,cpuacct:/x\n4:memory:/bench/a\n0::/\n")
        folder, limit = tmp_path / "memory" / "bench" / "a", "memory.limit_in_bytes"
        stat = "cache 900\nrss 1\ntotal_cache 7000\ntotal_rss 3000\ntotal_mapped_file 2000\n"
    else:
        proc.write_text("0::/bench/a\n")
        folder, limit = tmp_path / "bench" / "a", "memory.max"
        stat = "anon 3000\nfile 7000\nfile_mapped 2000\n"
    folder.mkdir(parents=True)
    (folder / limit).write_text("10000\n")
    (folder / "memory.stat").write_text(stat)
    assert P._cgroup_room(proc, tmp_path) == 10000 - 3000 - 2000  # cached pages that are not mapped count as room
    (folder / limit).write_text("max\n" if version == 2 else f"{2**63 - 4096}\n")
    assert P._cgroup_room(proc, tmp_path) is None  # no limit
    assert P._cgroup_room(tmp_path / "absent", tmp_path) is None


# ------------------------------------------------------------------------------------------ faults

class Interrupt(Exception):
    pass


def test_interrupted_pack_never_looks_finished_and_rerun_resumes(data, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "PROGRESS_EVERY", 4)
    clean = PackedSet.open(pack(NAMES, data, tmp_path / "clean", chunk_rows=100, progress=False))
    out = tmp_path / "p"

    def stop_at(k):
        if k == 17:
            raise Interrupt

    with pytest.raises(Interrupt):
        pack(NAMES, data, out, chunk_rows=100, progress=False, on_chunk=stop_at)
    assert not out.exists() and P.partial_dir(out).is_dir()
    with pytest.raises(IncompletePackError, match="interrupted pack.*rerun"):
        PackedSet.open(out)
    resumed = PackedSet.open(pack(NAMES, data, out, chunk_rows=100, progress=False), verify=True)
    assert resumed.manifest["seconds"]["resumed_at_chunk"] == 16  # from the last progress record
    assert resumed.manifest["files"] == clean.manifest["files"]
    assert not P.partial_dir(out).exists()


def test_killed_pack_process_reruns_to_the_same_pack(data, tmp_path):
    """SIGKILL in the middle (no cleanup at all), then the same command again."""
    out = tmp_path / "p"
    script = textwrap.dedent(f"""
        import os, signal
        from utils import pack as P
        P.PROGRESS_EVERY = 3
        def kill(k):
            if k == 10:
                os.kill(os.getpid(), signal.SIGKILL)
        P.pack({NAMES!r}, {str(data)!r}, {str(out)!r}, chunk_rows=120, progress=False, on_chunk=kill)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr.decode()
    assert not out.exists() and json.loads((P.partial_dir(out) / "progress.json").read_text())["chunks_done"] == 9
    with pytest.raises(IncompletePackError):
        PackedSet.open(out)
    rc = P.main(["--categories", *NAMES, "--data", str(data), "--out", str(out), "--no-download",
                 "--chunk-rows", "120", "--no-progress"])
    assert rc == 0
    resumed = PackedSet.open(out, verify=True)
    assert resumed.manifest["seconds"]["resumed_at_chunk"] == 9
    clean = PackedSet.open(pack(NAMES, data, tmp_path / "clean", chunk_rows=120, progress=False))
    assert resumed.manifest["files"] == clean.manifest["files"]


def test_source_changed_while_interrupted_restarts_from_scratch(data, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "PROGRESS_EVERY", 2)
    out = tmp_path / "p"
    with pytest.raises(Interrupt):
        pack(NAMES, data, out, chunk_rows=100, progress=False, on_chunk=lambda k: (_ for _ in ()).throw(Interrupt)
             if k == 9 else None)
    make_bitmaps(data, seed=1)  # every file rewritten with other drawings
    fresh = PackedSet.open(pack(NAMES, data, out, chunk_rows=100, progress=False), verify=True)
    assert fresh.manifest["seconds"]["resumed_at_chunk"] == 0
    ds = load_bitmaps(NAMES, data)
    index = torch.from_numpy(np.array(fresh.train.index))
    assert torch.equal(torch.from_numpy(np.array(fresh.train.images)).view(-1, 28, 28), ds.images[index])


@pytest.mark.parametrize("damage,error,match", [
    ("truncate", DamagedPackError, r"train\.images\.npy is truncated"),
    ("remove", DamagedPackError, r"val\.labels\.npy is missing"),
    ("manifest", IncompletePackError, "no manifest.json"),
])
def test_damaged_pack_is_named_on_open(data, tmp_path, damage, error, match):
    out = pack(NAMES, data, tmp_path / "p", progress=False)
    if damage == "truncate":
        f = out / "train.images.npy"
        os.truncate(f, f.stat().st_size - 784)
    elif damage == "remove":
        (out / "val.labels.npy").unlink()
    else:
        (out / "manifest.json").unlink()
    with pytest.raises(error, match=match):
        PackedSet.open(out)


def test_changed_bytes_fail_the_checksum_verify(data, tmp_path):
    out = pack(NAMES, data, tmp_path / "p", progress=False)
    f = out / "test.images.npy"
    with open(f, "r+b") as fh:  # one byte flipped, same size: only the checksum can tell
        fh.seek(f.stat().st_size - 100)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0xFF]))
    PackedSet.open(out)  # the cheap check passes
    with pytest.raises(DamagedPackError, match=r"test\.images\.npy does not match its checksum"):
        PackedSet.open(out, verify=True)
    assert P.main(["--verify", "--out", str(out)]) == 1
    # Packing again notices the damage and replaces the pack.
    assert PackedSet.open(pack(NAMES, data, out, progress=False), verify=True)


def test_changed_source_file_is_named(data, tmp_path):
    out = pack(NAMES, data, tmp_path / "p", max_per_class=500, progress=False)
    assert pack(NAMES, data, out, max_per_class=500, progress=False) == out  # up to date: kept
    src = bitmap_path(data, "dog")
    rows = np.load(src)
    rows[3, 100] ^= 1
    np.save(src, rows)
    with pytest.raises(SourceChangedError, match=r"dog\.npy"):
        PackedSet.open(out).check_sources()
    with pytest.raises(SourceChangedError, match=r"dog\.npy.*changed.*--force"):
        pack(NAMES, data, out, max_per_class=500, progress=False)
    assert PackedSet.open(pack(NAMES, data, out, max_per_class=500, force=True, progress=False)).check_sources() == []
    # More rows appended to a source leave the packed ones as they were: still the same pack.
    np.save(bitmap_path(data, "cat"), np.concatenate([np.load(bitmap_path(data, "cat")),
                                                      np.zeros((50, 784), np.uint8)]))
    assert PackedSet.open(out).check_sources() == []
    with pytest.raises(PackError, match="another pack"):
        pack(NAMES, data, out, max_per_class=400, progress=False)


def test_peak_memory_is_bounded_by_the_chunk_and_buffer_not_the_set(tmp_path):
    """In a fresh process: pack and read a 63 MB set with 3 MB chunks and a 3 MB buffer (through the page cache
    and around it); the resident set grows by far less than the set."""
    data = make_bitmaps(tmp_path / "data", rows=[16_000] * 5)
    out = tmp_path / "p"
    script = textwrap.dedent(f"""
        import resource, numpy as np, torch
        from utils import pack as P
        np.zeros(4 << 20, np.uint8) + 1; torch.randperm(10)  # warm both libraries' allocators
        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        base = peak()
        P.pack({NAMES!r}, {str(data)!r}, {str(out)!r}, chunk_rows=4096, progress=False)
        packed = peak()
        ps = P.PackedSet.open({str(out)!r})
        n = sum(len(y) for _, y in ps.train.batches(256, block_rows=1024, buffer_blocks=2))
        n += sum(len(y) for _, y in ps.train.batches(256, block_rows=1024, buffer_blocks=2, direct=True))
        n += sum(len(y) for _, y in ps.test.ordered(256, block_rows=1024))
        print(base, packed, peak(), n)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    base, packed, read, n = map(int, done.stdout.split())
    size = 80_000 * 784
    assert n == 2 * 64_000 + 8_000
    assert packed - base < size / 4, f"packing {size / 1e6:.0f} MB grew the process by {(packed - base) / 1e6:.0f} MB"
    assert read - base < size / 4, f"reading {size / 1e6:.0f} MB grew the process by {(read - base) / 1e6:.0f} MB"


# ------------------------------------------------------------------------------------------ real data

def test_pack_of_mirror_categories_matches_load_and_split(tmp_path, mirror_url):
    names = ["cloud", "smiley face", "apple"]
    out = tmp_path / "packed" / "three"
    rc = P.main(["--categories", ",".join(names), "--max-per-class", "900", "--data", str(tmp_path / "data"),
                 "--base-url", mirror_url, "--out", str(out), "--seed", "5", "--no-progress"])
    assert rc == 0
    ps = PackedSet.open(out, verify=True)
    ds = load_bitmaps(names, tmp_path / "data", 900)
    assert len(ds) == 2700 and ps.classes == names
    for part, expected in zip(ps.splits.values(), stratified_split(ds.labels, seed=5)):
        index = torch.from_numpy(np.array(part.index))
        assert torch.equal(index.sort().values, expected)
        assert torch.equal(torch.cat([x for x, _ in part.ordered(100)]), ds.images[index])
