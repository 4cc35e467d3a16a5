"""Start `python -m app` in a subprocess on a free local port and wait until it answers (tests, benchmarks)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import httpx

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def app_command(model: str | Path | None, host: str = "127.0.0.1", port: int = 8000, *extra: str,
                python: str = sys.executable) -> list[str]:
    """The python -m app command line; model None: the model shipped with the repo."""
    chosen = [] if model is None else ["--model", str(model)]
    return [python, "-m", "app", *chosen, "--host", host, "--port", str(port), *extra]


@contextmanager
def app_process(model: str | Path | None, *extra: str, host: str = "127.0.0.1", env: dict | None = None,
                python: str = sys.executable) -> Iterator[tuple[subprocess.Popen, str, IO[bytes]]]:
    """`python -m app` started on a free local port: (the process, its base URL, its log file), not yet
    answering; stopped on exit. env: variables added to the server's environment."""
    port = free_port(host)
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(app_command(model, host, port, *extra, python=python), cwd=PROJECT_ROOT,
                                stdout=log, stderr=subprocess.STDOUT, env=os.environ | (env or {}))
        try:
            yield proc, f"http://{host}:{port}", log
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def running_server(model: str | Path | None, *extra: str, host: str = "127.0.0.1", timeout: float = 60.0,
                   env: dict | None = None, python: str = sys.executable) -> Iterator[str]:
    """Yield the base URL ("http://127.0.0.1:PORT") of a started server; stop it on exit.
    env: variables added to the server's environment."""
    with app_process(model, *extra, host=host, env=env, python=python) as (proc, url, log):
        _wait_healthy(proc, url, timeout, log)
        yield url


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with code {proc.returncode}:\n{log.read().decode(errors='replace')}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {url} did not answer /health within {timeout:.0f} s")
