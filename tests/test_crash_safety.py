"""SIGKILL at random moments: what the train stage leaves is always readable and exact,
and resuming it gives the uninterrupted run's trajectory.

The short variant of benchmarks/crash_trials.py (50 trials there, figures in
docs/reliability.md): a few kills of a real train stage process, each store checked
row by row against an uninterrupted run.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from idx_files import write_dataset

pytestmark = pytest.mark.slow  # train stages killed and resumed

REPO = Path(__file__).resolve().parents[1]


def test_a_killed_train_stage_leaves_only_exact_committed_rows(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, n_train=2_000, n_test=100)  # 100 steps an epoch
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "crash_trials.py"), "--trials", "5", "--dataset-dir", str(data),
         "--dataset", "mnist", "--epochs", "60", "--seed", "3", "--json", str(tmp_path / "trials.json")],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "trials.json").read_text())
    assert summary["passed"] == summary["trials"] == 5
    assert summary["killed_with_rows_committed"] >= 2  # the kills landed mid-run, not only before or after
    assert summary["rows_checked_against_reference"] > 1_000
    assert summary["resumed_exactly"] == 5  # and each, run again with --resume, ended as the reference
