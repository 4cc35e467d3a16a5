"""utils/download.py against a local mirror: synthetic files made here (always run) and ../shared/quickdraw."""
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from testkit.mirror import HTML_PAGE, Faults, header_size, reverse_rows, serve
from utils.categories import UnknownCategoryError, resolve_categories
from utils.download import (BASE_URL_ENV, DEFAULT_BASE_URL, GUESSED_HEADER, DownloadError, FetchSettings,
                            download_bitmaps, download_strokes, main, resolve_base_url)

PROJECT = Path(__file__).resolve().parents[1]
ROW = 784
FAST = FetchSettings(retries=3, backoff=0.01, timeout=5)  # retries without the real waits


def write_npy(path: Path, rows: int, header_len: int = 128, version=(1, 0), seed=0, dtype=np.uint8) -> np.ndarray:
    """A (rows, 784) .npy whose header is exactly header_len bytes (numpy's own writer gives 128)."""
    arr = np.random.default_rng(seed).integers(0, 256, (rows, ROW)).astype(dtype)
    width = 2 if version == (1, 0) else 4
    text = repr({"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": arr.shape})
    text = text.ljust(header_len - len(np.lib.format.MAGIC_PREFIX) - 2 - width - 1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(np.lib.format.magic(*version) + len(text).to_bytes(width, "little") + text.encode("latin1"))
        f.write(arr.tobytes())
    assert path.stat().st_size == header_len + arr.nbytes and np.array_equal(np.load(path), arr)
    return arr


def fetch(url, root, n, names=("cat",), settings=FAST, **kw) -> dict:
    """download_bitmaps quietly; the per-category Fetched records."""
    stats = {}
    download_bitmaps(names, root=root, max_per_class=n, base_url=url, progress=False, settings=settings,
                     stats=stats, **kw)
    return stats


def listing(folder: Path) -> list[str]:
    """The files a download leaves, less its lock file (kept: removing it could let two fetches in at once)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def local(root, name="cat") -> np.ndarray:
    return np.load(Path(root) / "numpy_bitmap" / f"{name}.npy")


@pytest.fixture
def remote(tmp_path) -> tuple[Path, np.ndarray]:
    """A mirror folder holding a 300-row cat.npy with numpy's usual 128-byte header."""
    base = tmp_path / "remote"
    return base, write_npy(base / "full/numpy_bitmap/cat.npy", 300)


# ------------------------------------------------------------------------------------- synthetic, always run

@pytest.mark.parametrize("header_len, version", [(80, (1, 0)), (128, (1, 0)), (1000, (1, 0)), (208, (2, 0))])
def test_prefix_by_range_equals_first_rows(tmp_path, header_len, version):
    arr = write_npy(tmp_path / "remote/full/numpy_bitmap/cat.npy", 300, header_len, version)
    with serve(tmp_path / "remote") as mirror:
        got = fetch(mirror.url, tmp_path / "data", 37)["cat"]
    out = local(tmp_path / "data")
    assert out.dtype == np.uint8 and out.shape == (37, ROW)
    np.testing.assert_array_equal(out, arr[:37])
    assert {r.status for r in mirror.requests} == {206}
    need = header_len + 37 * ROW
    assert need <= mirror.sent() <= need + GUESSED_HEADER
    assert (got.rows, got.bytes_moved, got.complete) == (37, mirror.sent(), False)


def test_several_categories_at_once_with_spaces_in_names(tmp_path):
    names = ("cat", "alarm clock", "The Eiffel Tower")
    arrays = {n: write_npy(tmp_path / f"remote/full/numpy_bitmap/{n}.npy", 50 + i, 80 + 48 * i, seed=i)
              for i, n in enumerate(names)}
    with serve(tmp_path / "remote") as mirror:
        paths = download_bitmaps(names, root=tmp_path / "data", max_per_class=20, base_url=mirror.url,
                                 workers=3, progress=False, settings=FAST)
    assert list(paths) == list(names)
    for name in names:
        np.testing.assert_array_equal(np.load(paths[name]), arrays[name][:20])
    assert {r.path for r in mirror.requests} == {f"full/numpy_bitmap/{n}.npy" for n in names}


def test_server_ignoring_range_is_cut_after_the_bytes_needed(remote, tmp_path):
    base, _ = remote
    arr = write_npy(base / "full/numpy_bitmap/cat.npy", 2000)  # 1.5 MB, of which 10 rows are wanted
    with serve(base, Faults(ignore_range=True)) as mirror:
        first = fetch(mirror.url, tmp_path / "data", 10)["cat"]
        np.testing.assert_array_equal(local(tmp_path / "data"), arr[:10])
        # Growing: a whole file where a range was asked is never appended at an offset: the file is read
        # again from byte 0 (the refused answer's body is not read).
        grown = fetch(mirror.url, tmp_path / "data", 25)["cat"]
    np.testing.assert_array_equal(local(tmp_path / "data"), arr[:25])
    assert {r.status for r in mirror.requests} == {200}
    assert first.bytes_moved == grown.bytes_moved < arr.nbytes // 4  # each: one chunk from byte 0


def test_dropped_connection_resumes_where_it_stopped(remote, tmp_path):
    base, arr = remote
    cut = FAST.chunk_size  # what arrived in whole chunks is kept
    with serve(base, Faults(script=["drop"], drop_after=cut)) as mirror:
        got = fetch(mirror.url, tmp_path / "data", 100)["cat"]
    np.testing.assert_array_equal(local(tmp_path / "data"), arr[:100])
    assert [r.sent for r in mirror.requests][0] == cut
    assert mirror.requests[1].range.startswith(f"bytes={cut}-")
    assert got.bytes_moved == mirror.sent() == 128 + 100 * ROW  # nothing fetched twice


def test_interrupted_run_leaves_no_final_file_and_the_next_run_resumes(remote, tmp_path):
    base, arr = remote
    root, out = tmp_path / "data", tmp_path / "data/numpy_bitmap/cat.npy"
    cut = FAST.chunk_size
    with serve(base, Faults(script=["drop"] + [500] * 9, drop_after=cut)) as mirror:
        with pytest.raises(DownloadError, match="cat.npy.*giving up"):
            fetch(mirror.url, root, 200, settings=FetchSettings(retries=2, backoff=0.01))
        # no final file, sidecar or temporary file: the bytes and the tag naming their remote file
        assert listing(out.parent) == ["cat.npy.part", "cat.npy.part.json"]
        assert out.with_name("cat.npy.part").stat().st_size == cut
        mirror.faults, start = Faults(), len(mirror.requests)  # the same URL, now healthy
        got = fetch(mirror.url, root, 200)["cat"]
    assert mirror.requests[start].range.startswith(f"bytes={cut}-")
    assert got.bytes_moved == 128 + 200 * ROW - cut
    np.testing.assert_array_equal(local(root), arr[:200])
    assert listing(out.parent) == ["cat.npy", "cat.npy.json"]


def test_failed_growth_keeps_the_cached_file_intact(remote, tmp_path):
    base, arr = remote
    root = tmp_path / "data"
    cut = FAST.chunk_size
    with serve(base) as mirror:
        fetch(mirror.url, root, 10)
        mirror.faults = Faults(script=["drop"] + [503] * 9, drop_after=cut)
        with pytest.raises(DownloadError, match="503"):
            fetch(mirror.url, root, 250, settings=FetchSettings(retries=1, backoff=0.01))
        np.testing.assert_array_equal(local(root), arr[:10])
        mirror.faults, start = Faults(), len(mirror.requests)
        fetch(mirror.url, root, 250)
    assert mirror.requests[start].range.startswith(f"bytes={128 + 10 * ROW + cut}-")
    np.testing.assert_array_equal(local(root), arr[:250])


def test_range_other_than_the_one_asked_is_a_clear_error(remote, tmp_path):
    base, arr = remote
    root = tmp_path / "data"
    with serve(base) as mirror:
        fetch(mirror.url, root, 10)
        mirror.faults = Faults(misrange=True)
        with pytest.raises(DownloadError, match=rf"cat\.npy: asked for bytes {128 + 10 * ROW}-.*was sent bytes "
                                                rf"{128 + 10 * ROW + 1}-"):
            fetch(mirror.url, root, 60)
    np.testing.assert_array_equal(local(root), arr[:10])  # the cached rows are kept


def test_500_then_200_is_retried(remote, tmp_path):
    base, arr = remote
    with serve(base, Faults(script=[500, 500])) as mirror:
        fetch(mirror.url, tmp_path / "data", 5)
    assert [r.status for r in mirror.requests] == [500, 500, 206]
    np.testing.assert_array_equal(local(tmp_path / "data"), arr[:5])


def test_retries_give_up_with_the_url_and_status(remote, tmp_path):
    base, _ = remote
    with serve(base, Faults(script=[500] * 10)) as mirror:
        with pytest.raises(DownloadError, match=r"full/numpy_bitmap/cat\.npy.*3 failed attempts.*500"):
            fetch(mirror.url, tmp_path / "data", 5, settings=FetchSettings(retries=2, backoff=0.01))
    assert len(mirror.requests) == 3


def test_404_is_an_immediate_error_naming_the_url(remote, tmp_path):
    base, _ = remote
    with serve(base) as mirror:
        with pytest.raises(DownloadError, match=r"404.*/full/numpy_bitmap/alarm%20clock\.npy"):
            fetch(mirror.url, tmp_path / "data", 5, names=["alarm clock"])
    assert len(mirror.requests) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage header", "truncate, sidecar lost"])
def test_damaged_cached_file_is_detected_and_fetched_again(remote, tmp_path, damage):
    base, arr = remote
    root, out = tmp_path / "data", tmp_path / "data/numpy_bitmap/cat.npy"
    with serve(base) as mirror:
        fetch(mirror.url, root, 50)
        data = out.read_bytes()
        out.write_bytes(b"not a numpy file" + data[16:] if damage == "garbage header" else data[:-100])
        if "sidecar" in damage:
            out.with_name("cat.npy.json").unlink()
        got = fetch(mirror.url, root, 50)["cat"]
    assert got.bytes_moved > 0
    np.testing.assert_array_equal(local(root), arr[:50])


def test_second_call_moves_nothing(remote, tmp_path):
    base, arr = remote
    with serve(base) as mirror:
        fetch(mirror.url, tmp_path / "data", 50)
        before = len(mirror.requests)
        again = fetch(mirror.url, tmp_path / "data", 50)["cat"]
        fewer = fetch(mirror.url, tmp_path / "data", 20)["cat"]  # the cache holds more than asked: kept
    assert (again.bytes_moved, fewer.bytes_moved, len(mirror.requests)) == (0, 0, before)
    np.testing.assert_array_equal(local(tmp_path / "data"), arr[:50])


def test_complete_file_is_never_fetched_again(remote, tmp_path):
    base, arr = remote
    with serve(base) as mirror:
        whole = fetch(mirror.url, tmp_path / "data", None)["cat"]
        before = len(mirror.requests)
        more = fetch(mirror.url, tmp_path / "data", 5000)["cat"]
        fetch(mirror.url, tmp_path / "data", None)
    assert whole.complete and whole.rows == 300 and whole.bytes_moved == 128 + 300 * ROW
    assert (more.bytes_moved, more.rows, len(mirror.requests)) == (0, 300, before)
    np.testing.assert_array_equal(local(tmp_path / "data"), arr)


@pytest.mark.parametrize("header_len", [80, 1000])  # remote headers unlike the 128 bytes written locally
def test_growing_n_fetches_only_the_missing_rows(tmp_path, header_len):
    arr = write_npy(tmp_path / "remote/full/numpy_bitmap/cat.npy", 300, header_len)
    with serve(tmp_path / "remote") as mirror:
        fetch(mirror.url, tmp_path / "data", 10)
        start = len(mirror.requests)
        grown = fetch(mirror.url, tmp_path / "data", 60)["cat"]
    assert grown.bytes_moved == sum(r.sent for r in mirror.requests[start:]) == 50 * ROW
    assert mirror.requests[start].range == f"bytes={header_len + 10 * ROW}-{header_len + 60 * ROW - 1}"
    np.testing.assert_array_equal(local(tmp_path / "data"), arr[:60])


@pytest.mark.parametrize("problem, match", [("float32", "float32"), ("short", "ends at")])
def test_bad_remote_file_is_a_clear_error(tmp_path, problem, match):
    path = tmp_path / "remote/full/numpy_bitmap/cat.npy"
    if problem == "float32":
        write_npy(path, 20, dtype=np.float32)
    else:  # the header promises 20 rows, the file holds 5
        write_npy(path, 20)
        path.write_bytes(path.read_bytes()[:128 + 5 * ROW])
    with serve(tmp_path / "remote") as mirror:
        with pytest.raises(DownloadError, match=rf"cat\.npy.*{match}"):
            fetch(mirror.url, tmp_path / "data", None)
    assert listing(tmp_path / "data/numpy_bitmap") == []


def test_unknown_category_suggests_the_closest_names(tmp_path):
    with pytest.raises(UnknownCategoryError, match="'alarm clock'") as err:
        resolve_categories(["cat", "alarm_clock", "Catt"])
    assert err.value.unknown["alarm_clock"][0] == "alarm clock"
    assert "cat" in err.value.unknown["Catt"]
    assert isinstance(err.value, ValueError)
    assert resolve_categories(["cat", "The Eiffel Tower", "cat"]) == ["cat", "The Eiffel Tower"]
    with serve(tmp_path) as mirror:  # refused before any request
        with pytest.raises(UnknownCategoryError, match="teddy-bear"):
            fetch(mirror.url, tmp_path / "data", 5, names=["teddy bear"])
    assert mirror.requests == []


def test_local_folder_base_by_path_file_url_and_environment(remote, tmp_path, monkeypatch):
    base, arr = remote
    for i, url in enumerate([str(base), base.as_uri()]):
        got = fetch(url, tmp_path / f"data{i}", 40)["cat"]
        assert got.bytes_moved == 128 + 40 * ROW
        np.testing.assert_array_equal(local(tmp_path / f"data{i}"), arr[:40])
    monkeypatch.setenv(BASE_URL_ENV, str(base))
    fetch(None, tmp_path / "env", 3)
    np.testing.assert_array_equal(local(tmp_path / "env"), arr[:3])
    assert resolve_base_url() == str(base.resolve())
    assert resolve_base_url("http://127.0.0.1:9/x") == "http://127.0.0.1:9/x/"  # the argument wins
    monkeypatch.delenv(BASE_URL_ENV)
    assert resolve_base_url() == DEFAULT_BASE_URL
    with pytest.raises(ValueError, match="no-such-folder"):
        resolve_base_url(str(tmp_path / "no-such-folder"))


def test_strokes_first_lines_grow_and_complete(tmp_path):
    rng = np.random.default_rng(0)
    lines = [json.dumps({"word": "cat", "key_id": str(i), "drawing": [[rng.integers(0, 256, rng.integers(2, 200)).tolist()] * 2]})
             for i in range(200)]
    remote = tmp_path / "remote/full/simplified/cat.ndjson"
    remote.parent.mkdir(parents=True)
    remote.write_text("\n".join(lines))  # no newline after the last line, as a file may end
    root, out = tmp_path / "data", tmp_path / "data/simplified/cat.ndjson"

    def get(n, **kw) -> int:
        stats = {}
        download_strokes(["cat"], root=root, max_per_class=n, base_url=mirror.url, progress=False,
                         settings=FAST, stats=stats, **kw)
        return stats["cat"].bytes_moved

    with serve(tmp_path / "remote") as mirror:
        assert get(50) < remote.stat().st_size / 2
        assert out.read_text().splitlines() == lines[:50]
        cached = out.stat().st_size
        start = len(mirror.requests)
        get(120)
        assert mirror.requests[start].range.startswith(f"bytes={cached}-")
        assert out.read_text().splitlines() == lines[:120]
        get(1000)
        assert out.read_bytes() == remote.read_bytes()
        out.write_bytes(out.read_bytes()[:-7])  # truncated on disk: detected by its sidecar
        assert get(None) > 0 and out.read_bytes() == remote.read_bytes()
        before = len(mirror.requests)
        assert get(None) == get(5000) == 0 and len(mirror.requests) == before


def test_cli_prints_rows_and_bytes(remote, tmp_path, capsys):
    base, arr = remote
    with serve(base) as mirror:
        code = main(["cat", "--max-per-class", "5", "--root", str(tmp_path / "data"), "--base-url", mirror.url,
                     "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "cat" in out and f"{128 + 5 * ROW:,}" in out and "1 categories, 5 rows" in out
    np.testing.assert_array_equal(local(tmp_path / "data"), arr[:5])
    assert main(["alarm_clock", "--root", str(tmp_path / "data"), "--base-url", str(base)]) == 1
    assert "did you mean 'alarm clock'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- which remote file

@pytest.fixture
def sources(tmp_path) -> tuple[Path, np.ndarray, Path, np.ndarray]:
    """Two mirror folders holding different cat.npy files: 300 rows after a 128-byte header, 600 after 80."""
    small, big = tmp_path / "small", tmp_path / "big"
    return (small, write_npy(small / "full/numpy_bitmap/cat.npy", 300, 128, seed=1),
            big, write_npy(big / "full/numpy_bitmap/cat.npy", 600, 80, seed=2))


def discarded(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "discarding" in r.getMessage()]


@pytest.mark.parametrize("cached", ["10 rows", "complete", "interrupted .part"])
def test_bytes_from_another_source_are_never_reused(sources, tmp_path, caplog, cached):
    small_dir, small, big_dir, big = sources
    root = tmp_path / "data"
    with serve(small_dir) as one, serve(big_dir) as other, caplog.at_level(logging.WARNING):
        if cached == "interrupted .part":
            one.faults = Faults(script=["drop"] + [500] * 9, drop_after=FAST.chunk_size)
            with pytest.raises(DownloadError, match="giving up"):
                fetch(one.url, root, 200, settings=FetchSettings(retries=1, backoff=0.01))
            one.faults = Faults()
        else:
            fetch(one.url, root, 10 if cached == "10 rows" else None)
        caplog.clear()
        got = fetch(other.url, root, 60 if cached != "complete" else 600)["cat"]
        np.testing.assert_array_equal(local(root), big[:got.rows])
        assert got.rows == (600 if cached == "complete" else 60)
        assert other.requests[0].range.startswith("bytes=0-")  # nothing resumed from the other file's bytes
        assert len(discarded(caplog)) == 1 and one.url in discarded(caplog)[0]
        # and back: the bigger source's cache does not serve the smaller one
        fetch(one.url, root, 5)
        np.testing.assert_array_equal(local(root), small[:5])


@pytest.mark.parametrize("validators", [True, False])
def test_remote_file_replaced_at_the_same_url_is_fetched_anew(tmp_path, caplog, validators):
    remote = tmp_path / "remote/full/numpy_bitmap/cat.npy"
    write_npy(remote, 300, seed=1)
    root = tmp_path / "data"
    with serve(tmp_path / "remote", Faults(validators=validators)) as mirror, caplog.at_level(logging.WARNING):
        fetch(mirror.url, root, 10)
        before = json.loads((root / "numpy_bitmap/cat.npy.json").read_text())
        mtime = remote.stat().st_mtime_ns
        # With validators the new file is as long as the old one: only its ETag tells them apart.
        new = write_npy(remote, 300 if validators else 400, seed=2)
        os.utime(remote, ns=(mtime + 10**9, mtime + 10**9))
        start = len(mirror.requests)
        got = fetch(mirror.url, root, 60)["cat"]
    np.testing.assert_array_equal(local(root), new[:60])
    assert got.bytes_moved == 128 + 60 * ROW  # the refused answer's body is not read
    resumed = mirror.requests[start]
    # Without validators the resume re-reads the last cached row to compare it.
    assert resumed.range.startswith(f"bytes={128 + (10 if validators else 9) * ROW}-")
    if validators:  # the resume was conditional on the cached file's ETag, so the changed file came whole
        assert before["etag"] and resumed.if_range == before["etag"] and resumed.status == 200
    else:
        assert before["etag"] is None and resumed.status == 206
    assert mirror.requests[start + 1].range.startswith("bytes=0-")
    assert len(discarded(caplog)) == 1


def strokes_file(path: Path, lines: int = 200, seed: int = 0) -> list[str]:
    """A simplified-strokes file of `lines` drawings of varied length (no newline after the last)."""
    rng = np.random.default_rng(seed)
    rows = [json.dumps({"word": "cat", "key_id": str(i), "drawing": [[rng.integers(0, 256, rng.integers(2, 200))
                                                                     .tolist()] * 2]}) for i in range(lines)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows))
    return rows


def get_strokes(url, root, n, settings=FAST) -> int:
    stats = {}
    download_strokes(["cat"], root=root, max_per_class=n, base_url=url, progress=False, settings=settings,
                     stats=stats)
    return stats["cat"].bytes_moved


@pytest.mark.parametrize("cached", ["rows", "interrupted .part"])
def test_html_page_answering_a_resume_is_never_appended(remote, tmp_path, cached):
    base, arr = remote
    root = tmp_path / "data"
    with serve(base) as mirror:
        if cached == "rows":
            fetch(mirror.url, root, 10)
        else:  # a body cut short, and every resume (If-Range) answered with a 200 HTML page
            mirror.faults = Faults(script=["drop"], drop_after=FAST.chunk_size, html="if-range")
        mirror.faults.html, start = "if-range", len(mirror.requests)
        fetch(mirror.url, root, 200)
    np.testing.assert_array_equal(local(root), arr[:200])
    answers = [(r.if_range is not None, r.status, r.range.split("-")[0]) for r in mirror.requests[start:]]
    # the page answered the conditional resume; the file was then read again from byte 0, unconditionally
    assert answers[-2:] == [(True, 200, answers[-2][2]), (False, 206, "bytes=0")]
    assert answers[-2][2] != "bytes=0"


@pytest.mark.parametrize("kind", ["bitmap", "strokes"])
def test_html_page_instead_of_the_file_is_a_clear_error_and_keeps_the_cache(tmp_path, kind):
    base, root = tmp_path / "remote", tmp_path / "data"
    if kind == "bitmap":
        arr = write_npy(base / "full/numpy_bitmap/cat.npy", 300)
        out, get = root / "numpy_bitmap/cat.npy", lambda n: fetch(mirror.url, root, n)
    else:
        lines = strokes_file(base / "full/simplified/cat.ndjson")
        out, get = root / "simplified/cat.ndjson", lambda n: get_strokes(mirror.url, root, n)
    with serve(base) as mirror:
        get(10)
        cached = out.read_bytes()
        mirror.faults = Faults(html="always")
        with pytest.raises(DownloadError, match=r"cat\.(npy|ndjson).*HTML page"):
            get(60)
    assert out.read_bytes() == cached
    if kind == "bitmap":
        np.testing.assert_array_equal(local(root), arr[:10])
    else:
        assert out.read_text().splitlines() == lines[:10]
    assert listing(out.parent) == [out.name, out.name + ".json"]


@pytest.mark.parametrize("kind", ["bitmap", "strokes"])
def test_file_holding_an_html_page_is_a_clear_error(tmp_path, kind):
    """The body check itself, without a Content-Type to give the page away."""
    folder, name = ("numpy_bitmap", "cat.npy") if kind == "bitmap" else ("simplified", "cat.ndjson")
    path = tmp_path / "remote/full" / folder / name
    path.parent.mkdir(parents=True)
    path.write_bytes(HTML_PAGE)
    with serve(tmp_path / "remote") as mirror:
        with pytest.raises(DownloadError, match=rf"{name}.* is an HTML page"):
            if kind == "bitmap":
                fetch(mirror.url, tmp_path / "data", 5)
            else:
                get_strokes(mirror.url, tmp_path / "data", 5)
    assert listing(tmp_path / "data" / folder) == []


def test_strokes_line_that_is_not_a_drawing_is_a_clear_error(tmp_path):
    lines = strokes_file(tmp_path / "remote/full/simplified/cat.ndjson", 20)
    lines[7] = json.dumps({"word": "cat", "strokes": []})
    (tmp_path / "remote/full/simplified/cat.ndjson").write_text("\n".join(lines))
    with serve(tmp_path / "remote") as mirror:
        with pytest.raises(DownloadError, match=r"cat\.ndjson: line 8 is not a JSON drawing"):
            get_strokes(mirror.url, tmp_path / "data", 10)
        assert get_strokes(mirror.url, tmp_path / "data", 7) > 0  # the lines before it are fine


@pytest.mark.parametrize("validators", [False, True])
@pytest.mark.parametrize("cached", ["rows", "interrupted .part"])
@pytest.mark.parametrize("kind", ["bitmap", "strokes"])
def test_same_size_change_between_two_runs_is_fetched_afresh(tmp_path, caplog, kind, cached, validators):
    base, root = tmp_path / "remote", tmp_path / "data"
    if kind == "bitmap":
        path = base / "full/numpy_bitmap/cat.npy"
        write_npy(path, 300)
        get = lambda n: fetch(mirror.url, root, n, settings=settings)  # noqa: E731
        read = lambda: local(root)  # noqa: E731
    else:
        path = base / "full/simplified/cat.ndjson"
        strokes_file(path)
        get = lambda n: get_strokes(mirror.url, root, n, settings=settings)  # noqa: E731
        read = lambda: (root / "simplified/cat.ndjson").read_bytes().splitlines()  # noqa: E731
    new = reverse_rows(path)
    assert len(new) == path.stat().st_size and new != path.read_bytes()
    settings = FetchSettings(retries=0, backoff=0.01, timeout=5)
    with serve(base, Faults(validators=validators)) as mirror, caplog.at_level(logging.WARNING):
        if cached == "rows":
            get(10)
        else:
            mirror.faults.script, mirror.faults.drop_after = ["drop", 500], FAST.chunk_size
            with pytest.raises(DownloadError, match="giving up"):
                get(150)
        mirror.faults = Faults(validators=validators, new_version=True)
        start = len(mirror.requests)
        get(150)
    path.write_bytes(new)  # what the mirror served: the rows asked for are its first ones
    expected = np.load(path)[:150] if kind == "bitmap" else path.read_bytes().splitlines()[:150]
    np.testing.assert_array_equal(read(), expected)
    assert len(discarded(caplog)) == 1
    ranges = [r.range for r in mirror.requests[start:]]  # a resume, refused; then from byte 0
    assert not ranges[0].startswith("bytes=0-") and any(r.startswith("bytes=0-") for r in ranges[1:])


def test_unchanged_file_without_validators_grows_by_the_missing_rows_and_one_more(remote, tmp_path):
    base, arr = remote
    with serve(base, Faults(validators=False)) as mirror:
        fetch(mirror.url, tmp_path / "data", 10)
        start = len(mirror.requests)
        grown = fetch(mirror.url, tmp_path / "data", 60)["cat"]
    assert mirror.requests[start].range == f"bytes={128 + 9 * ROW}-{128 + 60 * ROW - 1}"  # the last cached row
    assert grown.bytes_moved == 51 * ROW and len(mirror.requests) == start + 1
    np.testing.assert_array_equal(local(tmp_path / "data"), arr[:60])


def test_two_downloads_of_one_file_at_once_fetch_it_once(remote, tmp_path):
    base, arr = remote
    root, together = tmp_path / "data", threading.Barrier(2)
    results, errors = [], []

    def run() -> None:
        together.wait()
        try:
            results.append(fetch(mirror.url, root, 100)["cat"])
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    with serve(base, Faults(delay=0.005, chunk=4096)) as mirror:  # ~0.1 s a fetch: the two overlap
        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    np.testing.assert_array_equal(local(root), arr[:100])
    assert sorted(g.bytes_moved for g in results) == [0, 128 + 100 * ROW] == [0, mirror.sent()]
    assert listing(root / "numpy_bitmap") == ["cat.npy", "cat.npy.json"]


def test_fewer_rows_than_asked_is_a_warning(remote, tmp_path, caplog):
    base, arr = remote
    with serve(base) as mirror, caplog.at_level(logging.WARNING):
        got = fetch(mirror.url, tmp_path / "data", 500)["cat"]
        again = fetch(mirror.url, tmp_path / "data", 500)["cat"]  # from the cache: said again
    assert (got.rows, got.complete, again.rows, again.bytes_moved) == (300, True, 300, 0)
    assert [r.getMessage() for r in caplog.records] == ["cat: 300 rows available, 500 asked "
                                                        "(the source file holds no more)"] * 2


# ------------------------------------------------------------------------------------- ../shared/quickdraw

SHARED_CATEGORIES = ("cat", "alarm clock", "smiley face")


def test_shared_three_categories_first_700_rows(shared_dir, tmp_path):
    with serve(shared_dir) as mirror:
        stats = fetch(mirror.url, tmp_path / "data", 700, names=SHARED_CATEGORIES, workers=3)
    for name in SHARED_CATEGORIES:
        source = shared_dir / "full/numpy_bitmap" / f"{name}.npy"
        np.testing.assert_array_equal(local(tmp_path / "data", name), np.load(source, mmap_mode="r")[:700])
        assert stats[name].bytes_moved == mirror.sent(f"{name}.npy") <= 1.1 * (header_size(source) + 700 * ROW)


def test_shared_same_size_change_without_validators(shared_dir, tmp_path):
    source = shared_dir / "full/numpy_bitmap/cat.npy"
    with serve(shared_dir, Faults(validators=False)) as mirror:
        fetch(mirror.url, tmp_path, 100)
        mirror.faults = Faults(validators=False, new_version=True)
        fetch(mirror.url, tmp_path, 300)
    np.testing.assert_array_equal(local(tmp_path), np.load(source, mmap_mode="r")[::-1][:300])


def test_shared_cli_subprocess(mirror_url, shared_dir, tmp_path):
    def cli(*args) -> subprocess.CompletedProcess:
        env = {**os.environ, BASE_URL_ENV: "http://127.0.0.1:9/unused/"}  # --base-url must win
        return subprocess.run([sys.executable, "-m", "utils.download", *args, "--root", str(tmp_path),
                               "--base-url", mirror_url, "--no-progress"],
                              cwd=PROJECT, capture_output=True, text=True, timeout=60, env=env)

    run = cli("smiley face", "cat", "--max-per-class", "30", "--workers", "2")
    assert run.returncode == 0, run.stderr
    assert "2 categories, 60 rows" in run.stdout
    for name in ("smiley face", "cat"):
        expected = np.load(shared_dir / "full/numpy_bitmap" / f"{name}.npy", mmap_mode="r")[:30]
        np.testing.assert_array_equal(local(tmp_path, name), expected)
    run = cli("cat", "--format", "raw", "--max-per-class", "4")
    assert run.returncode == 0, run.stderr
    official = (shared_dir / "full/raw/cat.ndjson").read_text().splitlines()[:4]
    assert (tmp_path / "raw/cat.ndjson").read_text().splitlines() == official
