"""Project-wide guarantees that no single module owns."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNPICKLING = re.compile(r"pickle\.loads?\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True|torch\.load\(")


def test_no_code_path_unpickles_anything():
    # The original notebook unpickled a download: arbitrary code execution. Data here is IDX.
    sources = [p for folder in ("pipeline", "viewer", "benchmarks") for p in (REPO / folder).rglob("*.py")]
    assert sources, "no project sources found"
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in sources
                 for n, line in enumerate(p.read_text().splitlines(), 1) if UNPICKLING.search(line)]
    assert offenders == []


FLOORS = {  # the releases that fixed what weightlapse relies on; see pyproject.toml
    "zarr": "3.1.3",      # atomic writes in LocalStore
    "bokeh": "3.8.2",     # WebSocket origin check (CVE-2026-21883)
    "torch": "2.6",       # safe torch.load by default, CVE-2025-32434
    "numcodecs": "0.16",  # Blosc typesize, as zarr passes it
}


def test_dependency_floors_are_declared_and_installed():
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    declared = {}
    in_dependencies = False
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("dependencies = ["):
            in_dependencies = True
        elif in_dependencies and line.startswith("]"):
            break
        elif in_dependencies and line.strip().startswith('"'):
            requirement = Requirement(line.strip().split('"')[1])
            declared[requirement.name] = requirement.specifier
    for name, floor in FLOORS.items():
        specifier = declared[name]
        assert specifier.contains(floor) and not specifier.contains(_just_below(floor), prereleases=True), \
            f"pyproject.toml should allow {name} from {floor} on, not below: {specifier}"
        assert Version(version(name)) >= Version(floor), f"installed {name} {version(name)} is older than {floor}"


def _just_below(release: str) -> str:
    """A version just older than ``release``: 3.8.2 -> 3.8.1, 3.0 -> 3.0rc0."""
    parts = [int(p) for p in release.split(".")]
    if parts[-1] == 0:
        return release + "rc0"
    parts[-1] -= 1
    return ".".join(str(p) for p in parts)


def test_the_layers_import_only_downwards():
    # The pipeline writes runs and never imports the viewer or Panel; the research API
    # (weightlapse.viewer.analysis) reads them and imports no UI.
    import subprocess
    import sys

    probe = ("import sys, weightlapse.pipeline.train, weightlapse.pipeline.sweep, weightlapse.viewer.analysis.runs, "
             "weightlapse.viewer.analysis.stats, weightlapse.viewer.analysis.compare, "
             "weightlapse.viewer.analysis.export; "
             "print(sorted(m for m in ('panel', 'holoviews', 'bokeh', 'weightlapse.viewer.app') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
    pipeline_sources = [p for p in (REPO / "pipeline").rglob("*.py")]
    assert not [p.name for p in pipeline_sources if "weightlapse.viewer" in p.read_text()]
