"""Serve a model: python -m app [--model models/<name>.onnx | models/<name>.pt] [--workers N]

With no --model it serves the model that ships with the repo (models/quickdraw17/quickdraw17.int8.onnx).
An .onnx model runs on ONNX Runtime and nothing imports torch; a .pt checkpoint runs on torch.
"""
import argparse
import gc
import inspect
import json
import os
import sys
from pathlib import Path

import uvicorn

from app.api import ServiceConfig, create_app
from app.backends import ModelFileError
from app.server import PROTOCOLS, uvicorn_config
from app.service import UNSURE_BELOW, Classifier

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "quickdraw17" / "quickdraw17.int8.onnx"
ARGS_ENV = "QUICKDRAW_APP_ARGS"  # how --workers N hands the parsed flags to its worker processes


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


def fraction(text: str) -> float:
    """argparse type: a probability, 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a probability between 0 and 1")
    return value


def positive(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} is not a positive number")
    return number


def parse_args(argv=None) -> argparse.Namespace:
    defaults = ServiceConfig()
    p = argparse.ArgumentParser(prog="python -m app", description="Drawing page and JSON API for a doodle classifier.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="an exported model (.onnx, served on ONNX Runtime without torch) or a checkpoint written "
                        "by training (.pt, served on torch); default: the model shipped in models/quickdraw17/")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--workers", type=positive, default=1,
                   help="server processes sharing the port, each loading its own copy of the model (default 1)")
    p.add_argument("--threads", type=positive, default=1,
                   help="threads per forward pass in each process; passes run one at a time, so keep it small")
    p.add_argument("--unsure-below", type=fraction, default=UNSURE_BELOW,
                   help=f"answers whose top probability is below this are flagged unsure (default {UNSURE_BELOW:g})")
    p.add_argument("--body-timeout", type=seconds, default=defaults.body_timeout,
                   help=f"seconds for a request body to arrive in full, else 408 (default {defaults.body_timeout:g})")
    p.add_argument("--idle-timeout", type=seconds, default=defaults.idle_timeout,
                   help=f"seconds a connection may send no request head (default {defaults.idle_timeout:g})")
    p.add_argument("--http", default="auto", choices=["auto", *PROTOCOLS],
                   help="HTTP parser (default auto: httptools if installed, else h11)")
    p.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"],
                   help="event loop (default auto: uvloop if installed, else asyncio)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    return p.parse_args(argv)


def service_config(args: argparse.Namespace) -> ServiceConfig:
    return ServiceConfig(body_timeout=args.body_timeout, idle_timeout=args.idle_timeout)


def build_app(args: argparse.Namespace):
    """The model loaded (and warmed up) in this process, and the app serving it."""
    classifier = Classifier.from_file(args.model, args.threads, args.unsure_below)
    config = service_config(args)
    classifier.warm_up(config.pass_rows)  # every batch size a forward pass will see
    app = create_app(classifier, config)
    gc.collect()
    gc.freeze()  # the runtime, the model and the app live as long as the process: keep the collector off them
    return app


def app_from_env():
    """uvicorn's factory in each --workers process: the flags come through the environment."""
    args = argparse.Namespace(**json.loads(os.environ[ARGS_ENV]))
    args.model = Path(args.model)
    return build_app(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = dict(log_level=args.log_level, access_log=args.access_log, http=args.http, loop=args.loop)
    try:
        if args.workers == 1:
            app = build_app(args)
        else:  # check the model here, so that a bad one is one error line, not one traceback per worker
            Classifier.from_file(args.model, args.threads)
            os.environ[ARGS_ENV] = json.dumps(vars(args) | {"model": str(args.model)})
            app = "app.__main__:app_from_env"
            options.update(factory=True, workers=args.workers)
    except (ModelFileError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {args.model} on http://{args.host}:{args.port}/ ({args.workers} worker"
          f"{'s' if args.workers > 1 else ''})", file=sys.stderr, flush=True)
    config = uvicorn_config(app, args.host, args.port, service_config(args), **options)
    if args.workers == 1:
        uvicorn.Server(config).run()
    else:
        from uvicorn.supervisors import Multiprocess  # each process calls app_from_env: its own model
        older = "target" in inspect.signature(Multiprocess).parameters  # uvicorn < 0.54 takes the target
        target = {"target": uvicorn.Server(config).run} if older else {}
        Multiprocess(config, sockets=[config.bind_socket()], **target).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
