"""How long `dvc repro` takes to train the shipped sweep: one DVC stage and process per grid
point (the earlier dvc.yaml) against one stage per stack (today's), side by side.

    python benchmarks/dvc_sweep.py [--dataset-dir /usr/share/datasets/fashion-mnist] [--repeats 1]
        [--old-commit b6c5144] [--json FILE]

Each shape gets a fresh copy of the project (this checkout's code and params.yaml, the
dvc.yaml of ``--old-commit`` or of this checkout) on Fashion-MNIST (MNIST's training split
is not on every machine; the runs are as long: 3,000 steps). The data stage runs first,
untimed; then `dvc repro` of the sweep stages is timed, and once more after adding a seed
to the grid (the new points only). Both shapes run this checkout's training code, so only
the DVC shape differs. The shapes alternate when --repeats > 1; medians count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
COPIED = ["__init__.py", "pipeline", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".gitignore"]


def sh(cwd: Path, *args: str, env: dict) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed in {cwd}:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def project(root: Path, dvc_yaml: str, env: dict) -> Path:
    for name in COPIED:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy(source, target)
    (root / "dvc.yaml").write_text(dvc_yaml)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["dataset"] = "fashion-mnist"
    params["datasets"] = {"fashion-mnist": {}}
    params["sweep"]["dataset"] = ["fashion-mnist"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["git", "init", "-q"], ["dvc", "config", "core.analytics", "false"], ["git", "add", "-A"],
                 ["git", "commit", "-qm", "copy"]):
        sh(root, *args, env=env)
    stages = yaml.safe_load(dvc_yaml)["stages"]
    download = "download" if "foreach" not in stages["download"] else "download@fashion-mnist"
    sh(root, "dvc", "repro", download, env=env)
    return root


def timed_repro(root: Path, env: dict) -> tuple[float, int]:
    started = time.perf_counter()
    output = sh(root, "dvc", "repro", "sweep", env=env)
    return time.perf_counter() - started, output.count("Running stage")


def add_seed(root: Path) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sweep"]["seed"].append(max(params["sweep"]["seed"]) + 1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--old-commit", default="b6c5144", help="a commit whose dvc.yaml has one stage per point")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "WEIGHTLAPSE_MIRRORS": args.dataset_dir,
           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    shapes = {
        "one stage per point": subprocess.run(["git", "show", f"{args.old_commit}:dvc.yaml"], cwd=REPO, check=True,
                                              capture_output=True, text=True).stdout,
        "one stage per stack": (REPO / "dvc.yaml").read_text(),
    }
    results: dict[str, dict[str, list]] = {shape: {"sweep_s": [], "new_seed_s": [], "stages": []} for shape in shapes}
    for repeat in range(args.repeats):
        for shape, dvc_yaml in shapes.items():
            with tempfile.TemporaryDirectory(prefix="dvc-sweep-bench-") as temp:
                root = project(Path(temp), dvc_yaml, env)
                seconds, stages = timed_repro(root, env)
                add_seed(root)
                new_seed, new_stages = timed_repro(root, env)
                results[shape]["sweep_s"].append(seconds)
                results[shape]["new_seed_s"].append(new_seed)
                results[shape]["stages"].append([stages, new_stages])
                print(f"{shape}: sweep {seconds:.1f} s ({stages} stages), a new seed {new_seed:.1f} s "
                      f"({new_stages} stages)", flush=True)
    summary = {shape: {key: statistics.median(values) for key, values in result.items() if key != "stages"}
               for shape, result in results.items()}
    before, after = summary["one stage per point"], summary["one stage per stack"]
    print(f"speed-up: whole sweep {before['sweep_s'] / after['sweep_s']:.2f}x, "
          f"a new seed {before['new_seed_s'] / after['new_seed_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                               "results": results, "medians": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
