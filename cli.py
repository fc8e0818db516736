"""The weightlapse command: one entry point for what the modules' own commands do.

    weightlapse download --out data/mnist           # the data stage
    weightlapse train --run original --data data/mnist --out runs/original
    weightlapse sweep --data data/mnist --out runs-sweep
    weightlapse runs [RUNS_DIR]                     # the runs index
    weightlapse stats RUN --out stats.zarr          # per-pixel change statistics
    weightlapse compare RUNS_DIR --group G [--centred] --out comparison.zarr
    weightlapse function-space RUNS_DIR --group G --out predictions.zarr
    weightlapse compact RUN_DIR                     # its weights re-encoded, ~1.3x smaller, lossless
    weightlapse index RUN_DIR                       # its pixel history, for the viewer's pixel inspector
    weightlapse publish RUN_DIR s3://bucket/runs/NAME
    weightlapse view [RUNS_DIR] [--port N]          # the viewer on 127.0.0.1

Each subcommand takes the same arguments as its module (``python -m weightlapse.pipeline.train``
and so on, which keep working, as do ``dvc repro`` and ``panel serve viewer/``); ``--help``
on each lists them. Exit codes: 0 done, 1 the command failed (its reason on one line),
2 bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

# subcommand -> (module whose main(argv) runs it, what it does)
COMMANDS = {
    "download": ("weightlapse.pipeline.download", "fetch a dataset's files, checksum-verified (the data stage)"),
    "train": ("weightlapse.pipeline.train", "train one run and record every step's weights (the train stage)"),
    "sweep": ("weightlapse.pipeline.sweep", "train the sweep grid of params.yaml, runs stacked, on a Dask cluster"),
    "runs": ("weightlapse.viewer.analysis.runs", "print the runs index: each run's state, params and final metrics"),
    "stats": ("weightlapse.viewer.analysis.stats_command", "per-weight change statistics of a run (a network's per parameter), as a Zarr store"),
    "compare": ("weightlapse.viewer.analysis.compare",
                "cross-run comparisons of a group of runs, written as a Zarr store"),
    "function-space": ("weightlapse.viewer.analysis.function_space",
                       "how alike runs' predictions are on the held-out split, over steps, as a Zarr store"),
    "compact": ("weightlapse.pipeline.compact",
                "re-encode a finished run's weights with the compact lossless codec, in place, safely"),
    "index": ("weightlapse.pipeline.history",
              "copy a run's weights time-major beside its store, for the viewer's pixel inspector"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="weightlapse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"weightlapse {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    commands.add_parser("publish", help="copy a finished run to another location (object storage), marker last",
                        add_help=False)
    commands.add_parser("view", help="serve the viewer on 127.0.0.1 over a runs directory or URL", add_help=False)
    if not argv:
        parser.print_help()
        return 2
    known, rest = parser.parse_known_args(argv[:1])
    rest += argv[1:]
    if known.command in COMMANDS:
        module = importlib.import_module(COMMANDS[known.command][0])
        return module.main(rest, prog=f"weightlapse {known.command}")
    if known.command == "publish":
        return publish(rest)
    return view(rest)


def publish(argv: list[str]) -> int:
    from weightlapse.pipeline.locations import LocationError, publish_run
    from weightlapse.pipeline.runlock import RunLockedError

    parser = argparse.ArgumentParser(prog="weightlapse publish", description="Copy a finished run directory "
                                     "(store, metrics, history) to a path or fsspec URL, its progress marker last")
    parser.add_argument("run_dir", help="the run directory to copy (runs/<run>)")
    parser.add_argument("target", help="where to: a directory or a URL such as s3://bucket/runs/NAME")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        target = publish_run(args.run_dir, args.target)
    except (LocationError, RunLockedError, FileNotFoundError, OSError) as error:
        logging.getLogger("weightlapse").error("%s", error)
        return 1
    print(target)
    return 0


def view(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="weightlapse view", description="Serve the viewer on 127.0.0.1 (this "
                                     "machine only) over a runs directory or URL, from any working directory")
    parser.add_argument("runs_dir", nargs="?", default=os.environ.get("WEIGHTLAPSE_RUNS", "runs"),
                        help="a runs directory or an fsspec URL (default: runs/, or WEIGHTLAPSE_RUNS)")
    parser.add_argument("--port", type=int, default=5006, help="port on 127.0.0.1 (default 5006)")
    parser.add_argument("--show", action="store_true", help="open it in the browser")
    parser.add_argument("--scheduler", help="Dask scheduler address for statistics and comparisons")
    parser.add_argument("--data", help="the data stage's directory (one folder per dataset), for comparing "
                                       "predictions on held-out images (default: data/ beside the runs directory)")
    args = parser.parse_args(argv)
    runs = args.runs_dir if "://" in args.runs_dir else str(Path(args.runs_dir).expanduser().absolute())
    app = Path(__file__).resolve().parent / "viewer"
    command = [sys.executable, "-m", "panel", "serve", str(app), "--address", "127.0.0.1", "--port", str(args.port),
               *(["--show"] if args.show else []), "--args", "--runs", runs,
               *(["--scheduler", args.scheduler] if args.scheduler else []),
               *(["--data", str(Path(args.data).expanduser().absolute())] if args.data else [])]
    print(f"weightlapse viewer over {runs}: http://127.0.0.1:{args.port}/viewer (Ctrl-C stops it)", flush=True)
    # This process becomes the server: a signal that stops the command stops the server, and
    # no server is left running behind it.
    os.execv(sys.executable, command)


def _version() -> str:
    from weightlapse import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
