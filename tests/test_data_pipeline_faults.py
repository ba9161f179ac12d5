"""Process faults of the tokenize CLI, each in real processes: a second run on a locked output prefix,
an empty input (exit status + one line), and a SIGKILLed run that must leave no Ray process behind."""
import json
import os
import signal
import subprocess
import sys
import time

from test_data_pipeline import REPO, real_texts

from data_pipeline import train_tokenizer
from data_pipeline.guard import output_lock


def _cli(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "data_pipeline.tokenize", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _corpus(tmp_path, copies):
    path = tmp_path / "c.jsonl"
    texts = real_texts()
    with open(path, "w") as f:
        for c in range(copies):
            for t in texts:
                f.write(json.dumps({"text": f"{c} {t}"}) + "\n")
    assert train_tokenizer.main(["--input", str(path), "--model-prefix", str(tmp_path / "tok"), "--vocab-size",
                                 "1000", "--sample-docs", "500"]) == 0
    return str(path), str(tmp_path / "tok.model")


def test_second_run_on_a_locked_prefix_refuses(tmp_path):
    src, tok = _corpus(tmp_path, 1)
    prefix = str(tmp_path / "out" / "ds")
    os.makedirs(tmp_path / "out")
    with output_lock(prefix):  # this test process is "the first run"
        r = _cli("--input", src, "--tokenizer", tok, "--output-prefix", prefix)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines == [f"error: {prefix}.lock: another tokenize run (pid {os.getpid()}) is writing output prefix "
                     f"{prefix}; wait for it to finish or use another --output-prefix"]
    assert not os.path.exists(prefix + ".manifest.json")


def test_empty_input_exits_nonzero_with_one_line(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    r = _cli("--input", str(tmp_path / "e.jsonl"), "--tokenizer", "unused.model", "--output-prefix",
             str(tmp_path / "o"))
    # the tokenizer is checked first: a missing one is named
    assert r.returncode == 2 and r.stderr.strip() == "error: --tokenizer unused.model: no such file"
    _, tok = _corpus(tmp_path, 1)
    r = _cli("--input", str(tmp_path / "e.jsonl"), "--tokenizer", tok, "--output-prefix", str(tmp_path / "o"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'e.jsonl'}: input is empty (0 bytes); nothing to "
                                             "tokenize: check --input"]


def _descendants(root: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
            except OSError:
                pass
    out, todo = set(), [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkilled_run_leaves_no_ray_processes(tmp_path):
    """The CLI starts its own local Ray; SIGKILL the driver mid-run: every process of that Ray (gcs, raylet,
    workers and the raylet's agents, which used to survive) is gone within seconds."""
    src, tok = _corpus(tmp_path, 12)
    prefix = str(tmp_path / "ds")
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.tokenize", "--input", src, "--tokenizer", tok,
                             "--output-prefix", prefix, "--workers", "2", "--part-bytes", "100000"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, tree = time.time() + 120, set()
    try:
        while time.time() < deadline:
            if os.path.isdir(prefix + ".work") and any(n.endswith("-c000000.json") for n in os.listdir(prefix + ".work")):
                time.sleep(1.0)  # Ray's agents start a little after the first worker
                tree = _descendants(proc.pid)
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(tree) >= 4, tree  # at least gcs, raylet, a worker, an agent (and our watchdog)
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.25)
    left = {p: open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:80] for p in tree if _alive(p)}
    assert not left, f"processes left behind: {left}"
