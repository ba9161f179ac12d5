"""Multi-GPU scaling of `launch/train.py` (what users run): per-GPU tokens/s of each layout against
TP=1 in the same call, and the losses of every layout against TP=1's from one Hugging Face
checkpoint (a random Llama written with transformers, so every layout starts from the same
weights and reads the same global batches).

    python3 launch/scaling.py --size 1b --gpus 2 --methods lora,mora-rotation \\
        --layouts tp1,tp2sp,dp2,pp2 --out runs/scaling            # GPU machine, NCCL
    python3 launch/report.py runs/scaling/1b_* --out docs/results/scaling

Layouts: tp1 (1 GPU), tpNsp (TP=N + SP), tpN (TP=N), dpN, ppN, tpNppM. `--graph` runs every layout
with `train.cuda_graph` (PP: the whole schedule of a step as one graph). Writes `<out>/rows.json`: one row
per run (size, config, tp, pp, dp, mbs, tokens_per_s_per_gpu, peak_gib, device, efficiency,
loss_max_abs_diff vs tp1), the format of docs/perf/*_scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from launch.bench import NCCL_ENV, ROWS, SIZES, model_overrides, random_tokens  # noqa: E402


def parse_layout(name: str) -> dict:
    m = re.fullmatch(r"(?:tp(\d+))?(sp)?(?:pp(\d+))?(?:dp(\d+))?", name)
    if not m or not name:
        raise SystemExit(f"--layouts: cannot read {name!r} (examples: tp1, tp2sp, dp2, pp2, tp2pp2)")
    tp, sp, pp, dp = int(m[1] or 1), bool(m[2]), int(m[3] or 1), int(m[4] or 1)
    return dict(tp=tp, pp=pp, dp=dp, sp=sp, gpus=tp * pp * dp)


def write_hf_checkpoint(size: str, out: str, seq: int) -> str:
    """A random Llama of the bench shape saved with transformers (bf16 safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(out, "config.json")):
        return out
    s = SIZES[size]
    cfg = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["ffn_hidden_size"],
                      num_hidden_layers=s["num_layers"], num_attention_heads=s["num_attention_heads"],
                      num_key_value_heads=s["num_query_groups"], max_position_embeddings=seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out


def run_layout(a, method: str, layout: str, data: str, hf: str | None, port: int) -> dict:
    lay = parse_layout(layout)
    row = ROWS[method]
    tag = f"{a.size}_{method}_{layout}"
    run_dir = os.path.join(a.out, tag)
    mbs = a.mbs_pp if lay["pp"] > 1 and a.mbs_pp else a.mbs
    gb = a.global_batch
    ov = [f"adapter.method={row['method']}", f"adapter.r={row['r']}", f"data.train=[{{path: {data}}}]",
          f"data.seq_length={a.seq}", "data.eod_id=0", f"train.steps={a.steps}", f"train.micro_batch={mbs}",
          f"train.global_batch={gb}", f"run.name={tag}", "train.lr=1e-4", "train.warmup=2", "train.log_every=1",
          f"train.cuda_graph={str(a.graph).lower()}", f"run.out_dir={run_dir}",
          f"run.peak_tflops={a.peak_tflops}", f"parallel.tp={lay['tp']}", f"parallel.pp={lay['pp']}",
          f"parallel.sp={str(lay['sp']).lower()}"]
    ov += [f"adapter.mora_type={row['mora_type']}"] if "mora_type" in row else []
    ov += [f"run.profile=[{a.profile}]"] if a.profile else []
    ov += model_overrides(a.size)  # the shape also with hf_dir (the same values)
    ov += a.set
    if hf:
        ov.append(f"model.hf_dir={hf}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={lay['gpus']}", f"--master_port={port}",
           os.path.join(ROOT, "launch", "train.py"), *ov]
    env = dict(os.environ, **NCCL_ENV, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.time()
    exited = True  # False: killed at --timeout (a run that trained but hung at exit shows here)
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
        text, err = p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        text, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        exited = False
    os.makedirs(a.out, exist_ok=True)
    with open(run_dir + ".log", "w") as f:
        f.write(" ".join(cmd) + "\n" + text + "\n----- stderr\n" + err)
    summ = next((json.loads(ln.split(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("throughput: ")), None)
    out = dict(size=a.size, config=method, layout=layout, tp=lay["tp"], pp=lay["pp"], dp=lay["dp"], sp=lay["sp"],
               mbs=mbs, global_batch=gb, graph=a.graph, wall_s=round(time.time() - t0, 1), exited=exited)
    if not summ or summ.get("tokens_per_s_per_gpu") is None:
        tb = [ln for ln in err.splitlines() if ln.startswith("[rank0]:")] or err.splitlines()
        return dict(out, error="\n".join(tb[-25:])[-2500:])
    losses = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for ln in f:
            d = json.loads(ln)
            if "loss" in d and "step" in d:
                losses.append(d["loss"])
    return dict(out, tokens_per_s_per_gpu=round(summ["tokens_per_s_per_gpu"]), peak_gib=round(summ["peak_mem_gib"], 2),
                mfu=round(summ.get("mfu") or 0, 3), losses=losses)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--methods", default="lora,mora-rotation")
    ap.add_argument("--layouts", default="tp1,tp2sp,dp2,pp2")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--mbs-pp", type=int, default=0, help="micro-batch size under PP (default: --mbs)")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--graph", action="store_true", help="train.cuda_graph=true (PP: the whole schedule as one graph)")
    ap.add_argument("--hf", action="store_true", help="start every layout from one random HF checkpoint (losses comparable)")
    ap.add_argument("--profile", default="", help="FIRST,N: profile those steps of every run (run.profile; "
                    "tables in <out>/<run>/profile_rank<r>.txt, the steps left out of the throughput)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra launch/train.py override for every run (repeatable), e.g. parallel.overlap_sp=false")
    ap.add_argument("--peak-tflops", type=float, default=772.0)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--out", default="runs/scaling")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    s = SIZES[a.size]
    data = random_tokens(os.path.join(a.out, f"tokens_{a.size}"), s["vocab_size"],
                         (a.steps + 2) * a.global_batch * (a.seq + 1) * 2)
    hf = write_hf_checkpoint(a.size, os.path.join(a.out, f"hf_{a.size}"), a.seq) if a.hf else None
    path = os.path.join(a.out, "rows.json")
    rows = json.load(open(path)) if os.path.exists(path) else []
    for i, method in enumerate(a.methods.split(",")):
        base = None
        for j, layout in enumerate(a.layouts.split(",")):
            r = run_layout(a, method, layout, data, hf, 29400 + 10 * i + j)
            r["device"] = device
            if layout == "tp1":
                base = r
            if base and "error" not in base and "error" not in r:
                r["efficiency"] = round(r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"], 3)
                n = min(len(base["losses"]), len(r["losses"]))
                r["loss_max_abs_diff"] = round(max(abs(x - y) for x, y in zip(base["losses"][:n], r["losses"][:n])), 5)
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
            json.dump(rows, open(path, "w"), indent=1)
    print("\n| size | config | layout | mbs | tok/s/GPU | eff. vs TP=1 | peak GiB | loss max |diff| |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | {r['config']} | {r['layout']} | {r['mbs']} | error: {r['error'][-200:]!r} | | | |")
        else:
            print(f"| {r['size']} | {r['config']} | {r['layout']} | {r['mbs']} | {r['tokens_per_s_per_gpu']:,} | "
                  f"{r.get('efficiency', '-')} | {r['peak_gib']} | {r.get('loss_max_abs_diff', '-')} |")


if __name__ == "__main__":
    main()
