"""Metrics library: FLOP formula (against the peer benchmark's), StepMeter math, MetricsLogger JSONL."""
import ast
import importlib.util
import io
import json
import math
import time
import types
from pathlib import Path

import pytest
import torch

from mora_dist.metrics import (DecoderShape, MetricsLogger, StepMeter, adapter_flops_per_token,
                               flops_per_token, forward_flops_per_token, full_ft_flops_per_token,
                               matmul_params, read_metrics)
from mora_dist.metrics.logger import WANDB_MISSING

PEER = Path(__file__).resolve().parents[1] / "bench" / "peer_peft.py"
# docs/design.md section 5: Llama-style 1.1B, seq 2048.
CFG_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, vocab_size=32000)


def _independent_flops(cfg, seq, full):
    """Recomputed from first principles (used when the peer file is absent)."""
    h, L, f, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    d = h // cfg.num_attention_heads
    per_layer = h * h + h * h + 2 * h * cfg.num_key_value_heads * d + 3 * h * f  # q, o, k+v, mlp
    fwd = 2 * (L * per_layer + h * V) + L * 4 * seq * h
    return 3 * fwd if full else 2 * fwd


def _peer_flops_fn():
    """The peer's flops_per_token: imported from its file; if its heavy imports (transformers,
    peft) are unavailable, the function's own source is compiled alone; if the file is absent,
    an independent recomputation."""
    if not PEER.exists():
        return _independent_flops, "independent"
    try:
        spec = importlib.util.spec_from_file_location("peer_peft", PEER)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.flops_per_token, "imported"
    except ImportError:
        tree = ast.parse(PEER.read_text())
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "flops_per_token")
        ns = {}
        exec(compile(ast.Module(body=[fn], type_ignores=[]), str(PEER), "exec"), ns)
        return ns["flops_per_token"], "extracted"


@pytest.fixture(scope="module")
def peer():
    return _peer_flops_fn()[0]


@pytest.mark.parametrize("seq", [2048, 512])
def test_flops_match_peer_benchmark_1b(peer, seq):
    cfg = types.SimpleNamespace(**CFG_1B)
    shape = DecoderShape.from_config(CFG_1B, seq=seq)
    assert full_ft_flops_per_token(shape) == peer(cfg, seq, True)
    assert adapter_flops_per_token(shape, adapter_params=0) == peer(cfg, seq, False)
    assert flops_per_token(shape, full_finetune=True) == peer(cfg, seq, True)


def test_flops_1b_numbers():
    shape = DecoderShape(hidden=2048, layers=22, heads=32, kv_groups=4, ffn=5632, vocab=32000, seq=2048)
    assert matmul_params(shape) == 1_034_420_224  # ~1.03B matmul params (+65.5M embedding = 1.1B)
    assert forward_flops_per_token(shape) == 2 * 1_034_420_224 + 22 * 4 * 2048 * 2048 == 2_437_939_200
    assert full_ft_flops_per_token(shape) == 7_313_817_600
    assert adapter_flops_per_token(shape) == 4_875_878_400  # the 2/3 of docs/design.md section 5


def test_peer_sizes_table_is_the_design_config():
    """The peer's "1b" size (vocab 32000 in its run()) is the docs/design.md section 5 model we test with."""
    if PEER.exists():
        node = next(n for n in ast.parse(PEER.read_text()).body
                    if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "SIZES")
        sizes = eval(compile(ast.Expression(node.value), str(PEER), "eval"), {"__builtins__": {}, "dict": dict})
        assert dict(sizes["1b"], vocab_size=32000) == CFG_1B
    assert _peer_flops_fn()[0](types.SimpleNamespace(**CFG_1B), 2048, True) == 7_313_817_600


def test_adapter_terms_and_gqa():
    shape = DecoderShape.from_config(CFG_1B, seq=2048)
    r, h, f, kv, L = 8, 2048, 5632, 256, 22
    lora = L * r * ((h + h) * 2 + (h + kv) * 2 + (h + f) * 2 + (f + h))  # q,o,k,v,gate,up,down
    base = adapter_flops_per_token(shape)
    assert adapter_flops_per_token(shape, adapter_params=lora) - base == 6 * lora
    assert adapter_flops_per_token(shape, lora, adapter_fwd_flops=1000) - base == 3000
    mha = DecoderShape(hidden=2048, layers=22, heads=32, kv_groups=32, ffn=5632, vocab=32000, seq=2048)
    assert matmul_params(mha) - matmul_params(shape) == 22 * 2 * 2048 * (2048 - 256)
    # training-config names (ModelConfig / LlamaSpec) give the same shape
    same = DecoderShape.from_config(dict(hidden_size=2048, num_layers=22, num_attention_heads=32,
                                         num_query_groups=4, ffn_hidden_size=5632, vocab_size=32000), seq=2048)
    assert same == shape
    with pytest.raises(ValueError, match="seq"):
        DecoderShape(hidden=64, layers=2, heads=4, kv_groups=2, ffn=176, vocab=256, seq=0)


def test_step_meter_math():
    tokens, gpus, fpt, peak = 4 * 2048, 4, 7_313_817_600, 800e12
    m = StepMeter(tokens, gpus, fpt, peak_flops=peak, warmup_steps=2)
    times = [5.0, 3.0, 1.0, 1.0, 2.0]
    recs = [m.record(t, peak_mem_bytes=(i + 1) * 2**30) for i, t in enumerate(times)]
    assert [r["warmup"] for r in recs] == [True, True, False, False, False]
    r = recs[2]
    assert r["tokens_per_s"] == tokens / 1.0 and r["tokens_per_s_per_gpu"] == tokens / gpus
    assert r["tflops_per_gpu"] == pytest.approx(tokens * fpt / gpus / 1e12)
    assert r["mfu"] == pytest.approx(tokens * fpt / gpus / peak)
    assert r["peak_mem_gib"] == 3.0
    s = m.summary()
    mean_t = (1.0 + 1.0 + 2.0) / 3  # warm-up excluded, time-weighted
    assert s["counted_steps"] == 3 and s["mean_step_time"] == pytest.approx(mean_t)
    assert s["tokens_per_s"] == pytest.approx(tokens / mean_t)
    assert s["mfu"] == pytest.approx(tokens / mean_t * fpt / gpus / peak)
    assert s["peak_mem_gib"] == 5.0


def test_step_meter_design_anchor():
    """docs/design.md section 5: HF full FT at 47,843 tok/s is ~350 TFLOP/s, 45% of the measured 772."""
    m = StepMeter(4 * 2048, 1, 7_313_817_600, peak_flops=772e12, warmup_steps=0)
    r = m.record(4 * 2048 / 47_843)
    assert r["tflops_per_gpu"] == pytest.approx(349.9, abs=0.05)
    assert r["mfu"] == pytest.approx(0.4533, abs=5e-4)


def test_step_meter_timing_memory_and_errors():
    m = StepMeter(100, 1, 1e9, warmup_steps=5)
    m.start()
    time.sleep(0.02)
    r = m.stop()
    assert 0.02 <= r["step_time"] < 1.0
    assert r["peak_mem_gib"] > 0.01  # process max RSS on a CPU machine
    assert m.summary()["tokens_per_s"] is None  # all steps were warm-up
    with pytest.raises(RuntimeError, match="start"):
        m.stop()
    with pytest.raises(ValueError, match="step_time"):
        m.record(0.0)
    with pytest.raises(ValueError):
        StepMeter(0, 1, 1e9)


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_logger_round_trip_console_and_ranks(tmp_path):
    out, con = tmp_path / "run", io.StringIO()
    cfg = dict(model="1b", lr=1e-4)
    meter = StepMeter(8192, 2, 7.3e9, warmup_steps=1)
    with MetricsLogger(out, "r1", cfg, use_wandb=False, rank=0, num_gpus=2, log_every=2, stream=con) as log:
        for step in range(1, 6):
            m = meter.record(0.5 + step * 0.1, peak_mem_bytes=2**30)
            log.log(step, dict(loss=torch.tensor(3.0 - 0.1 * step), lr=1e-4, grad_norm=1.5, **m))
    recs = read_metrics(out / "metrics.jsonl").records
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[4]["loss"] == pytest.approx(2.5) and recs[4]["tokens_per_s"] == pytest.approx(8192 / 1.0)
    assert recs[0]["warmup"] is True and recs[1]["warmup"] is False
    meta = json.loads((out / "run.json").read_text())
    assert meta["run_name"] == "r1" and meta["num_gpus"] == 2 and meta["config"] == cfg
    lines = con.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("step      2 | loss 2.8000 | lr 1.00e-04 | gnorm 1.500")
    assert "TFLOP/s/GPU" in lines[0] and "MFU" in lines[0] and "mem 1.0 GiB" in lines[0]
    other = tmp_path / "rank1"
    with MetricsLogger(other, "r1", cfg, rank=1) as log:
        log.log(1, dict(loss=1.0))
    assert not other.exists()


def test_logger_resume_appends_and_survives_crash(tmp_path):
    out, con = tmp_path / "run", io.StringIO()
    with MetricsLogger(out, "r", dict(a=1), stream=con) as log:
        for step in range(1, 7):
            log.log(step, dict(loss=float(step)))
    with open(out / "metrics.jsonl", "a") as f:  # a crash while writing step 7
        f.write('{"step": 7, "lo')
    before, inode = (out / "metrics.jsonl").read_bytes(), (out / "metrics.jsonl").stat().st_ino
    # restart from the checkpoint of step 3: steps 4.. are redone with new values
    with MetricsLogger(out, "r", dict(a=2), stream=con) as log:
        assert log.last_step == 6
        for step in range(4, 9):
            log.log(step, dict(loss=100.0 + step))
        log.log(8, dict(loss=-1.0))  # the same step again within one process
    assert "1 unreadable line" in con.getvalue()
    after = (out / "metrics.jsonl").read_bytes()
    # append-only: what was there is kept byte for byte, in the same file (no rewrite, no rename)
    assert after.startswith(before) and (out / "metrics.jsonl").stat().st_ino == inode
    data = read_metrics(out / "metrics.jsonl")  # the newest attempt at each step wins
    assert [r["step"] for r in data.records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in data.records] == [1, 2, 3, 104, 105, 106, 107, -1.0]
    assert len(data.skipped) == 1  # only the torn line; every record after it is on its own line
    assert json.loads((out / "run.json").read_text())["config"] == dict(a=1)  # written once


def test_two_loggers_on_one_file_lose_nothing(tmp_path):
    """Two writers (e.g. a run and a second run the lock did not stop, such as a research script)
    interleave records; before, each resume/redo rewrote the file and dropped the other's lines."""
    out = tmp_path / "run"
    a = MetricsLogger(out, "a", {}, stream=io.StringIO())
    for step in range(1, 6):
        a.log(step, dict(loss=1.0, who="a"))
    b = MetricsLogger(out, "b", {}, stream=io.StringIO())  # opens the file a is writing
    for step in range(1, 31):
        b.log(step, dict(loss=2.0, who="b"))
        if step > 5:
            a.log(step, dict(loss=1.0, who="a"))
    a.close()
    b.close()
    recs = _lines(out / "metrics.jsonl")  # strict: every line parses
    assert len(recs) == 60 and sorted(r["who"] for r in recs) == ["a"] * 30 + ["b"] * 30


def test_reader_applies_resume_rule_and_counts_bad_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\nnot json\n[1, 2]\n'
                 '{"step": 3, "loss": NaN}\n{"step": 2, "loss": 20}\n\n{"step": 3, "loss": 30}\n')
    data = read_metrics(p)
    assert [(r["step"], r["loss"]) for r in data.records] == [(1, 1), (2, 20), (3, 30)]
    assert [no for no, _ in data.skipped] == [3, 4] and data.superseded == 2
    assert math.isnan(json.loads('{"x": NaN}')["x"])


def test_logger_wandb_optional(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    con = tmp_path / "console.txt"
    with open(con, "w") as stream, MetricsLogger(tmp_path / "run", "w", dict(a=1), use_wandb=True,
                                                  stream=stream) as log:
        log.log(1, dict(loss=1.0))
    text = con.read_text()
    if importlib.util.find_spec("wandb") is None:
        assert text.splitlines()[0] == WANDB_MISSING
    else:  # offline by default: the run is kept under out_dir, nothing is sent
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert read_metrics(tmp_path / "run" / "metrics.jsonl").records[0]["loss"] == 1.0


def test_step_meter_excludes_graph_capture_steps():
    """Under PP, `train.cuda_graph` runs two eager steps and captures at the third; that step (4.3 s
    against 1.65 s steady on the 1.1B PP=2 run of 2026-11-30) was counted and read as a 0.64 scaling
    efficiency. Excluded steps are reported (warmup=True) but stay out of the summary."""
    m = StepMeter(8192, 2, 7.3e9, warmup_steps=2)
    times = [15.7, 2.6, 4.3, 1.65, 1.66, 1.7, 1.65]
    excl = [True, True, True, False, False, True, False]  # graph warm-up x3, a profiled step
    recs = [m.record(t, peak_mem_bytes=0, exclude=e) for t, e in zip(times, excl)]
    assert [r["warmup"] for r in recs] == excl
    s = m.summary()
    assert s["counted_steps"] == 3 and s["mean_step_time"] == pytest.approx((1.65 + 1.66 + 1.65) / 3)
