"""Run locations (pipeline/locations.py): publishing reads only the run's own files."""

import pytest
from viewer_runs import training_like, write_run

from weightlapse.pipeline.locations import LocationError, publish_run


def test_publishing_refuses_a_run_holding_a_link_out_of_it(tmp_path):
    run = tmp_path / "runs" / "r"
    write_run(run, training_like(20), chunk_steps=8)
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (run / "metrics.json").unlink()
    (run / "metrics.json").symlink_to(secret)
    target = tmp_path / "published"
    with pytest.raises(LocationError, match="metrics.json is a symbolic link"):
        publish_run(run, target)
    assert not any(path.read_bytes() == b"private key" for path in target.rglob("*") if path.is_file())


def test_a_run_of_plain_files_is_published_whole(tmp_path):
    run = tmp_path / "runs" / "r"
    write_run(run, training_like(20), chunk_steps=8)
    target = publish_run(run, tmp_path / "published")
    assert (tmp_path / "published" / "trajectory.zarr" / "zarr.json").is_file() and str(target).endswith("published")


def test_work_in_progress_is_not_published(tmp_path):
    import numpy as np

    from weightlapse.pipeline.store import open_run

    run = tmp_path / "runs" / "r"
    write_run(run, training_like(20), chunk_steps=8)
    staging = run / ".trajectory.zarr.compacting" / "weights"  # an interrupted compaction's
    staging.mkdir(parents=True)
    (staging / "c.0.0.0").write_bytes(b"half done")
    (run / "trajectory.zarr" / ".c.1.partial").write_bytes(b"")
    publish_run(run, tmp_path / "published")
    published = {path.relative_to(tmp_path / "published").as_posix() for path in (tmp_path / "published").rglob("*")
                 if path.is_file()}
    assert not any(".compacting" in name or name.endswith(".partial") for name in published)
    np.testing.assert_array_equal(open_run(tmp_path / "published").weights.values, open_run(run).weights.values)
