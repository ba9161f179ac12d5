"""Reading a run's ``metrics.jsonl`` the same way everywhere (logger resume and report).

Resume rule: a record whose step is <= the last step seen means the run restarted from an
earlier checkpoint and redid those steps, so the records it supersedes (steps >= that step)
are dropped: the newest attempt at a step wins. Lines that are not a JSON object with an integer
``step`` (e.g. cut short by a crash) are skipped and reported with their line number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MetricsFile:
    path: Path
    records: list = field(default_factory=list)  # ordered by step, one per step
    skipped: list = field(default_factory=list)  # (line number, reason)
    superseded: int = 0  # records dropped by the resume rule


def read_metrics(path) -> MetricsFile:
    """Parse ``path`` (raises FileNotFoundError naming it when absent)."""
    path = Path(path)
    out = MetricsFile(path)
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)  # NaN/Infinity (a diverged loss) are accepted
            except json.JSONDecodeError as e:
                out.skipped.append((no, f"invalid JSON ({e.msg})"))
                continue
            step = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(step, bool) or not isinstance(step, int):
                out.skipped.append((no, "not a JSON object with an integer 'step'"))
                continue
            while out.records and out.records[-1]["step"] >= step:
                out.records.pop()
                out.superseded += 1
            out.records.append(rec)
    return out
