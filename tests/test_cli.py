"""The `weightlapse` command (cli.py) and the distribution: one namespace, every subcommand."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from viewer_runs import training_like, write_run

import weightlapse
from weightlapse.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = [*COMMANDS, "publish", "view"]


def weightlapse_command(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "weightlapse.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_the_public_api_is_the_packages_own():
    assert weightlapse.__version__ and weightlapse.open_run.__module__ == "weightlapse.pipeline.store.dataset"
    assert weightlapse.RunCatalog.__module__ == "weightlapse.viewer.analysis.runs"
    assert callable(weightlapse.compare.distance_over_steps) and callable(weightlapse.change_statistics)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        weightlapse.nothing  # noqa: B018


@pytest.mark.parametrize("command", ["", *SUBCOMMANDS])
def test_help_of_the_command_and_of_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"] if command else ["--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert f"weightlapse {command}".strip() in shown and "usage" in shown


def test_errors_are_one_line_and_exit_1(tmp_path):
    result = weightlapse_command("stats", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s.zarr"), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "no trajectory store" in result.stderr
    assert weightlapse_command("no-such-command").returncode == 2
    assert weightlapse_command("publish", str(tmp_path / "nowhere"), str(tmp_path / "to")).returncode == 1
    compact = weightlapse_command("compact", str(tmp_path / "nowhere"))
    assert compact.returncode == 1 and "Traceback" not in compact.stderr and "no trajectory.zarr" in compact.stderr


def test_compact_shrinks_a_run_and_keeps_its_values(tmp_path):
    rows = training_like(300)
    write_run(tmp_path / "run", rows, chunk_steps=64)
    result = weightlapse_command("compact", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    before, after = (int(n.replace(",", "")) for n in result.stdout.split(":")[1].split("bytes")[0].split("->"))
    assert after < before
    assert np.array_equal(weightlapse.open_run(tmp_path / "run").weights.values.view(np.uint32), rows.view(np.uint32))


def test_runs_lists_a_runs_directory_from_anywhere(tmp_path):
    write_run(tmp_path / "runs" / "alpha", training_like(20), chunk_steps=8, name="alpha")
    result = weightlapse_command("runs", str(tmp_path / "runs"), cwd="/")
    assert result.returncode == 0 and "alpha" in result.stdout and "finished" in result.stdout


def test_view_serves_the_viewer_on_loopback_from_another_directory(tmp_path):
    write_run(tmp_path / "runs" / "alpha", training_like(20), chunk_steps=8, name="alpha")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "weightlapse.cli", "view", "runs", "--port", str(port)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert f"http://127.0.0.1:{port}/viewer" in server.stdout.readline()
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/viewer", timeout=5) as response:
                    page = response.read().decode()
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the viewer did not come up"
                time.sleep(0.5)
        assert "bokeh" in page.lower()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_an_install_adds_only_the_weightlapse_package(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "PIP_NO_INDEX": "1"})
    installed = sorted(path.name for path in target.iterdir() if path.name != "bin")
    assert installed == ["weightlapse", f"weightlapse-{weightlapse.__version__}.dist-info"]
    package = target / "weightlapse"
    assert (package / "cli.py").is_file() and (package / "pipeline" / "store" / "__init__.py").is_file()
    assert (package / "viewer" / "main.py").is_file() and (package / "viewer" / "app_hooks.py").is_file()
    assert not (package / "tests").exists() and not (package / "benchmarks").exists()
    assert (target / "bin" / "weightlapse").is_file()
    # the installed copy runs on its own, outside the clone
    result = subprocess.run([sys.executable, "-c", "import weightlapse, weightlapse.pipeline.store as s; "
                             "print(s.__file__)"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(target)})
    assert result.returncode == 0 and str(target) in result.stdout, result.stderr
