"""Serve a trained checkpoint: python -m app --model models/<name>.pt --host 127.0.0.1 --port 8000"""
import argparse
import gc
import sys
from pathlib import Path

import torch
import uvicorn

from app.api import ServiceConfig, create_app
from app.server import uvicorn_config
from app.service import CheckpointError, Classifier


def port(text: str) -> int:
    """argparse type: a TCP port number (a bad one is an error line, not a traceback from the socket)."""
    number = int(text)  # not a number: argparse answers "invalid port value"
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a port number (1 to 65535)")
    return number


def seconds(text: str) -> float:
    """argparse type: a positive number of seconds."""
    value = float(text)
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds between 0 and 3600")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    defaults = ServiceConfig()
    p = argparse.ArgumentParser(prog="python -m app", description="Drawing page and JSON API for a doodle classifier.")
    p.add_argument("--model", type=Path, required=True, help="a checkpoint written by training (models/<name>.pt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per forward pass; requests are served one at a time, so keep it small")
    p.add_argument("--body-timeout", type=seconds, default=defaults.body_timeout,
                   help=f"seconds for a request body to arrive in full, else 408 (default {defaults.body_timeout:g})")
    p.add_argument("--idle-timeout", type=seconds, default=defaults.idle_timeout,
                   help=f"seconds a connection may send no request head (default {defaults.idle_timeout:g})")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    try:
        classifier = Classifier.from_checkpoint(args.model)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classifier.warm_up()
    config = ServiceConfig(body_timeout=args.body_timeout, idle_timeout=args.idle_timeout)
    app = create_app(classifier, config)
    gc.collect()
    gc.freeze()  # torch, the model and the app live as long as the process: keep the collector off them
    print(f"serving {classifier.name} ({len(classifier.classes)} classes) from {args.model} "
          f"on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, config, log_level=args.log_level,
                                  access_log=args.access_log)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
