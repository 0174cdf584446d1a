"""RUN_DIR/metrics.jsonl: one JSON record per log interval and per evaluation, written by the main
process; launch.plot draws it."""

from __future__ import annotations

import json
from pathlib import Path

from gpt.files import write_atomic


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint (the resumed run writes them again) and any torn
    line a kill in mid-write left behind."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))
