import dataclasses
from pathlib import Path

import pytest

from weightlapse.pipeline.params import SWEEP_STAGE_AXES, ParamsError, TrainParams, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_reproduce_the_original_study():
    params = load_params(REPO / "params.yaml")
    assert params.data.dataset == "mnist"
    original = params.run("adam-lr0.001-b20-seed0")
    assert (original.optimizer, original.lr, original.batch_size, original.epochs, original.bias) == \
        ("adam", 0.001, 20, 1, False)
    assert original == TrainParams()
    assert params.run("adam-lr0.001-b20-seed1") == dataclasses.replace(original, seed=1)
    assert params.run("sgd-lr0.01-b20-seed0").optimizer == "sgd"


def test_repository_params_train_no_run_twice():
    params = load_params(REPO / "params.yaml")
    identities = [(params.data.dataset, config) for config in params.all_runs.values()]
    assert len(set(identities)) == len(identities) == len(params.runs) + len(params.sweep_runs)


@pytest.mark.parametrize("twin", [{"seed": 1}, {"seed": 1, "lr": "1e-3"}])
def test_a_listed_run_that_the_sweep_also_trains_is_refused_naming_both(twin):
    with pytest.raises(ParamsError, match=r"runs\.again and sweep point adam-lr0\.001-b20-seed1 have the same params"
                                          r".*remove runs\.again \(the sweep trains it as adam-lr0\.001-b20-seed1\)"):
        parse_params({"runs": {"again": twin}, "sweep": {**SWEEP, "lr": [0.001], "optimizer": ["adam"]}})


def test_two_listed_runs_with_the_same_params_are_refused_naming_both():
    with pytest.raises(ParamsError, match=r"runs\.a and runs\.b have the same params and dataset.*remove one of them"):
        parse_params({"train": {"seed": 3}, "runs": {"a": {}, "b": {"seed": 3}}})


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
        ({"runs": {"a": {"engine": "jax"}}}, r"runs\.a\.engine: 'jax' is not one of auto, numpy, torch, cuda-graph"),
        ({"runs": {"a": {"device": "tpu"}}}, r"runs\.a\.device: 'tpu' is not one of auto, cpu, cuda"),
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


SWEEP = {"dataset": ["mnist"], "optimizer": ["adam", "sgd"], "lr": [0.001, "1e-2"], "batch_size": [20], "seed": [0, 1, 2]}


def test_the_sweep_grid_expands_to_named_runs_in_dvcs_order():
    params = parse_params({"train": {"epochs": 2}, "runs": {"a": {"seed": 9}}, "sweep": SWEEP})
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
        parse_params({"runs": {"a": {"seed": 9}}, "sweep": sweep})


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
    stages = {"-".join(str(point[axis]) for axis in SWEEP_STAGE_AXES) for point in params.sweep_points.values()}
    assert sorted(sweep_stages) == sorted(f"sweep@{stage}" for stage in stages)
    dvc_yaml = (repo / "dvc.yaml").read_text()
    assert "--where dataset=${item.dataset} optimizer=${item.optimizer} batch_size=${item.batch_size}" in dvc_yaml


def write_params(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


# What a hostile or mistaken params.yaml could hold: each is refused up front, with one line
# naming the line or key and the fix.
HOSTILE_YAML = [
    pytest.param("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                 "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nruns: {r: {}}\n",
                 r"line 2 \(b\[0\]\): alias \*a refused .*; write the value out in full", id="billion-laughs"),
    pytest.param("runs: " + "[" * 100_000, r"nested too deep|nested more than 32 levels deep", id="deep-flow-one-line"),
    pytest.param("runs: " + "[ " * 100_000, r"line 1 \(runs\[0\]\[0\].*\): nested more than 32 levels deep",
                 id="deep-flow"),
    pytest.param("runs: " + "{a: " * 60_000, r"nested more than 32 levels deep", id="deep-mappings"),
    pytest.param("runs:\n  a: {}\n  b: {}\n  a: {seed: 1}\n",
                 r"line 4 \(runs\.a\): key 'a' appears twice in runs \(first on line 2\); keep one",
                 id="duplicate-run"),
    pytest.param("runs: {a: {seed: 1, lr: 0.1, seed: 2}}\n", r"key 'seed' appears twice in runs\.a",
                 id="duplicate-key"),
    pytest.param("runs:\n  yes: {}\n", r"line 2 \(runs\.yes\): yes is a boolean in YAML 1\.1 but text to DVC "
                 r"\(YAML 1\.2\); write true or false for a boolean, or quote it \('yes'\) for text",
                 id="run-named-yes"),
    pytest.param("runs:\n  a: {lr: yes}\n", r"\(runs\.a\.lr\): yes is a boolean", id="lr-yes"),
    pytest.param("train:\n  bias: on\nruns: {a: {}}\n", r"line 2 \(train\.bias\): on is a boolean", id="bias-on"),
    pytest.param("runs:\n  a: {bias: Off}\n", r"Off is a boolean", id="bias-Off"),
    pytest.param("runs:\n  a: {seed: 010}\n", r"\(runs\.a\.seed\): the number 010 reads differently in YAML 1\.1 and "
                 r"in DVC", id="octal"),
    pytest.param("runs:\n  a: {max_steps: 1_000}\n", r"the number 1_000 reads differently", id="underscore"),
    pytest.param("runs: {1: {}}\n", r"runs: the run name 1 is read as int, not text; quote it in params.yaml: '1'",
                 id="run-named-1"),
    pytest.param("runs: {~: {}}\n", r"the run name null is read as null, not text; quote it", id="run-named-null"),
    pytest.param("runs: {true: {}}\n", r"the run name true is read as bool, not text", id="run-named-true"),
    pytest.param("runs: {[a]: {}}\n", r"\(runs\): a mapping or list used as a key", id="list-as-key"),
    pytest.param("runs: {a: {}}\n# " + "x" * (256 << 10), r"more than 262,144 bytes, too large for a params file",
                 id="oversized"),
    pytest.param("runs: {a: {}}\nx: [" + "0, " * 30_000 + "]\n", r"more than 20,000 keys and values", id="many-nodes"),
    pytest.param("runs: {a: {seed: " + "9" * 5000 + "}}\n", r"a value cannot be read .*4300 digits.*write a smaller",
                 id="huge-integer"),
]


@pytest.mark.parametrize(("text", "message"), HOSTILE_YAML)
def test_hostile_yaml_is_refused_before_it_is_built(tmp_path, peak_memory, text, message):
    path = write_params(tmp_path, text)
    with peak_memory, pytest.raises(ParamsError, match=message) as raised:
        load_params(path)
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 400
    assert peak_memory.peak_bytes < 4 * len(text) + (8 << 20)  # no expansion: memory follows the file's size


@pytest.mark.parametrize(("train", "message"), [
    ("{epochs: 1000000000}", (r"train\.epochs: 1,000,000,000 epochs of 3,000 steps \(60,000 images at batch_size 20\) "
                             r"is 3,000,000,000,000 steps, more than the limit of 10,000,000; lower epochs or set "
                             r"max_steps")),
    ("{max_steps: 1000000000}", r"train\.max_steps: 1,000,000,000 is more than the limit of 10,000,000 steps"),
    ("{max_steps: 1e9}", r"train\.max_steps: expected a whole number, got '1e9'; write it in digits"),
    ("{epochs: 2.0}", r"train\.epochs: expected a whole number, got 2\.0; write it in digits"),
    ("{capture: {chunk_steps: 100000}}", (r"train\.capture\.chunk_steps: 100,000 steps of 31,360 bytes is 2,990 "
                                         r"MiB a chunk, more than the 64 MiB limit; use at most 2,139")),
    ("{max_steps: 100, capture: {chunk_steps: 500}}", (r"train\.capture\.chunk_steps: 500 steps a chunk is more "
                                                       r"than the run records \(101 steps, step 0 included\); use "
                                                       r"at most 101")),
    ("{epochs: 1000, eval_every: 1}", (r"train\.eval_every: every 1 steps of 3,000,000 is 3,000,002 held-out "
                                       r"evaluations, more than the limit of 1,000,000; use eval_every of at least 4")),
    ("{batch_size: 60001}", r"train\.batch_size: 60,001 is more than the 60,000 images of the largest training split"),
    ("{lr: true}", r"train\.lr: expected a number, got True"),
    ("{capture: {codec: zstd}}", (r"train\.capture\.codec: unknown codec 'zstd'; choose one of fast, compact \(fast: "
                                 r"Blosc LZ4, readable everywhere; compact: pcodec, smaller\)")),
    ("{capture: {codec: 7}}", r"train\.capture\.codec: "),
])
def test_absurd_sizes_are_refused_up_front(tmp_path, train, message):
    with pytest.raises(ParamsError, match=message):
        load_params(write_params(tmp_path, f"train: {train}\nruns: {{a: {{}}}}\n"))


def test_a_sweep_or_run_list_beyond_the_run_limit_is_refused_before_expanding():
    lrs = [f"0.{i:03d}1" for i in range(100)]
    sweep = {"optimizer": ["adam", "sgd"], "lr": lrs, "batch_size": [10, 20, 50], "seed": [0, 1]}
    with pytest.raises(ParamsError, match=r"sweep: the grid has 1 x 2 x 100 x 3 x 2 = 1,200 points, more than the 999 "
                                          r"runs left of the limit of 1,000; list fewer values"):
        parse_params({"runs": {"a": {"seed": 9}}, "sweep": sweep})
    with pytest.raises(ParamsError, match=r"runs: 1,001 runs, more than the limit of 1,000"):
        parse_params({"runs": {f"r{i}": {} for i in range(1001)}})


def test_bounded_params_stay_valid(tmp_path):
    # Short runs keep the default chunk; anchors without aliases expand nothing; true/false,
    # quoted yes and a quoted numeric run name are what the errors above ask for.
    params = load_params(write_params(tmp_path, (
        "train: {max_steps: 50, eval_every: 1, bias: &b false}\n"
        "runs:\n  'yes': {bias: true}\n  '1': {capture: {chunk_steps: 64}}\n"
        "  long: {epochs: 3000, batch_size: 20, max_steps: null, eval_every: 100}\n"
        "  wide: {batch_size: 60000, epochs: 5000, max_steps: null, eval_every: 100, capture: {chunk_steps: 2139}}\n"
    )))
    assert params.run("yes").bias is True and params.run("1").capture.chunk_steps == 64
    assert params.run("long").max_n_steps == 9_000_000
    assert params.run("1").max_n_steps == 50


def test_the_capture_codec_is_fast_unless_compact_is_asked_for(tmp_path):
    from weightlapse.pipeline.params import CAPTURE_CODECS
    from weightlapse.pipeline.store import CODECS

    assert CAPTURE_CODECS == CODECS  # the store writes every codec params accept, and no other
    params = load_params(write_params(tmp_path, "train: {capture: {codec: compact}}\nruns: {a: {}, b: {capture: "
                                                "{codec: fast}}, c: {seed: 1}}\n"))
    assert params.run("a").capture.codec == "compact" and params.run("b").capture.codec == "fast"
    assert TrainParams().capture.codec == "fast"


def test_runs_and_sweep_points_name_their_dataset_and_names_carry_it_for_several(tmp_path):
    from idx_files import declaration, write_dataset

    write_dataset(tmp_path / "files")
    params = parse_params({
        "data": {"dataset": "mnist"},
        "datasets": {"mnist": {}, "fashion-mnist": None, "my-set": declaration(tmp_path / "files")},
        "runs": {"a": {"seed": 9}, "b": {"seed": 9, "dataset": "my-set"}},
        "sweep": {**SWEEP, "dataset": ["fashion-mnist", "my-set"], "optimizer": ["adam"], "lr": [0.001]},
    })
    assert params.dataset_of("a").name == "mnist" and params.dataset_of("b").class_names[0] == "class-0"
    assert list(params.sweep_runs) == [f"{dataset}-adam-lr0.001-b20-seed{seed}"
                                       for dataset in ("fashion-mnist", "my-set") for seed in (0, 1, 2)]
    assert params.dataset_of("my-set-adam-lr0.001-b20-seed2").name == "my-set"
    assert set(params.datasets) == {"mnist", "fashion-mnist", "my-set"}
    # One dataset in the grid: today's names, and a run on another dataset is no twin.
    one = parse_params({"runs": {"a": {"dataset": "fashion-mnist"}}, "sweep": {**SWEEP, "optimizer": ["adam"]}})
    assert "adam-lr0.001-b20-seed0" in one.sweep_runs and one.dataset_of("adam-lr0.001-b20-seed0").name == "mnist"


@pytest.mark.parametrize(("raw", "message"), [
    ({"runs": {"a": {"dataset": "kmnist"}}},
     r"runs\.a\.dataset: unknown dataset 'kmnist'; choose one of fashion-mnist, mnist, or declare it under datasets"),
    ({"datasets": {"mnist": {}}, "runs": {"a": {"dataset": "fashion-mnist"}}},
     r"runs\.a\.dataset: unknown dataset 'fashion-mnist'; choose one of mnist, or add it to datasets"),
    ({"datasets": {"mnist": {}}, "runs": {"a": {}}, "sweep": {**SWEEP, "dataset": ["mnist", "fashion-mnist"]}},
     r"sweep \(fashion-mnist-adam-lr0\.001-b20-seed0\): unknown dataset 'fashion-mnist'"),
    ({"data": {"dataset": "cifar"}, "runs": {"a": {}}}, r"data\.dataset: unknown dataset 'cifar'"),
    ({"datasets": {"../x": {}}, "runs": {"a": {}}}, r"datasets: '\.\./x' is not a usable dataset name"),
    ({"datasets": {"kmnist": {"files": {}}}, "runs": {"a": {}}}, r"datasets\.kmnist: missing class_names"),
    ({"datasets": {}, "runs": {"a": {}}}, r"datasets: list 1-20 datasets"),
    ({"train": {"dataset": "mnist"}, "runs": {"a": {}}}, r"train: unknown key\(s\) dataset"),
])
def test_a_dataset_the_data_stage_does_not_fetch_is_refused_with_the_fix(raw, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(raw)


def test_the_same_params_on_two_datasets_are_two_runs():
    params = parse_params({"runs": {"a": {}, "b": {"dataset": "fashion-mnist"}}})
    assert params.run("a") == params.run("b") and params.dataset_of("b").name == "fashion-mnist"


@pytest.mark.parametrize(("train", "message"), [
    ({"hidden": 32}, r"train\.hidden: expected a list of whole numbers, e\.g\. \[32\] \(or \[\] for none\), got 32"),
    ({"hidden": [32, "wide"]}, r"train\.hidden\[1\]: expected a whole number, got 'wide'"),
    ({"hidden": [0]}, r"train\.hidden: a layer of width 0; each width is 1 to 4,096 units"),
    ({"hidden": [4097]}, r"train\.hidden: a layer of width 4,097; each width is 1 to 4,096 units"),
    ({"hidden": [8] * 5}, r"train\.hidden: 5 hidden layers, more than the limit of 4"),
    ({"hidden": [8], "activation": "gelu"}, r"train\.activation: 'gelu' is not one of relu, tanh"),
    ({"activation": "sigmoid"}, r"train\.activation: 'sigmoid' is not one of relu, tanh"),  # a typo is one without layers too
    ({"hidden": [8], "capture": {"gradients": True}}, r"train\.capture: a network store .* without gradients"),
    ({"hidden": [4096] * 4}, r"train\.hidden: 3,000 steps of 214,335,488 bytes of parameters is more than the limit"),
])
def test_bad_hidden_layers_name_the_key_and_the_fix(train, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"train": train, "runs": {"a": {}}})


def test_hidden_layers_are_a_run_param_and_softmax_regression_records_as_before():
    params = parse_params({"train": {"max_steps": 10}, "runs": {
        "mlp": {"hidden": [32, 16], "activation": "tanh"}, "softmax": {}, "wide": {"hidden": [4096] * 4}}})
    mlp, softmax = params.run("mlp"), params.run("softmax")
    assert (mlp.hidden, mlp.activation) == ((32, 16), "tanh") and (softmax.hidden, softmax.activation) == ((), "relu")
    assert mlp.to_dict()["hidden"] == (32, 16) and mlp.to_dict()["activation"] == "tanh"
    # hidden: [] (the default) records the params it recorded before networks: no hidden, no activation
    assert "hidden" not in softmax.to_dict() and "activation" not in softmax.to_dict()


def test_an_activation_without_hidden_layers_trains_the_same_run():
    with pytest.raises(ParamsError, match=r"runs\.a and runs\.b have the same params"):
        parse_params({"runs": {"a": {}, "b": {"activation": "tanh"}}})
    parse_params({"runs": {"a": {"hidden": [4]}, "b": {"hidden": [4], "activation": "tanh"}}})  # two networks
