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
