"""Scale-out for real: a multi-process dask.distributed LocalCluster and an S3 server (moto) on
127.0.0.1. Runs are trained by the real train stage, published to S3 and trained on the
cluster from a sweep; statistics and comparisons computed on the cluster from S3 must
equal the local ones. Nothing here talks to the internet."""

import dataclasses
import socket

import boto3
import distributed
import fsspec
import moto.server as moto_server
import numpy as np
import pytest
import xarray as xr

from weightlapse.pipeline.datasets import load_dataset
from weightlapse.pipeline.locations import Location, publish_run
from weightlapse.pipeline.params import parse_params
from weightlapse.pipeline.sweep import MAX_STACK_RUNS, dispatch, plan_tasks, sweep_runs
from weightlapse.pipeline.train import run_training
from weightlapse.pipeline.store import open_run
from weightlapse.viewer.analysis import compare
from weightlapse.viewer.analysis.runs import RunCatalog
from weightlapse.viewer.analysis.stats import change_statistics

pytestmark = pytest.mark.slow  # a Dask cluster and an S3 server

BUCKET = "weightlapse-test"
PARAMS = {
    "data": {"dataset": "mnist"},
    "train": {"device": "cpu", "epochs": 3, "eval_every": 10, "capture": {"chunk_steps": 8}},
    "runs": {"listed": {"seed": 5}},
    "sweep": {"optimizer": ["adam"], "lr": [0.001, 0.01], "batch_size": [20], "seed": [0, 1]},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3-compatible server on 127.0.0.1 with one empty bucket; yields the storage options."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield options
    server.stop()


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes, one thread each: every task crosses a process boundary."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as local_cluster:
        yield local_cluster.scheduler_address


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The sweep's four runs, trained here by the real train stage on generated IDX data."""
    from idx_files import write_dataset

    root = tmp_path_factory.mktemp("sweep")
    write_dataset(root / "data", n_train=400, n_test=50)
    params = parse_params(PARAMS)
    dataset = load_dataset(root / "data", "mnist")
    for name, config in params.sweep_runs.items():
        run_training(config, dataset, root / "runs" / name, run_name=name, progress=False)
    return root, params


def test_runs_published_to_s3_read_back_exactly(trained, s3):
    root, params = trained
    for name in params.sweep_runs:
        publish_run(root / "runs" / name, Location(f"s3://{BUCKET}/published/{name}", s3))
    catalog = RunCatalog(f"s3://{BUCKET}/published", s3)
    index = catalog.index()
    assert sorted(index.index) == sorted(params.sweep_runs) and (index.state == "finished").all()
    assert (index["metric.heldout_accuracy"] >= 0).all()
    name = "adam-lr0.01-b20-seed1"
    remote, local = open_run(catalog.location(name)), open_run(root / "runs" / name)
    assert remote.sizes["step"] == 61
    assert np.array_equal(remote.weights.values.view(np.int32), local.weights.values.view(np.int32))
    run = catalog.open(name)
    assert np.array_equal(run.weights_at(37), local.weights.values[37])


def test_statistics_and_comparisons_on_the_cluster_from_s3_equal_the_local_ones(trained, s3, cluster):
    root, params = trained
    names = list(params.sweep_runs)
    for name in names:
        publish_run(root / "runs" / name, Location(f"s3://{BUCKET}/cmp/{name}", s3))
    remote = RunCatalog(f"s3://{BUCKET}/cmp", s3)
    local = RunCatalog(root / "runs")

    on_cluster = change_statistics(open_run(remote.location(names[0])).weights, scheduler=cluster)
    here = change_statistics(open_run(local.location(names[0])).weights)
    xr.testing.assert_allclose(on_cluster, here, rtol=1e-12)

    fractions = []
    cluster_result = compare.compare_runs(compare.open_trajectories(remote, names), scheduler=cluster,
                                          progress=fractions.append)
    local_result = compare.compare_runs(compare.open_trajectories(local, names))
    for variable in ("distance_to_reference", "mean_spread", "spread", "cosine", "distance",
                     "explained_variance_ratio", "pca_components", "pca_path"):
        np.testing.assert_allclose(cluster_result[variable], local_result[variable], rtol=1e-9, atol=1e-12,
                                   err_msg=variable)
    assert fractions[-1] == pytest.approx(1.0)


def test_a_sweep_dispatched_to_the_cluster_trains_every_run_into_s3_bit_for_bit(trained, s3, cluster):
    root, params = trained
    out = Location(f"s3://{BUCKET}/dispatched", s3)
    result = dispatch(sweep_runs(params), data_dir=root / "data", dataset_name="mnist", out=out,
                      scheduler=cluster)
    assert sorted(result.metrics) == sorted(params.sweep_runs)
    assert result.run_steps == 4 * 60 and result.run_steps_per_s > 0
    catalog = RunCatalog(out)
    for name in params.sweep_runs:
        dispatched, here = open_run(catalog.location(name)), open_run(root / "runs" / name)
        assert dispatched.attrs["progress"]["finished"]
        assert np.array_equal(dispatched.weights.values.view(np.int32), here.weights.values.view(np.int32)), name
    assert fsspec.filesystem("s3", **s3).exists(f"{BUCKET}/dispatched/{name}/metrics.json")


def test_a_sweep_trains_runs_that_differ_in_seed_and_lr_as_stacks_on_every_worker():
    params = parse_params({**PARAMS, "sweep": {"optimizer": ["adam", "sgd"], "lr": [0.001, 0.01], "batch_size": [20],
                                               "seed": [0, 1, 2]}})
    runs = sweep_runs(params)
    tasks = plan_tasks(runs, slots=2)
    assert [sorted({name.split("-")[0] for name in task}) for task in tasks] == [["adam"], ["sgd"]]
    assert [len(task) for task in tasks] == [6, 6]
    assert sorted(len(task) for task in plan_tasks(runs, slots=4)) == [3, 3, 3, 3]  # no worker left idle
    assert len(plan_tasks(runs, slots=100)) == 12
    autograd = {name: dataclasses.replace(config, engine="torch") for name, config in list(runs.items())[:2]}
    assert [len(task) for task in plan_tasks(autograd, slots=1)] == [1, 1]  # only the numpy engine stacks
    many = {f"seed-{seed}": params.train for seed in range(2 * MAX_STACK_RUNS + 1)}
    sizes = [len(task) for task in plan_tasks(many, slots=1)]  # as few stacks as the limit allows, even
    assert len(sizes) == 3 and max(sizes) <= MAX_STACK_RUNS and max(sizes) - min(sizes) <= 1 and sum(sizes) == len(many)


def test_an_unreachable_scheduler_says_how_to_start_one(trained, monkeypatch):
    from weightlapse.pipeline import cluster
    from weightlapse.pipeline.cluster import ClusterError

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2)
    root, params = trained
    weights = open_run(root / "runs" / next(iter(params.sweep_runs))).weights
    with pytest.raises(ClusterError, match="dask scheduler"):
        change_statistics(weights, scheduler=f"tcp://127.0.0.1:{free_port()}")


def test_the_viewer_replays_and_compares_runs_in_s3(trained, s3, monkeypatch):
    """`panel serve viewer/ --args --runs s3://...`: the endpoint and keys come from fsspec's config."""
    import asyncio

    import holoviews as hv

    from weightlapse.viewer.app import WeightViewer
    from weightlapse.viewer.tiles import tile_view

    hv.extension("bokeh")
    root, params = trained
    names = list(params.sweep_runs)
    for name in names:
        publish_run(root / "runs" / name, Location(f"s3://{BUCKET}/viewer/{name}", s3))
    monkeypatch.setitem(fsspec.config.conf, "s3", s3)  # as FSSPEC_S3_ENDPOINT_URL etc. would set it
    viewer = WeightViewer(f"s3://{BUCKET}/viewer")
    assert viewer.picker.run_select.options == sorted(names)
    viewer.state.run = names[1]
    viewer.state.step = 42
    assert np.array_equal(tile_view(viewer.state, viewer.store).tiles,
                          open_run(root / "runs" / names[1]).weights.values[42])
    viewer.state.mode = "compare"
    assert viewer.comparison.runs_choice.value == ["adam-lr0.001-b20-seed0", "adam-lr0.001-b20-seed1"]
    asyncio.run(viewer.comparison.compute())
    assert viewer.comparison.result().sizes["run"] == 2
