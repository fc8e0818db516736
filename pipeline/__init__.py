"""weightlapse pipeline: download a dataset, train, and record every step's weights.

The store format in :mod:`pipeline.trajectory` is the contract with the viewer; the
other modules are the two DVC stages (:mod:`pipeline.download`, :mod:`pipeline.train`)
and the pure pieces they are built from.
"""

__version__ = "0.1.0"
