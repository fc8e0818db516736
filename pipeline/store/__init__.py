"""The trajectory store: its format, the contract between the pipeline and the viewer, and
the validating reader. Everything a reader (or the writer) needs is imported from here::

    from weightlapse.pipeline.store import check_store, open_run

Inside, one job per module: :mod:`.format` (names, arrays, codecs, limits, errors, the
:class:`StoreLayout`), :mod:`.network` (schema version 2: a network's parameters, one array
each), :mod:`.attributes` (the typed :class:`Progress` and
:class:`RunMetadata`), :mod:`.create` (creating a store), :mod:`.links` (never reading
through a symbolic link), :mod:`.check` (the validating reader, :func:`check_store`), :mod:`.steps` (reading
committed steps, a damaged chunk an error: :class:`CheckedSteps`) and
:mod:`.dataset` (:func:`open_run` and dask arrays over a checked store), :mod:`.history`
(the time-major pixel history beside a store, :func:`open_history`) and :mod:`.bounded`
(decoders that never inflate a chunk past its size, installed on import). docs/store.md is
the format's reference, for readers in other languages too.
"""

from weightlapse.pipeline.store import bounded
from weightlapse.pipeline.store.attributes import Progress, RunMetadata, marker_time
from weightlapse.pipeline.store.check import (
    CheckedStore,
    check_store,
    open_store,
    read_identity,
    recheck_store,
    store_location,
)
from weightlapse.pipeline.store.steps import CheckedSteps, damaged
from weightlapse.pipeline.store.create import consolidate, create_network_store, create_store
from weightlapse.pipeline.store.dataset import DASK_BLOCK_BYTES, dask_steps, open_run, pixel_coords, read_progress
from weightlapse.pipeline.store.history import (
    HISTORY_NAME,
    PixelHistory,
    StaleHistoryError,
    open_history,
)
from weightlapse.pipeline.store.format import (
    ALLOWED_CODECS,
    ARRAYS,
    CODECS,
    IMAGE_SIDE,
    MAX_CHUNK_BYTES,
    MAX_METADATA_BYTES,
    MAX_STEPS,
    N_CLASSES,
    N_PIXELS,
    REQUIRED_ARRAYS,
    SCALAR_CHUNK,
    SCHEMA,
    SCHEMA_VERSION,
    STORE_NAME,
    WEIGHT_DIMS,
    StoreBeingCreatedError,
    StoreLayout,
    TrajectoryError,
    TrajectoryNotFoundError,
    codec_chain_problem,
    quiet_numcodecs,
    step_series_codecs,
)
from weightlapse.pipeline.store.links import refuse_link_out, refuse_links
from weightlapse.pipeline.store.network import (
    NETWORK_SCHEMA_VERSION,
    RUN_ARRAYS,
    NetworkLayout,
    ParameterSpec,
    parse_parameters,
)

bounded.install()  # before any store is opened: zarr picks a codec's class when it reads metadata

__all__ = [
    "ALLOWED_CODECS", "ARRAYS", "CODECS", "DASK_BLOCK_BYTES", "HISTORY_NAME", "IMAGE_SIDE", "MAX_CHUNK_BYTES",
    "MAX_METADATA_BYTES", "MAX_STEPS", "NETWORK_SCHEMA_VERSION", "N_CLASSES", "N_PIXELS", "REQUIRED_ARRAYS",
    "RUN_ARRAYS", "SCALAR_CHUNK", "SCHEMA", "SCHEMA_VERSION", "STORE_NAME", "WEIGHT_DIMS", "CheckedSteps", "CheckedStore",
    "NetworkLayout", "ParameterSpec", "PixelHistory", "Progress", "RunMetadata", "StaleHistoryError",
    "StoreBeingCreatedError", "StoreLayout", "TrajectoryError", "TrajectoryNotFoundError", "check_store",
    "codec_chain_problem", "consolidate", "create_network_store", "create_store", "damaged", "dask_steps",
    "marker_time", "open_history", "open_run", "open_store", "parse_parameters", "pixel_coords", "quiet_numcodecs",
    "read_identity", "read_progress",
    "recheck_store", "refuse_link_out", "refuse_links", "step_series_codecs", "store_location",
]
