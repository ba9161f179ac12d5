"""Console progress (documents, tokens, tokens/s) and the end-of-run summary table."""
from __future__ import annotations

import sys
import time


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


class Progress:
    """Accumulates unit results and prints a line at most every `interval` seconds."""

    def __init__(self, interval: float = 5.0, out=None):
        self.interval, self.out = interval, out
        self.t0 = self.last = time.perf_counter()
        self.units = self.docs = self.tokens = self.rejected = 0
        self.busy = self.cpu = 0.0
        self.first_ready = self.last_done = None  # worker wall clocks, for the steady-state rate
        self.last_tokens = 0

    def add(self, docs: int, tokens: int, rejected: int, busy_s: float, ready_t=None, done_t=None, cpu_s=0.0) -> None:
        self.cpu += cpu_s
        if ready_t is not None:
            self.first_ready = ready_t if self.first_ready is None else min(self.first_ready, ready_t)
            self.last_done = done_t if self.last_done is None else max(self.last_done, done_t)
        self.units += 1
        self.docs, self.tokens, self.rejected = self.docs + docs, self.tokens + tokens, self.rejected + rejected
        self.busy += busy_s
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
        print(f"[tokenize] {el:7.1f}s units {self.units}  docs {human(self.docs)}  rejected {self.rejected}  "
              f"tokens {human(self.tokens)}  {human(recent)} tok/s (avg {human(self.tokens / el)})",
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
