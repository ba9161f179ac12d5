"""Run metrics to ``metrics.jsonl`` (the source of truth), a console line, and optionally wandb.

Layout of ``out_dir``: ``run.json`` (run name, number of GPUs, config; written once, when the
run is created, and kept on resume) and ``metrics.jsonl`` (one JSON object per step, flushed per
line so a crash loses at most the line being written).

Resume: the file is only ever appended to, never rewritten or replaced, so nothing a run (or a
second writer) logged is lost. When a run restarts from an earlier checkpoint it logs steps again;
the reader (:func:`read_metrics`, used by the report and by this logger) applies the resume rule:
a step <= the previous record's step supersedes the records from that step on, so the newest
attempt at each step wins. A line cut short by a crash is ended with a newline when the logger
opens the file (the reader skips it and says so), so the next record starts on a line of its own.

Only rank 0 writes; on other ranks every method is a no-op. wandb mirrors each record when
``use_wandb`` and the package is importable; it runs offline unless ``WANDB_MODE`` says otherwise,
and a restarted run reuses the wandb run id kept in ``out_dir/wandb_run_id``.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Optional, TextIO

from mora_dist.metrics.jsonl import read_metrics

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
WANDB_MISSING = "wandb is not installed: logging to metrics.jsonl only (pip install 'mora_dist[wandb]')"


def _jsonable(x):
    """Tensors and numpy scalars/arrays become numbers/lists; anything else its str()."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def _plain(x):
    """Scalar tensors / numpy values become Python numbers, so console, JSON and wandb agree."""
    return x.tolist() if hasattr(x, "tolist") and not isinstance(x, (list, dict, str)) else x


def _fmt_console(rec: dict) -> str:
    """A compact progress line; keys that are absent are left out."""
    parts = [f"step {rec['step']:>6d}"]
    fmts = [("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
            ("tokens_per_s", "{:,.0f} tok/s"), ("tflops_per_gpu", "{:.1f} TFLOP/s/GPU"),
            ("mfu", "MFU {:.1%}"), ("peak_mem_gib", "mem {:.1f} GiB")]
    for key, fmt in fmts:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(fmt.format(v))
    for key, v in rec.items():
        if key.startswith("eval/") and isinstance(v, (int, float)):
            parts.append(f"{key[5:]} {v:.3f}")
    return " | ".join(parts)


class MetricsLogger:
    """Append-per-step metrics logger. Use as a context manager or call :meth:`close`."""

    def __init__(self, out_dir, run_name: str, config: dict, use_wandb: bool = False, *, rank: int = 0,
                 num_gpus: Optional[int] = None, log_every: int = 1, wandb_project: str = "mora_dist",
                 stream: Optional[TextIO] = None):
        self.enabled = rank == 0
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_FILE
        self.log_every = max(1, int(log_every))
        self.stream = stream if stream is not None else sys.stdout
        self.last_step: Optional[int] = None
        self._file = None
        self._wandb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if num_gpus is None:
            num_gpus = int(config.get("num_gpus") or os.environ.get("WORLD_SIZE", 1))
        run_file = self.out_dir / RUN_FILE
        if not run_file.exists():
            meta = dict(run_name=run_name, num_gpus=num_gpus, created=time.time(), config=config)
            tmp = run_file.with_suffix(f".json.tmp.{os.getpid()}")
            tmp.write_text(json.dumps(meta, indent=1, default=_jsonable) + "\n")
            os.replace(tmp, run_file)
        if self.path.exists():
            self._reopen_existing()
        self._file = open(self.path, "a", encoding="utf-8")
        if use_wandb:
            self._wandb = self._start_wandb(run_name, config, wandb_project)

    # -- file handling -------------------------------------------------------------------
    def _reopen_existing(self):
        data = read_metrics(self.path)
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(-1, os.SEEK_END)
            cut = size > 0 and f.read(1) != b"\n"  # last line cut short by a crash
        if cut:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n")
        if data.skipped or cut:
            print(f"metrics: {self.path}: {len(data.skipped)} unreadable line(s) (skipped by the reader) on resume",
                  file=self.stream, flush=True)
        self.last_step = data.records[-1]["step"] if data.records else None

    # -- wandb ---------------------------------------------------------------------------
    def _start_wandb(self, run_name, config, project):
        try:
            import wandb
        except ImportError:
            print(WANDB_MISSING, file=self.stream, flush=True)
            return None
        mode = os.environ.get("WANDB_MODE", "offline")
        id_file = self.out_dir / "wandb_run_id"  # a restarted run continues the same wandb run
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12] + "\n")
        return wandb.init(project=project, name=run_name, config=config, dir=str(self.out_dir),
                          mode=mode, id=id_file.read_text().strip(), resume="allow")

    # -- public --------------------------------------------------------------------------
    def log(self, step: int, metrics: dict) -> dict:
        """Record ``metrics`` for ``step`` and return the record written (``step`` and ``time`` added)."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        rec = dict(step=step, time=time.time(), **{k: _plain(v) for k, v in metrics.items() if k != "step"})
        if not self.enabled:
            return rec
        if self._file is None:
            raise RuntimeError(f"MetricsLogger for {self.out_dir} is closed")
        self._file.write(json.dumps(rec, default=_jsonable) + "\n")
        self._file.flush()
        self.last_step = step
        if self._wandb is not None:  # wandb ignores steps below its last one (a resumed run's redo)
            self._wandb.log({k: v for k, v in rec.items() if k not in ("step", "time")}, step=step)
        if step % self.log_every == 0:
            print(_fmt_console(rec), file=self.stream, flush=True)
        return rec

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
