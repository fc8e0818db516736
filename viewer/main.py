"""Entry point of ``panel serve viewer/``: builds the app over the chosen runs directory.

    panel serve viewer/ --address 127.0.0.1 --args --runs DIR

The runs directory is, in order: ``--args --runs DIR``, the WEIGHTLAPSE_RUNS environment
variable, or ``runs/`` under the current directory. Panel runs this file as a script, so
the project's modules are imported by their installed names.
"""

import argparse
import logging
import os
import sys

import holoviews as hv
import panel as pn

from viewer.app import WeightViewer

DEFAULT_RUNS_DIR = "runs"


def runs_dir_from(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="panel serve viewer/ --args", add_help=False)
    parser.add_argument("--runs", default=os.environ.get("WEIGHTLAPSE_RUNS", DEFAULT_RUNS_DIR))
    known, _ = parser.parse_known_args(argv)
    return known.runs


logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
pn.extension(notifications=False)
hv.extension("bokeh", logo=False)
WeightViewer(runs_dir_from(sys.argv[1:])).servable(title="weightlapse")
