"""Recording your own PyTorch loop (pipeline/recorder.py, pipeline/network_writer.py): the
README's example as it is, every parameter of the usual layers, bit for bit, through
``open_run``, plain xarray and the runs index; a loop that fails or a process that dies
leaves the steps recorded so far."""

import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import weightlapse
from weightlapse import Recorder, open_run
from weightlapse.pipeline.recorder import Recorder as RecorderClass
from weightlapse.pipeline.runlock import RunLockedError
from weightlapse.pipeline.store import STORE_NAME, TrajectoryError, check_store
from weightlapse.viewer.analysis.runs import RunCatalog

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Record your own training loop"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()
            if tensor.is_floating_point()}


def assert_row_is(ds: xr.Dataset, step: int, expected: dict[str, np.ndarray]) -> None:
    for name, values in expected.items():
        stored = ds[name].isel(step=step).values
        assert stored.view(np.uint32).tobytes() == values.view(np.uint32).tobytes(), (name, step)


def test_the_readme_example_records_rows_0_1_and_the_last_bit_for_bit(tmp_path, monkeypatch):
    # The example runs unchanged; a spy keeps copies of the model's parameters as the loop
    # sees them when the recorder starts and after each step.
    seen: dict[int, dict[str, np.ndarray]] = {}
    start, step = RecorderClass.__init__, RecorderClass.step

    def spy_init(self, run_dir, model, **options):
        self.spied_model = model
        seen[0] = state(model)
        start(self, run_dir, model, **options)

    def spy_step(self, loss=None):
        step(self, loss)
        seen[self.steps] = state(self.spied_model)
        seen.pop(self.steps - 1, None) if self.steps > 2 else None  # keep rows 0, 1 and the newest

    monkeypatch.setattr(RecorderClass, "__init__", spy_init)
    monkeypatch.setattr(RecorderClass, "step", spy_step)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102 - our own README

    ds = namespace["ds"]
    last = max(seen)
    assert last == 300 and ds.sizes["step"] == 301 and namespace["first_layer"].shape == (301, 32, 784)
    for row in (0, 1, last):
        assert_row_is(ds, row, seen[row])
    assert list(ds.data_vars) == ["0.weight", "0.bias", "2.weight", "2.bias", "loss"]
    assert np.isnan(ds.loss[0]) and np.isfinite(ds.loss[1:]).all()
    info = RunCatalog(tmp_path / "runs").describe("my-mlp")
    assert (info.state, info.steps_done, info.params) == ("finished", 300, {"lr": 1e-3, "batch_size": 20,
                                                                             "optimizer": "adam"})
    # The arrays end at the last step: plain xarray sees the run as open_run does, without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = xr.open_zarr(tmp_path / "runs" / "my-mlp" / STORE_NAME)
    assert plain.sizes["step"] == 301
    assert np.array_equal(plain["2.weight"].values, ds["2.weight"].values)


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.norm = torch.nn.LayerNorm(4 * 26 * 26)
        self.head = torch.nn.Linear(4 * 26 * 26, 10, bias=False)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.bn(self.conv(x))).flatten(1))) * self.scale


def train(model, rec, steps, *, seed=0, fail_at=None):
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for t in range(1, steps + 1):
        x, y = torch.rand(8, 1, 28, 28, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if t == fail_at:
            raise RuntimeError("the data loader broke")
        rec.step(loss=loss)


@pytest.mark.parametrize("codec", ["fast", "compact"])
def test_every_parameter_and_float_buffer_of_conv_and_norm_layers_is_recorded(tmp_path, codec):
    torch.manual_seed(1)
    model = ConvNet()
    with Recorder(tmp_path / "conv", model, codec=codec) as rec:
        train(model, rec, 5)
    ds = open_run(tmp_path / "conv")
    assert_row_is(ds, 5, state(model))
    for name in ("conv.weight", "scale"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr's note that pcodec is outside the Zarr v3 spec
            codecs = [each.to_dict()["name"] for each in zarr.open_array(tmp_path / "conv" / STORE_NAME / name).metadata.codecs]
        assert ("numcodecs.pcodec" in codecs) == (codec == "compact"), (name, codecs)
    expected = {"conv.weight": ((4, 1, 3, 3), "weight", "Conv2d"), "conv.bias": ((4,), "bias", "Conv2d"),
                "bn.weight": ((4,), "weight", "BatchNorm2d"), "bn.bias": ((4,), "bias", "BatchNorm2d"),
                "norm.weight": ((2704,), "weight", "LayerNorm"), "norm.bias": ((2704,), "bias", "LayerNorm"),
                "head.weight": ((10, 2704), "weight", "Linear"), "scale": ((), "parameter", "ConvNet"),
                "bn.running_mean": ((4,), "buffer", "BatchNorm2d"), "bn.running_var": ((4,), "buffer", "BatchNorm2d")}
    listed = {entry["name"]: (tuple(entry["shape"]), entry["role"], entry["module"])
              for entry in ds.attrs["weightlapse"]["parameters"]}
    assert listed == expected and "bn.num_batches_tracked" not in ds  # a counter, not a weight
    assert ds["conv.weight"].dims == ("step", "conv.weight.out", "conv.weight.in", "conv.weight.kh", "conv.weight.kw")
    # The running statistics move with the steps, as the model's did.
    assert not np.array_equal(ds["bn.running_mean"][0].values, ds["bn.running_mean"][5].values)


def test_a_loop_that_fails_leaves_its_steps_readable_and_the_run_marked_failed(tmp_path):
    torch.manual_seed(2)
    model = ConvNet()
    with pytest.raises(RuntimeError, match="the data loader broke"):
        with Recorder(tmp_path / "runs" / "broken", model) as rec:
            train(model, rec, 10, fail_at=7)
    progress = check_store(tmp_path / "runs" / "broken").progress
    assert (progress.steps_done, progress.finished) == (6, False)
    assert "RuntimeError: the data loader broke" in progress.error
    assert open_run(tmp_path / "runs" / "broken").sizes["step"] == 7
    assert RunCatalog(tmp_path / "runs").describe("broken").state == "failed"


def test_a_killed_process_keeps_every_committed_row_exactly(tmp_path):
    # Two blocks and a part of a third of a 784-32-10 MLP: the first two are committed (the
    # arrays grew past their first block on the way), the rest is lost with the process.
    store = tmp_path / "runs" / "killed" / STORE_NAME
    script = textwrap.dedent(f"""
        import json, os, pathlib, time, numpy as np, torch
        from weightlapse import Recorder
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        rec = Recorder({str(store.parent)!r}, model)
        last = 2 * rec.writer.block_steps - 1
        for t in range(1, last + 31):
            opt.zero_grad(); torch.nn.functional.cross_entropy(model(torch.rand(20, 784)),
                                                               torch.randint(0, 10, (20,))).backward(); opt.step()
            rec.step()
            if t == last:
                np.save({str(tmp_path / "last.npy")!r}, model[0].weight.detach().numpy())
        deadline = time.monotonic() + 60  # until the writer has committed the blocks handed over
        marker = pathlib.Path({str(store / "zarr.json")!r})
        while json.loads(marker.read_text())["attributes"]["progress"]["steps_done"] < last \\
                and time.monotonic() < deadline:
            time.sleep(0.05)
        print(last)
        os._exit(0)  # no close: as if killed
    """)
    last = int(subprocess.run([sys.executable, "-c", script], check=True, timeout=120, capture_output=True,
                              text=True).stdout)
    checked = check_store(store.parent)
    assert (checked.progress.steps_done, checked.progress.finished) == (last, False)
    assert checked.array("0.weight").shape[0] >= last + 1  # two blocks: grown past the one it was made with
    ds = open_run(store.parent)
    assert ds.sizes["step"] == last + 1
    assert ds["0.weight"][last].values.tobytes() == np.load(tmp_path / "last.npy").tobytes()
    assert RunCatalog(tmp_path / "runs").describe("killed").state == "unfinished"


def test_a_run_is_not_written_over_or_recorded_twice(tmp_path):
    model = torch.nn.Linear(4, 3)
    with Recorder(tmp_path / "run", model) as rec:
        with pytest.raises(RunLockedError):
            Recorder(tmp_path / "run", model)
        rec.step(loss=torch.tensor(0.5))
    with pytest.raises(FileExistsError, match="already holds a trajectory"):
        Recorder(tmp_path / "run", model)
    with Recorder(tmp_path / "run", model, overwrite=True, params={"note": "again"}):
        pass
    ds = open_run(tmp_path / "run")
    assert ds.sizes["step"] == 1 and ds.attrs["weightlapse"]["params"] == {"note": "again"}
    with pytest.raises(RuntimeError, match="recorder is closed"):
        rec.step()


@pytest.mark.parametrize(("model", "options", "message"), [
    (torch.nn.Linear(4, 3).double(), {}, "float64; the recorder records float32"),
    (torch.nn.Linear(4, 3), {"params": {"lr": object()}}, "params must be JSON values"),
    ("not a model", {}, "records a torch.nn.Module"),
])
def test_what_cannot_be_recorded_is_refused_before_anything_is_written(tmp_path, model, options, message):
    with pytest.raises(TypeError, match=message):
        Recorder(tmp_path / "run", model, **options)
    assert not (tmp_path / "run" / STORE_NAME).exists()


def test_the_catalog_opens_a_network_for_its_viewer_and_the_matrix_commands_refuse_it(tmp_path):
    with Recorder(tmp_path / "runs" / "mlp", torch.nn.Sequential(torch.nn.Linear(784, 8), torch.nn.Linear(8, 10))):
        pass
    catalog = RunCatalog(tmp_path / "runs")
    assert catalog.describe("mlp").state == "finished"
    assert catalog.open("mlp").names == ["0.weight", "0.bias", "1.weight", "1.bias"]  # a NetworkRun (test_network.py)
    assert weightlapse.Recorder is RecorderClass
    # the pixel history is softmax regression's (a pixel's ten class weights): it says so in
    # one line, without a traceback; statistics and compaction take network runs (test_stats.py,
    # test_compact.py)
    from weightlapse.pipeline import history
    from weightlapse.viewer.analysis import compare, function_space

    runs = tmp_path / "runs"
    reader = "the pixel history covers"
    assert history.main([str(runs / "mlp")]) == 1
    with pytest.raises(TrajectoryError, match=f"records a network .*{reader} softmax-regression runs so far"):
        history.build_history(runs / "mlp")
    # comparisons take network runs (test_network_compare.py, test_function_space.py), and
    # say in one line what they cannot do with this one
    assert compare.main([str(runs), "--runs", "mlp", "mlp", "--out", str(tmp_path / "c.zarr")]) == 1
    with pytest.raises(ValueError, match="records no activation between its layers"):
        function_space.open_models(catalog, ["mlp"])
    assert function_space.main([str(runs), "--runs", "mlp", "--out", str(tmp_path / "f.zarr")]) == 1


def record_mlp(run_dir, steps, *, device="cpu"):
    """A 784-32-10 MLP trained ``steps`` steps with a recorder; the model's state at each step, on the host."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    states = {}
    with Recorder(run_dir, model) as rec:
        states[0] = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        for t in range(1, steps + 1):
            x, y = torch.rand(20, 784, device=device), torch.randint(0, 10, (20,), device=device)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            rec.step(loss=loss)
            states[t] = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return {t: {name: tensor.cpu().numpy() for name, tensor in state.items()} for t, state in states.items()}


def test_rows_staged_in_a_device_block_reach_the_store_exactly(tmp_path, monkeypatch):
    # The GPU path (a device block, copied to the host once per hand-off), run on the CPU:
    # every row, across hand-offs, blocks and the arrays' growth, bit for bit.
    import weightlapse.pipeline.recorder as recorder

    monkeypatch.setattr(recorder, "stages_on_device", lambda device: True)
    states = record_mlp(tmp_path / "staged", 170)
    ds = open_run(tmp_path / "staged").load()
    for name in states[0]:
        expected = np.stack([states[row][name] for row in range(171)])
        assert ds[name].values.view(np.uint32).tobytes() == expected.view(np.uint32).tobytes(), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch here")
def test_on_a_gpu_a_step_never_waits_for_the_device(tmp_path, monkeypatch):
    import weightlapse.pipeline.recorder as recorder

    copy_rows = recorder.ParameterRows._copy_rows

    def allowed_to_wait(self, *args):  # the once-per-hand-off copy to the host is the one wait
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            copy_rows(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(recorder.ParameterRows, "_copy_rows", allowed_to_wait)
    step = recorder.Recorder.step

    def checked_step(self, loss=None):
        torch.cuda.set_sync_debug_mode("error")  # a synchronising call in the step raises
        try:
            step(self, loss)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(recorder.Recorder, "step", checked_step)
    states = record_mlp(tmp_path / "gpu", 200, device="cuda")
    ds = open_run(tmp_path / "gpu")
    for row in (0, 1, 200):
        assert_row_is(ds, row, states[row])
