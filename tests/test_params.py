from pathlib import Path

import pytest

from pipeline.params import ParamsError, TrainParams, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_reproduce_the_original_study():
    params = load_params(REPO / "params.yaml")
    assert params.data.dataset == "mnist"
    original = params.run("original")
    assert (original.optimizer, original.lr, original.batch_size, original.epochs, original.bias) == \
        ("adam", 0.001, 20, 1, False)
    assert original == TrainParams()
    assert {"original", "seed-1", "sgd"} <= set(params.runs)
    assert params.run("seed-1").seed != original.seed
    assert params.run("sgd").optimizer == "sgd"


def test_run_overrides_merge_over_train_defaults():
    params = parse_params({
        "train": {"lr": 0.01, "capture": {"chunk_steps": 16}},
        "runs": {"a": {"seed": 3, "capture": {"gradients": True}}, "b": None},
    })
    a = params.run("a")
    assert (a.lr, a.seed, a.capture.chunk_steps, a.capture.gradients) == (0.01, 3, 16, True)
    assert params.run("b").seed == 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"runs": {"a": {"learning_rate": 0.1}}}, r"runs\.a: unknown key\(s\) learning_rate; known keys: .*lr"),
        ({"trian": {}, "runs": {"a": {}}}, r"unknown key\(s\) trian"),
        ({"data": {"dataset": "cifar"}, "runs": {"a": {}}},
         r"data\.dataset: unknown dataset 'cifar'; choose one of fashion-mnist, mnist"),
        ({"train": {"batch_size": 0}, "runs": {"a": {}}}, r"train\.batch_size: must be at least 1, got 0"),
        ({"runs": {"a": {"lr": -0.1}}}, r"runs\.a\.lr: must be a positive number"),
        ({"runs": {"a": {"optimizer": "lbfgs"}}}, r"runs\.a\.optimizer: unknown optimizer 'lbfgs'"),
        ({"runs": {"a": {"batch_size": 2.5}}}, r"runs\.a\.batch_size: expected a whole number"),
        ({"runs": {"a": {"bias": "yes"}}}, r"runs\.a\.bias: expected true or false"),
        ({"runs": {"a": {"optimizer": "adam", "momentum": 0.9}}}, r"adam has no momentum"),
        ({"runs": {"a": {"capture": {"chunk_steps": 0}}}}, r"runs\.a\.capture\.chunk_steps: must be at least 1"),
        ({"runs": {"../evil": {}}}, r"not a usable run name"),
        ({"runs": {}}, r"'runs' is missing or empty"),
        ([1, 2], r"expected a mapping"),
    ],
)
def test_bad_params_name_the_key_and_the_fix(raw, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(raw)


def test_lr_written_in_exponent_notation_is_a_number():
    assert parse_params({"runs": {"a": {"lr": "1e-3"}}}).run("a").lr == 0.001


def test_unknown_run_and_missing_file(tmp_path):
    params = parse_params({"runs": {"a": {}}})
    with pytest.raises(ParamsError, match="run 'b' is neither listed under 'runs'.*runs: a; sweep: \\(none\\)"):
        params.run("b")
    with pytest.raises(FileNotFoundError, match="no params file"):
        load_params(tmp_path / "params.yaml")


def test_broken_yaml_is_a_params_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("runs: {a: [\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


SWEEP = {"optimizer": ["adam", "sgd"], "lr": [0.001, "1e-2"], "batch_size": [20], "seed": [0, 1, 2]}


def test_the_sweep_grid_expands_to_named_runs_in_dvcs_order():
    params = parse_params({"train": {"epochs": 2}, "runs": {"a": {}}, "sweep": SWEEP})
    assert list(params.sweep_runs)[:4] == ["adam-lr0.001-b20-seed0", "adam-lr0.001-b20-seed1",
                                           "adam-lr0.001-b20-seed2", "adam-lr1e-2-b20-seed0"]
    assert len(params.sweep_runs) == 12
    run = params.run("sgd-lr1e-2-b20-seed2")  # named as YAML wrote the value, as dvc.yaml's ${item.lr} is
    assert (run.optimizer, run.lr, run.batch_size, run.seed, run.epochs) == ("sgd", 0.01, 20, 2, 2)
    assert set(params.all_runs) == {"a", *params.sweep_runs}


@pytest.mark.parametrize("sweep, message", [
    ({**SWEEP, "lr": []}, r"sweep.lr: expected a non-empty list"),
    ({**SWEEP, "seed": 3}, r"sweep.seed: expected a non-empty list"),
    ({k: v for k, v in SWEEP.items() if k != "batch_size"}, r"sweep: axis batch_size is missing"),
    ({**SWEEP, "momentum": [0.9]}, r"sweep: unknown key\(s\) momentum"),
    ({**SWEEP, "optimizer": ["adam", "lion"]}, r"unknown optimizer 'lion'"),
    ({**SWEEP, "seed": [1, 1]}, r"sweep.seed: a value is listed twice"),
])
def test_a_bad_sweep_names_the_axis_and_the_fix(sweep, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"runs": {"a": {}}, "sweep": sweep})


def test_a_run_named_like_a_sweep_point_is_refused():
    with pytest.raises(ParamsError, match="adam-lr0.001-b20-seed0 is also a point of the sweep grid"):
        parse_params({"runs": {"adam-lr0.001-b20-seed0": {}}, "sweep": SWEEP})


def test_the_shipped_sweep_has_at_least_12_runs_and_dvc_names_them_alike():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    params = load_params(repo / "params.yaml")
    assert len(params.sweep_runs) >= 12
    listed = subprocess.run([str(Path(sys.executable).parent / "dvc"), "stage", "list", "--name-only"], cwd=repo,
                            capture_output=True, text=True, check=True, env={**__import__("os").environ,
                                                                              "DVC_NO_ANALYTICS": "1"}).stdout
    sweep_stages = [line for line in listed.split() if line.startswith("sweep@")]
    assert len(sweep_stages) == len(params.sweep_runs)
    dvc_yaml = (repo / "dvc.yaml").read_text()
    assert "--run ${item.optimizer}-lr${item.lr}-b${item.batch_size}-seed${item.seed}" in dvc_yaml
