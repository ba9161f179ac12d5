"""Console progress (documents, tokens, tokens/s) and the end-of-run summary table."""
from __future__ import annotations

import sys
import time


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Accumulates unit results; `tick()` prints a line once `interval` seconds have passed.

    The driver calls tick() at least every interval even when no unit finished, so a long run
    always shows it is alive: documents, input MB done of the total, tokens/s (recent and
    average), MB/s and an ETA from the bytes still to read."""

    def __init__(self, interval: float = 5.0, out=None, total_bytes: int = 0):
        self.interval, self.out, self.total_bytes = interval, out, total_bytes
        self.t0 = self.last = time.perf_counter()
        self.units = self.docs = self.tokens = self.rejected = self.bytes = 0
        self.busy = self.cpu = 0.0
        self.first_ready = self.last_done = None  # worker wall clocks, for the steady-state rate
        self.last_tokens = 0
        self.by_worker: dict = {}  # worker pid -> units: shows whether every worker had work

    def add(self, docs: int, tokens: int, rejected: int, busy_s: float, ready_t=None, done_t=None, cpu_s=0.0,
            pos: int = 0, unit: bool = True, worker=None) -> None:
        self.cpu += cpu_s
        if ready_t is not None:
            self.first_ready = ready_t if self.first_ready is None else min(self.first_ready, ready_t)
            self.last_done = done_t if self.last_done is None else max(self.last_done, done_t)
        self.units += unit
        if worker is not None:
            self.by_worker[worker] = self.by_worker.get(worker, 0) + 1
        self.docs, self.tokens, self.rejected = self.docs + docs, self.tokens + tokens, self.rejected + rejected
        self.bytes += pos
        self.busy += busy_s
        self.tick()

    def tick(self) -> None:
        if time.perf_counter() - self.last >= self.interval:
            self.print()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def print(self) -> None:
        now = time.perf_counter()
        recent = (self.tokens - self.last_tokens) / max(now - self.last, 1e-9)
        self.last, self.last_tokens = now, self.tokens
        el = max(self.elapsed, 1e-9)
        mb_s = self.bytes / el / 1e6
        left = max(0, self.total_bytes - self.bytes)
        eta = _duration(left / (self.bytes / el)) if self.bytes else "?"
        print(f"[tokenize] {el:7.1f}s units {self.units}  docs {human(self.docs)}  rejected {self.rejected}  "
              f"{self.bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB ({mb_s:.2f} MB/s)  tokens {human(self.tokens)}  "
              f"{human(recent)} tok/s (avg {human(self.tokens / el)})  ETA {eta}",
              file=self.out or sys.stdout, flush=True)


def summary_table(manifest: dict) -> str:
    """Per-file and total counts as a fixed-width table."""
    cols = ("file", "read", "rejected", "duplicates", "written", "tokens")
    rows = [(f["path"], f["docs_read"], f["docs_rejected"], f["duplicates"], f["docs_written"], f["tokens"])
            for f in manifest["files"]]
    t = manifest["totals"]
    rows.append(("TOTAL", t["docs_read"], t["docs_rejected"], t["duplicates"], t["docs_written"], t["tokens"]))
    w0 = max(len(cols[0]), *(len(str(r[0])) for r in rows))
    fmt = f"{{:<{w0}}}" + " {:>12}" * 5
    lines = [fmt.format(*cols), "-" * (w0 + 65)] + [fmt.format(*r) for r in rows]
    if t["rejected_by_reason"]:
        lines.append("rejected by reason: " + ", ".join(f"{k}={v}" for k, v in t["rejected_by_reason"].items()))
    tok = manifest["tokenizer"]
    lines.append(f"eod_id={tok['eod_id']} vocab_size={tok['vocab_size']} dtype={manifest['dtype']}  "
                 f"output={manifest['output']['bin']}")
    return "\n".join(lines)
