"""weightlapse: record every training step's weights of a network, then replay, measure and compare them.

One distribution, one namespace: ``weightlapse.pipeline`` writes runs (the data and train
stages, the store writer), ``weightlapse.viewer`` reads them (the Panel app and the research
API it is built on). The names below are the public API; they are imported when first used,
so ``import weightlapse`` stays light::

    import weightlapse
    ds = weightlapse.open_run("runs/original")              # lazy xarray Dataset of the valid steps
    catalog = weightlapse.RunCatalog("runs")                 # the runs index, runs opened by name
    stats = weightlapse.change_statistics(ds.weights)        # per-pixel change statistics (dask)
    with weightlapse.Recorder("runs/my-mlp", model) as rec:  # record your own PyTorch loop
        ...
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "open_run": "weightlapse.pipeline.store",
    "read_progress": "weightlapse.pipeline.store",
    "check_store": "weightlapse.pipeline.store",
    "TrajectoryError": "weightlapse.pipeline.store",
    "TrajectoryNotFoundError": "weightlapse.pipeline.store",
    "publish_run": "weightlapse.pipeline.locations",
    "compact_run": "weightlapse.pipeline.compact",
    "Recorder": "weightlapse.pipeline.recorder",
    "RunCatalog": "weightlapse.viewer.analysis.runs",
    "RunNotFoundError": "weightlapse.viewer.analysis.runs",
    "change_statistics": "weightlapse.viewer.analysis.stats",
    "parameter_statistics": "weightlapse.viewer.analysis.stats",
    "top_pixels": "weightlapse.viewer.analysis.stats",
    "save_png": "weightlapse.viewer.analysis.export",
    "save_animation": "weightlapse.viewer.analysis.export",
}
_MODULES = {"compare": "weightlapse.viewer.analysis.compare", "stats": "weightlapse.viewer.analysis.stats",
            "function_space": "weightlapse.viewer.analysis.function_space"}
__all__ = sorted([*_PUBLIC, *_MODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'weightlapse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
