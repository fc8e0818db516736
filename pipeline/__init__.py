"""weightlapse.pipeline: download a dataset, train, and record every step's weights.

The store format in :mod:`weightlapse.pipeline.store` is the contract with the viewer; the
other modules are the two DVC stages (:mod:`weightlapse.pipeline.download`,
:mod:`weightlapse.pipeline.train`) and the pure pieces they are built from.
"""
