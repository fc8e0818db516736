"""weightlapse.viewer.analysis: the research API the viewer is built on, with no UI.

The runs catalog and index (:mod:`.runs`), per-pixel change statistics (:mod:`.stats`),
cross-run comparisons (:mod:`.compare`), pictures and movies (:mod:`.export`) and the pure
array computations behind them (:mod:`.frames`). Research scripts use these directly (or
through ``import weightlapse``); the Panel app in ``weightlapse.viewer`` only draws them.
"""
