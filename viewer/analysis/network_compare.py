"""Compare runs of one network, with each run's hidden units matched to the reference run's.

    weightlapse compare runs --runs mlp-32-seed0 mlp-32-seed1 --out comparison.zarr [--unmatched]

(``weightlapse compare`` compares network runs this way). Headless use, for research scripts::

    from weightlapse.viewer.analysis.runs import RunCatalog
    from weightlapse.viewer.analysis import network_compare
    catalog = RunCatalog("runs")
    runs = {name: catalog.open(name) for name in ("mlp-32-seed0", "mlp-32-seed1", "mlp-32-seed2")}
    result = network_compare.compare_networks(runs, every=10)
    result.distance_to_reference      # (other_run, step): L2 distance, hidden units matched
    result.unmatched_distance         # (other_run, step): the same without matching
    result.cosine                     # (run, other) at the last shared step, matched
    result.pca_path                   # (run, step, component), one shared basis

Why match units. A network computes the same function when the units of a hidden layer
are reordered: the rows of that layer's weight and bias and the columns of the next
layer's weight, permuted alike. Runs from different seeds learn similar units in
different orders, so the raw distance between two runs measures that order too (matching
took 27 to 29% off the distances between three seeds of a 32-unit MLP after 600 Adam steps
of Fashion-MNIST). So each run other than the reference
is first relabelled: the permutation of every hidden layer's units that makes its weights
closest to the reference's (weight matching, Ainsworth, Hayase & Srinivasa, "Git
Re-Basin: merging models modulo permutation symmetries", ICLR 2023: coordinate descent over
the layers, each step an assignment problem), found at the last shared step and applied
to every step. A relabelled run is the same network, computing the same function at every
step; only the names of its units change. The unmatched distances stay in the result, so
a reader sees how much of the raw distance was only the order.

Matching applies to a chain of linear layers (the train stage's MLPs, a recorded
``nn.Sequential`` of ``Linear`` layers), assuming what lies between them acts on each unit
alone (ReLU, tanh, dropout); for any other model the runs are compared unmatched, and
``attrs["matching"]`` says why.
"""

from __future__ import annotations

from collections.abc import Mapping

import dask.array as da
import numpy as np
import xarray as xr
from scipy.optimize import linear_sum_assignment

from weightlapse.pipeline.cluster import compute
from weightlapse.viewer.analysis.geometry import (
    PCA_CAVEAT,
    Progress,
    compared_steps,
    fitted_components,
    pairwise_similarity,
    random_walk_variance_ratio,
    shared_pca,
)
from weightlapse.viewer.analysis.network import LinearLayer, NetworkRun, linear_chain, layout_problem

# Rounds of coordinate descent over the hidden layers at most; each round can only raise the
# matched inner product, and a one-hidden-layer network is done in one.
MATCHING_ROUNDS = 50
# Units of a hidden layer matched at most: the assignment problem is a units x units matrix,
# solved in about 0.2 s at 2,048 units (and growing with the cube).
MAX_MATCHED_UNITS = 4096


def match_units(reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray],
                chain: tuple[LinearLayer, ...]) -> list[np.ndarray]:
    """For each hidden layer (every layer of ``chain`` but the last), the permutation of
    ``other``'s units that brings its weights closest to ``reference``'s: unit ``perm[i]`` of
    ``other`` plays unit ``i`` of ``reference``. Both map parameter names to one step's values.

    Weight matching: it maximises the summed inner products of the two networks' weights and
    biases (equivalently, minimises their L2 distance), one layer at a time with the other
    layers' permutations held, until no layer changes."""
    ref = {name: np.asarray(values, dtype=np.float64) for name, values in reference.items()}
    oth = {name: np.asarray(values, dtype=np.float64) for name, values in other.items()}
    hidden = len(chain) - 1
    perms = [np.arange(layer.units) for layer in chain[:hidden]]
    for _ in range(MATCHING_ROUNDS):
        changed = False
        for index in range(hidden):
            layer, following = chain[index], chain[index + 1]
            incoming = oth[layer.weight] if index == 0 else oth[layer.weight][:, perms[index - 1]]
            score = ref[layer.weight] @ incoming.T  # (reference unit, other unit)
            if layer.bias is not None:
                score += np.outer(ref[layer.bias], oth[layer.bias])
            outgoing = oth[following.weight] if index + 1 == hidden else oth[following.weight][perms[index + 1]]
            score += ref[following.weight].T @ outgoing
            _, columns = linear_sum_assignment(score, maximize=True)
            if not np.array_equal(columns, perms[index]):
                perms[index], changed = columns, True
        if not changed:
            break
    return perms


def relabelling(chain: tuple[LinearLayer, ...], perms: list[np.ndarray]) -> dict[str, tuple]:
    """{parameter: (row order, column order)} that relabel a run's units by ``perms``
    (None where an axis keeps its order)."""
    orders: dict[str, tuple] = {}
    for index, layer in enumerate(chain):
        rows = perms[index] if index < len(perms) else None
        columns = perms[index - 1] if index > 0 else None
        orders[layer.weight] = (rows, columns)
        if layer.bias is not None:
            orders[layer.bias] = (rows, None)
    return orders


def relabelled(values, order: tuple):
    """(step, out, in) or (step, out) values with their units in ``order``'s (rows, columns)."""
    rows, columns = order
    if rows is not None:
        values = values[:, rows]
    if columns is not None:
        values = values[:, :, columns]
    return values


def _check_networks(runs: Mapping[str, NetworkRun]) -> tuple[list[str], int]:
    names = list(runs)
    if len(names) < 2:
        raise ValueError(f"give at least 2 network runs to compare, got {len(names)}")
    reference = runs[names[0]]
    for name in names[1:]:
        problem = layout_problem(reference, runs[name])
        if problem:
            raise ValueError(problem)
    n_steps = min(run.last_step for run in runs.values()) + 1
    if n_steps < 1:
        empty = next(name for name, run in runs.items() if run.last_step < 0)
        raise ValueError(f"run {empty!r} has no valid step yet; compare runs once they have steps")
    return names, n_steps


def chain_to_match(chain: tuple[LinearLayer, ...] | str, values: Mapping[str, Mapping[str, np.ndarray]],
                   step: int) -> tuple[LinearLayer, ...] | str:
    """``chain`` (network.linear_chain's) if the runs' units can be matched from their ``values``
    ({run: {parameter: values}}) at ``step``, else why not, in words."""
    for name, parameters in values.items():
        for parameter, array in parameters.items():
            if not np.isfinite(array).all():
                return f"{name}'s {parameter} is not finite at step {step:,}"
    if isinstance(chain, str):
        return chain
    wide = next((layer for layer in chain[:-1] if layer.units > MAX_MATCHED_UNITS), None)
    if wide is not None:
        return f"{wide.weight} has {wide.units:,} units, more than the {MAX_MATCHED_UNITS:,} matched at most"
    return chain


def _std_over_runs(*blocks: np.ndarray) -> np.ndarray:
    # one task per block of steps, all runs at once: dask's generic std over a stacked axis took
    # 1.4 times as long (docs/benchmarks.md, "Comparing network runs")
    return np.stack(blocks).std(axis=0, ddof=1)


def compare_networks(runs: Mapping[str, NetworkRun], *, every: int = 1, match: bool = True, n_components: int = 2,
                     scheduler=None, progress: Progress = None) -> xr.Dataset:
    """Distance of each run to the first over the shared steps, the spread across the runs,
    their similarity at the last shared step and their trajectories in one PCA basis, with
    hidden units matched to the first run's (``match``, where the model allows: module docstring).

    ``distance_to_reference`` (other_run, step) is of the matched runs, ``unmatched_distance``
    of the runs as recorded; ``distance_per_parameter`` (other_run, parameter) is the matched
    distance at the last shared step. ``attrs["matching"]`` says how units were matched, or why not."""
    names, n_steps = _check_networks(runs)
    steps = compared_steps(n_steps, every)
    last = n_steps - 1
    reference = runs[names[0]]
    parameters = list(reference.names)
    at_last = {name: {parameter: run.values_at(parameter, last) for parameter in parameters}
               for name, run in runs.items()}
    diverged = next(((name, parameter) for name, values in at_last.items() for parameter, array in values.items()
                     if not np.isfinite(array).all()), None)
    if diverged:
        raise ValueError(f"{diverged[0]}'s {diverged[1]} is not finite at step {last:,}: the run diverged, and its "
                         "steps cannot be compared")
    chain = chain_to_match(linear_chain(reference.parameters), at_last, last) if match else "not asked for"
    matched = not isinstance(chain, str) and len(chain) > 1
    orders: dict[str, dict[str, tuple]] = {name: {} for name in names}
    moved_units = {}
    if matched:
        for name in names[1:]:
            perms = match_units(at_last[names[0]], at_last[name], chain)
            orders[name] = relabelling(chain, perms)
            moved_units[name] = int(sum((perm != np.arange(len(perm))).sum() for perm in perms))

    def trajectory(name: str, parameter: str, relabel: bool) -> da.Array:
        values = runs[name].values(parameter, 0, last)
        values = values if len(steps) == n_steps else values[steps]
        order = orders[name].get(parameter) if relabel else None
        return (relabelled(values, order) if order else values).astype(np.float64).reshape(len(steps), -1)

    flat = {name: da.concatenate([trajectory(name, parameter, True) for parameter in parameters], axis=1)
            for name in names}
    raw = {name: da.concatenate([trajectory(name, parameter, False) for parameter in parameters], axis=1)
           for name in names[1:]}
    squared = [((flat[name] - flat[names[0]]) ** 2).sum(axis=1) for name in names[1:]]
    unmatched = [((raw[name] - flat[names[0]]) ** 2).sum(axis=1) for name in names[1:]]
    blocks = [flat[name].rechunk(flat[names[0]].chunks) for name in names]
    spread = da.map_blocks(_std_over_runs, *blocks, dtype=np.float64).mean(axis=1)
    n_parts = 4

    def part(index: int) -> Progress:
        return None if progress is None else (lambda fraction: progress((index + fraction) / n_parts))

    *distances, mean_spread = compute([*squared, *unmatched, spread], scheduler=scheduler, progress=part(0))
    matched_sq, unmatched_sq = np.stack(distances[:len(names) - 1]), np.stack(distances[len(names) - 1:])

    last_rows = {name: {parameter: relabelled(at_last[name][parameter][None], orders[name][parameter])[0]
                        if parameter in orders[name] else at_last[name][parameter] for parameter in parameters}
                 for name in names}
    per_parameter = np.array([[np.sqrt(((last_rows[name][parameter].astype(np.float64)
                                         - last_rows[names[0]][parameter]) ** 2).sum()) for parameter in parameters]
                              for name in names[1:]])
    cosine, distance = pairwise_similarity(np.stack([np.concatenate([last_rows[name][parameter].ravel()
                                                                     for parameter in parameters]) for name in names]))
    n_weights = int(flat[names[0]].shape[1])
    fitted = fitted_components(len(names) * len(steps), n_weights, n_components)
    path, ratio, _, _ = shared_pca([flat[name] for name in names], n_components=n_components, fitted=fitted,
                                   scheduler=scheduler,
                                   progress=None if progress is None else (lambda f: progress((1 + 3 * f) / n_parts)))
    if matched:
        layers = [layer.weight.rpartition(".")[0] for layer in chain[:-1]]
        layers = [f"layer {name}" if name.isdigit() else name for name in layers]  # an nn.Sequential's
        how = (f"hidden units of {', '.join(layers)} matched to "
               f"{names[0]}'s by weight matching at step {last:,}")
    elif isinstance(chain, str):
        how = f"units not matched: {chain}"
    else:
        how = "units not matched: the model has no hidden layer"
    others = np.array(names[1:], dtype=object)
    result = xr.Dataset(
        {"distance_to_reference": (("other_run", "step"), np.sqrt(matched_sq)),
         "unmatched_distance": (("other_run", "step"), np.sqrt(unmatched_sq)),
         "distance_per_parameter": (("other_run", "parameter"), per_parameter),
         "moved_units": ("other_run", np.array([moved_units.get(name, 0) for name in names[1:]])),
         "mean_spread": ("step", mean_spread),
         "cosine": (("run", "other"), cosine), "distance": (("run", "other"), distance),
         "pca_path": (("run", "step", "component"), path),
         "explained_variance_ratio": ("fitted", ratio),
         "random_walk_ratio": ("fitted", random_walk_variance_ratio(fitted))},
        coords={"run": np.array(names, dtype=object), "other": np.array(names, dtype=object), "other_run": others,
                "step": steps, "parameter": np.array(parameters, dtype=object), "component": np.arange(1, n_components + 1),
                "fitted": np.arange(1, fitted + 1)},
        attrs={"reference_run": names[0], "runs": names, "similarity_step": last, "matched": int(matched),
               "matching": how, "hidden_units": int(sum(layer.units for layer in chain[:-1])) if matched else 0,
               "caveat": PCA_CAVEAT})
    if progress:
        progress(1.0)
    return result
