"""1 process vs 2 torchrun processes on this machine, same global batch: samples/s, bytes exchanged, comm share.

    python benchmarks/bench_dist.py                       # 26 Criteo-shaped tables (<= 100k rows), batch 4096
    python benchmarks/bench_dist.py --steps 100 --rounds 1 --json runs/dist.json

Peers (each a real `tierec train` command, the global batch and seed identical):

- ``1p x 1t``:  one process, one torch thread (the baseline);
- ``1p x 2t``:  one process, two torch threads (the other way to use two cores);
- ``2p tw``:    ``torchrun --standalone --nproc-per-node 2``, one thread each, table-wise sharding
                (automatic plan: tables balanced by bytes + lookups);
- ``2p rw``:    the same with every table row-wise (``[sharding] tables = {C1 = "row", ...}``).

Printed side by side: samples/s and its ratio to the baseline, the bytes all ranks sent per step
by kind (the IDs' and lengths' all_to_all, the pooled rows' all_to_all, their gradients'
all_to_all, the dense gradients' all-reduce: counted in tierec.distributed.comm as payload bytes
leaving each rank, a ring all-reduce counted as 2(W-1)/W of its buffer), the share of each rank's
step time spent inside collectives (waiting for the other rank included), and the final loss/AUC
(the 2-process runs should match the baseline to ~1e-6). With --rounds > 1 the peers alternate
and the best samples/s of each is kept. Scratch data under --dir (default runs/bench_dist).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{(p.stdout + p.stderr)[-3000:]}")
    out = p.stdout
    summary = json.loads(out[out.index("{\n") : out.rindex("}") + 1])
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="runs/bench_dist")
    ap.add_argument("--rows", type=int, default=400_000, help="synthetic rows (train + test)")
    ap.add_argument("--max-cardinality", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=4096, help="global batch (split over the ranks)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--bottom-mlp", default="512,256")
    ap.add_argument("--top-mlp", default="512,256")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    root = Path(args.dir)
    data = root / f"data-{args.rows}-{args.max_cardinality}"
    py = sys.executable
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if not (data / "manifest.json").exists():
        subprocess.run([py, "-m", "tierec", "data", "synth", "--out", str(data), "--rows", str(args.rows),
                        "--max-cardinality", str(args.max_cardinality), "--no-progress"], check=True, env=env)
    schema = json.loads((data / "manifest.json").read_text())["schema"]
    names = [f["name"] for f in schema["sparse"]]
    rw = root / "rowwise.toml"
    rw.write_text("[sharding]\ntables = {" + ", ".join(f'{n} = "row"' for n in names) + "}\n")
    common = ["train", "--data", str(data), "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
              "--embedding-dim", str(args.dim), "--bottom-mlp", args.bottom_mlp, "--top-mlp", args.top_mlp,
              "--max-eval-rows", "20000", "--log-every", "1000000", "--no-progress", "--device", "cpu"]
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tierec"]
    peers = {
        "1p x 1t": [py, "-m", "tierec", *common, "--num-threads", "1"],
        "1p x 2t": [py, "-m", "tierec", *common, "--num-threads", "2"],
        "2p tw": [*torchrun, *common, "--num-threads", "1"],
        "2p rw": [*torchrun, *common, "--num-threads", "1", "--config", str(rw)],
    }
    results: dict[str, dict] = {}
    for r in range(args.rounds):
        for name, cmd in peers.items():
            out = root / f"run-{name.replace(' ', '')}"
            s = run([*cmd, "--out", str(out), "--overwrite"], dict(env, OMP_NUM_THREADS="2" if "2t" in name else "1"))
            print(f"round {r + 1} {name:>8}: {s['samples_per_s']:,.0f} samples/s", file=sys.stderr)
            if name not in results or s["samples_per_s"] > results[name]["samples_per_s"]:
                results[name] = s
    base = results["1p x 1t"]["samples_per_s"]
    kinds = ["alltoall_sizes", "alltoall_lengths", "alltoall_ids", "alltoall_pooled", "alltoall_grad",
             "allreduce_dense", "allreduce_loss"]
    print(f"\n{len(names)} tables, global batch {args.batch_size}, dim {args.dim}, MLPs {args.bottom_mlp} / "
          f"{args.top_mlp}, {args.steps} steps, {os.cpu_count()} CPU cores; best of {args.rounds} round(s)\n")
    print(f"{'peer':>8} {'samples/s':>10} {'vs 1p x 1t':>10} {'KiB/step':>9} {'comm share':>12} {'loss':>8} {'AUC':>8}")
    for name, s in results.items():
        c = s.get("comm")
        kib = f"{c['total_bytes_per_step'] / 1024:,.0f}" if c else "-"
        share = "/".join(f"{x:.0%}" for x in c["time_share_per_rank"]) if c else "-"
        print(f"{name:>8} {s['samples_per_s']:>10,.0f} {s['samples_per_s'] / base:>9.2f}x {kib:>9} {share:>12} "
              f"{s['logloss']:>8.5f} {s['auc']:>8.5f}")
    print("\nbytes sent per step, all ranks (KiB), and mean seconds per step inside each collective:")
    print(f"{'kind':>18} " + " ".join(f"{n:>16}" for n in results if results[n].get("comm")))
    for k in kinds:
        cells = []
        for n, s in results.items():
            if s.get("comm"):
                c = s["comm"]
                cells.append(f"{c['bytes_per_step'].get(k, 0) / 1024:>7,.1f} {c['seconds_per_step'].get(k, 0) * 1e3:>6.1f}ms")
        print(f"{k:>18} " + " ".join(f"{x:>16}" for x in cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
