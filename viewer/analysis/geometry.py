"""The geometry of weight trajectories, shared by the comparisons of softmax and network runs.

Which steps a comparison uses, the similarity of every pair of runs, and the runs'
trajectories in one PCA basis, with what the same PCA makes of a random walk: the caveat
every such picture needs (Antognini & Sohl-Dickstein, "PCA of high dimensional random walks
with comparison to neural network training", NeurIPS 2018). Arrays in, arrays out:
:mod:`~weightlapse.viewer.analysis.compare` and :mod:`~weightlapse.viewer.analysis.network_compare`
give them each run's weights as (step, weight) rows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import dask.array as da
import numpy as np

from weightlapse.pipeline.cluster import compute

PCA_CAVEAT = (
    "Caveat: the projections of a random walk onto its own first principal components are also smooth "
    "curves (cosines, k-th component ~ cos(k*pi*t/T)), with the k-th component explaining about "
    "6/(pi^2 k^2) of the variance (61%, 15%, 7%, ...). A curved path is not evidence of structure by "
    "itself: compare the explained variance with the random walk's (Antognini & Sohl-Dickstein, NeurIPS 2018)."
)
# Components fitted for the explained-variance comparison, whatever number is drawn.
PCA_FITTED_COMPONENTS = 10
# Rows per block of the stacked trajectories: 512 x 7,840 float64 is 32 MB per task.
PCA_BLOCK_ROWS = 512

Progress = Callable[[float], None] | None


def compared_steps(n_steps: int, every: int) -> np.ndarray:
    """Every ``every``-th of the first ``n_steps`` steps, and always the last."""
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    steps = np.arange(0, n_steps, every)
    if steps[-1] != n_steps - 1:  # the last shared step always counts
        steps = np.append(steps, n_steps - 1)
    return steps


def pairwise_similarity(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity and L2 distance of every pair of rows of ``flat`` (run, weight), in float64."""
    flat = flat.astype(np.float64)
    gram = flat @ flat.T
    norms = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = gram / np.outer(norms, norms)
    distance = np.sqrt(np.maximum(norms[:, None] ** 2 + norms[None, :] ** 2 - 2 * gram, 0.0))
    np.fill_diagonal(distance, 0.0)
    return cosine, distance


def random_walk_variance_ratio(n_components: int) -> np.ndarray:
    """Fraction of variance the k-th principal component of a long, high-dimensional random
    walk explains: 6 / (pi^2 k^2) (Antognini & Sohl-Dickstein, 2018)."""
    k = np.arange(1, n_components + 1)
    return 6.0 / (math.pi ** 2 * k ** 2)


def fitted_components(n_rows: int, n_weights: int, n_components: int) -> int:
    """Components to fit for ``n_rows`` stacked steps of ``n_weights`` weights: enough for the
    explained-variance comparison and for ``n_components``, or a ValueError saying what to change."""
    if n_components < 1:
        raise ValueError(f"the trajectories are projected onto at least 1 component, not {n_components}")
    fitted = min(max(PCA_FITTED_COMPONENTS, n_components), n_rows - 1, n_weights)
    if fitted < n_components or fitted < 1:
        raise ValueError(f"{n_rows} stacked steps cannot give {n_components} components: use more steps "
                         "(a smaller every, or longer runs) or fewer components")
    return fitted


def shared_pca(flat: list[da.Array], *, n_components: int, fitted: int, seed: int = 0, scheduler=None,
               progress: Progress = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The PCA of several runs' trajectories in one basis: ``flat`` holds each run's (step,
    weight) rows, the same steps for every run. Returns the paths (run, step, component), the
    explained variance ratio of the ``fitted`` components, the basis (fitted, weight) and the mean."""
    n_runs, n_steps = len(flat), flat[0].shape[0]
    stacked = da.concatenate(flat)
    stacked = stacked.rechunk((PCA_BLOCK_ROWS, stacked.shape[1])).astype(np.float64)

    def stage(index: int, n: int) -> Progress:
        return None if progress is None else (lambda fraction: progress((index + fraction) / n))

    (mean,) = compute([stacked.mean(axis=0)], scheduler=scheduler, progress=stage(0, 3))
    if not np.isfinite(mean).all():  # the SVD would only say it "did not converge"
        raise ValueError("some of the runs' weights are not finite at steps compared (a diverged or damaged "
                         "store): compare runs whose weights are finite at every step")
    centred = stacked - mean
    with warnings.catch_warnings():  # dask notes the randomized SVD's dtype cast; nothing to act on
        warnings.simplefilter("ignore", category=da.PerformanceWarning)
        _, singular, basis = da.linalg.svd_compressed(centred, k=fitted, n_power_iter=2, seed=seed,
                                                      coerce_signs=True)
    singular, basis, total = compute([singular, basis, (centred ** 2).sum()], scheduler=scheduler,
                                     progress=stage(1, 3))
    basis = _fix_signs(basis)
    (projected,) = compute([centred @ basis[:n_components].T], scheduler=scheduler, progress=stage(2, 3))
    ratio = singular ** 2 / total if total > 0 else np.zeros_like(singular)
    return projected.reshape(n_runs, n_steps, n_components), ratio, basis, mean


def _fix_signs(basis: np.ndarray) -> np.ndarray:
    """Each component's sign chosen so its largest loading is positive: the same picture
    whichever machine or run order computed it."""
    largest = basis[np.arange(len(basis)), np.abs(basis).argmax(axis=1)]
    return basis * np.where(largest < 0, -1.0, 1.0)[:, None]
