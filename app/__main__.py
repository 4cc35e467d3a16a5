"""Serve a trained checkpoint: python -m app --model models/<name>.pt --host 127.0.0.1 --port 8000"""
import argparse
import gc
import sys
from pathlib import Path

import torch
import uvicorn

from app.api import create_app
from app.service import CheckpointError, Classifier


def port(text: str) -> int:
    """argparse type: a TCP port number (a bad one is an error line, not a traceback from the socket)."""
    number = int(text)  # not a number: argparse answers "invalid port value"
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a port number (1 to 65535)")
    return number


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app", description="Drawing page and JSON API for a doodle classifier.")
    p.add_argument("--model", type=Path, required=True, help="checkpoint written by utils.train (models/<name>.pt)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per forward pass; requests are served one at a time, so keep it small")
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
    gc.collect()
    gc.freeze()  # torch, the model and the app live as long as the process: keep the collector off them
    print(f"serving {classifier.name} ({len(classifier.classes)} classes) from {args.model} "
          f"on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.run(create_app(classifier), host=args.host, port=args.port, workers=1,
                log_level=args.log_level, access_log=args.access_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
