"""Entry point of ``panel serve viewer/``: builds the app over the chosen runs directory.

    panel serve viewer/ --address 127.0.0.1 --args --runs DIR [--share] [--scheduler ADDRESS] [--data DIR]

The runs directory is, in order: ``--args --runs DIR``, the WEIGHTLAPSE_RUNS environment
variable, or ``runs/`` under the current directory; an fsspec URL (``s3://bucket/runs``)
works too. ``--data DIR`` (or WEIGHTLAPSE_DATA) is the data stage's directory (``data/``,
one folder per dataset) for comparing predictions on the held-out images; by default the
``data`` beside a local runs directory. ``--scheduler`` (or WEIGHTLAPSE_SCHEDULER) is a Dask scheduler address to
compute statistics and comparisons on; by default they run in the server's process. Browsers on other machines get a
page saying the viewer is private unless ``--share`` (or WEIGHTLAPSE_SHARE=1) is given
(viewer/access.py). Requests for a host name the viewer does not serve are refused before
they reach the app (viewer/app_hooks.py, which Bokeh loads with this directory). Panel runs
this file as a script, so the project's modules are imported by their installed names.
"""

import argparse
import logging
import os
import sys

import holoviews as hv
import panel as pn

from weightlapse.viewer.access import NOT_SHARED_MESSAGE, is_same_machine
from weightlapse.viewer.app import WeightViewer, track_session

DEFAULT_RUNS_DIR = "runs"


def options_from(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="panel serve viewer/ --args", add_help=False)
    parser.add_argument("--runs", default=os.environ.get("WEIGHTLAPSE_RUNS", DEFAULT_RUNS_DIR))
    parser.add_argument("--share", action="store_true", default=os.environ.get("WEIGHTLAPSE_SHARE") == "1")
    parser.add_argument("--scheduler", default=os.environ.get("WEIGHTLAPSE_SCHEDULER") or None)
    parser.add_argument("--data", default=os.environ.get("WEIGHTLAPSE_DATA") or None)
    known, _ = parser.parse_known_args(argv)
    return known


def client_ip() -> str | None:
    context = pn.state.curdoc.session_context if pn.state.curdoc else None
    request = getattr(context, "request", None)
    return getattr(request, "remote_ip", None)


# The server log shows the viewer's own lines (pages opened and closed, problems with
# runs). Panel has configured logging already, and runs this script once per page: add
# the handler once.
viewer_log = logging.getLogger("weightlapse.viewer")
if not viewer_log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    viewer_log.addHandler(handler)
    viewer_log.setLevel(logging.INFO)
    viewer_log.propagate = False
# Every file the page loads comes from this server, never a CDN: pages work offline, and a
# page opened while another session is being set up does not get CDN stylesheet links.
os.environ.setdefault("BOKEH_RESOURCES", "server")
pn.extension(notifications=False)
hv.extension("bokeh", logo=False)
options = options_from(sys.argv[1:])
if options.share or is_same_machine(client_ip()):
    viewer = WeightViewer(options.runs, scheduler=options.scheduler, data_dir=options.data)
    track_session(viewer)
    viewer.template().servable(title="weightlapse")
else:
    pn.pane.Markdown(NOT_SHARED_MESSAGE, disable_math=True).servable(title="weightlapse")
