"""The CTR models side by side (issue #20): DLRM, DCNv2, MMoE and PLE with dense and sparse experts.

    python benchmarks/bench_models.py                   # ~12 minutes on 2 cores
    python benchmarks/bench_models.py --quick           # ~4 minutes
    python benchmarks/bench_models.py --json runs/models.json

**Data.** ``tierec data synth --tasks 2``: 26 Criteo-shaped features (the generator's calibrated skew,
cardinalities capped at ``--max-cardinality``), 13 dense features, two labels: a click and a conversion
that only happens after a click (a hidden label model of its own, partly shared with the click's).

**Models**, all on the same embedding configuration (dim ``--dim``, row-wise Adagrad tables in memory),
each one ``tierec train`` process for the same steps and batches:

* ``dlrm`` and ``dcnv2`` (3 low-rank cross layers, rank 64, stacked): one task, the click;
* ``mmoe`` with dense gates over 2 experts, and ``mmoe-moe`` with 8 experts of which each task's gate
  picks 1 per sample (top-1, load-balancing loss): at most the dense one's 2 expert evaluations per
  sample (the union of the two tasks' choices), four times the expert parameters;
* ``ple`` (one extraction level, 1 expert per task + 1 shared, dense gates: 3 evaluations per sample)
  and ``ple-moe`` (4 per task + 4 shared, top-1: at most 2).

Per model: samples/s (training), peak RSS, the dense part's FLOPs per sample (experts counted as often as
they ran), test AUC and log-loss of the click, and of the conversion for the multi-task models.

**TorchRec.** DCNv2's training step against TorchRec's ``DLRM_DCN`` over its fused embedding collection
(``FusedEmbeddingBagCollection``, row-wise Adagrad in backward) on CPU, same shapes, same batches, in
this process: samples/s and the ratio (the optional torchrec extra; a note when absent).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale as bs  # noqa: E402  (child processes with peak RSS)

log = logging.getLogger("bench_models")

MODELS: dict[str, list[str]] = {
    "dlrm": ["--model", "dlrm"],
    "dcnv2": ["--model", "dcnv2", "--cross-layers", "3", "--cross-rank", "64"],
    "mmoe": ["--model", "mmoe", "--experts", "2", "--expert-mlp", "64,32"],
    "mmoe-moe": ["--model", "mmoe", "--experts", "8", "--expert-mlp", "64,32", "--expert-top-k", "1"],
    "ple": ["--model", "ple", "--experts", "1", "--expert-mlp", "64,32"],
    "ple-moe": ["--model", "ple", "--experts", "4", "--expert-mlp", "64,32", "--expert-top-k", "1"],
}


def flops_per_sample(run: Path, data: Path) -> float | None:
    """The dense part's FLOPs per sample of a run's final model on one test batch (experts as often as they ran)."""
    from tierec.data.dataset import Dataset
    from tierec.modules.dcn import DCNv2
    from tierec.modules.dcn import dense_flops_per_sample as dcn_flops
    from tierec.modules.dlrm import DLRM
    from tierec.modules.multitask import MultiTask
    from tierec.modules.multitask import dense_flops_per_sample as mt_flops
    from tierec.train.trainer import load_for_eval

    model, _, _ = load_for_eval(str(run), str(data), "cpu")
    batch = next(Dataset(str(data)).batches("test", 1024))
    with torch.no_grad():
        model(batch.dense, batch.sparse)
    if isinstance(model, MultiTask):
        return mt_flops(model)
    if isinstance(model, (DCNv2, DLRM)):  # Linear and cross layers, and DLRM's dot interaction
        return float(dcn_flops(model))
    return None


def dcn_against_torchrec(data: Path, dim: int, batch_size: int, steps: int) -> dict:
    """Training steps of tierec's DCNv2 and of TorchRec's DLRM_DCN (fused embedding collection) on the same
    batches, in this process: samples/s of each (median over steps after 3 warm-up steps)."""
    from tierec.data.dataset import Dataset
    from tierec.modules.dcn import DCNv2
    from tierec.modules.embedding import TableConfig, build_collection
    from tierec.modules.optim import SparseOptimizer

    ds = Dataset(str(data))
    schema = ds.schema
    batches = []
    for b in ds.batches("train", batch_size, shuffle=False, dedup=False):
        batches.append(b)
        if len(batches) == steps:
            break
    sizes = [f.num_embeddings for f in schema.sparse]
    bottom, top, layers, rank = [64, 32], [64, 32], 3, 64
    torch.manual_seed(0)
    ebc = build_collection([TableConfig(f.name, f.num_embeddings, dim) for f in schema.sparse],
                           SparseOptimizer("rowwise_adagrad", 0.05), seed=0)
    ours = DCNv2(len(schema.dense), ebc, bottom, top, layers, rank, "stacked")
    opt = torch.optim.Adam(ours.dense_parameters(), lr=1e-3)

    def step_ours(b):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(ours(b.dense, b.sparse), _click(b.labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = {"tierec_samples_per_s": _time_steps(step_ours, batches, batch_size)}
    try:
        import torchrec.optim as trec_optim
        from torchrec.models.dlrm import DLRM_DCN
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
    except Exception as e:  # the optional extra
        out["torchrec"] = f"unavailable: {str(e).splitlines()[0]} (install with `make torchrec`)"
        return out
    cfgs = [EmbeddingBagConfig(name=f.name, embedding_dim=dim, num_embeddings=n, feature_names=[f.name])
            for f, n in zip(schema.sparse, sizes, strict=True)]
    fused = FusedEmbeddingBagCollection(tables=cfgs, optimizer_type=trec_optim.RowWiseAdagrad,
                                        optimizer_kwargs={"lr": 0.05, "eps": 1e-8})
    peer = DLRM_DCN(embedding_bag_collection=fused, dense_in_features=len(schema.dense),
                    dense_arch_layer_sizes=[*bottom, dim], over_arch_layer_sizes=[*top, 1],
                    dcn_num_layers=layers, dcn_low_rank_dim=rank)
    dense_params = [p for n, p in peer.named_parameters() if "embedding_bags" not in n and "sparse_arch" not in n]
    popt = torch.optim.Adam(dense_params, lr=1e-3)

    def step_peer(b):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            peer(b.dense, b.sparse.to_torchrec()).squeeze(1), _click(b.labels))
        popt.zero_grad(set_to_none=True)
        loss.backward()
        popt.step()

    out["torchrec_samples_per_s"] = _time_steps(step_peer, batches, batch_size)
    out["tierec_over_torchrec"] = round(out["tierec_samples_per_s"] / out["torchrec_samples_per_s"], 3)
    return out


def _click(labels: torch.Tensor) -> torch.Tensor:
    return labels[:, 0] if labels.dim() == 2 else labels


def _time_steps(step, batches, batch_size: int, warmup: int = 3) -> float:
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        step(b)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return round(batch_size / statistics.median(times), 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rows and steps (~4 minutes)")
    p.add_argument("--rows", type=int, default=None, help="synthetic rows (default 400000; quick 120000)")
    p.add_argument("--max-cardinality", type=int, default=100_000, help="cap on every table's rows")
    p.add_argument("--dim", type=int, default=16, help="embedding dimension of every model")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="--num-threads of every training run")
    p.add_argument("--only", default=None, help=f"comma-separated models (default: all of {', '.join(MODELS)})")
    p.add_argument("--workdir", type=Path, default=None, help="where the data and runs go (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = parse_args(argv)
    rows = a.rows or (120_000 if a.quick else 400_000)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="tierec-models-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    chosen = {k: v for k, v in MODELS.items() if not a.only or k in a.only.split(",")}
    res: dict = {"rows": rows, "dim": a.dim, "batch_size": a.batch_size, "models": {}}
    try:
        if not data.exists():
            bs.run_logged([sys.executable, "-m", "tierec", "data", "synth", "--out", str(data), "--rows", str(rows),
                           "--tasks", "2", "--max-cardinality", str(a.max_cardinality), "--seed", "0",
                           "--no-progress"], work / "synth.log")
        for name, flags in chosen.items():
            run = work / name
            cmd = [sys.executable, "-m", "tierec", "train", "--data", str(data), "--out", str(run), "--overwrite",
                   "--no-progress", "--embedding-dim", str(a.dim), "--batch-size", str(a.batch_size), "--seed", "0",
                   "--log-every", "20", *flags]
            if a.threads:
                cmd += ["--num-threads", str(a.threads)]
            child = bs.run_logged(cmd, work / f"{name}.log")
            s = json.loads(child.out)
            tasks = s.get("tasks") or {}
            conv = tasks.get("conversion", {})
            res["models"][name] = {
                "samples_per_s": s.get("samples_per_s"), "peak_rss_mib": round(child.peak_rss / 2**20, 1),
                "auc_click": s.get("auc"), "logloss_click": s.get("logloss"), "auc_conversion": conv.get("auc"),
                "logloss_conversion": conv.get("logloss"), "steps": s.get("step"),
                "flops_per_sample": flops_per_sample(run, data)}
            log.info("%s: %s", name, res["models"][name])
        if "dcnv2" in chosen:
            res["dcnv2_vs_torchrec"] = dcn_against_torchrec(data, a.dim, a.batch_size, 20 if a.quick else 40)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_report(res)
    bs.write_json(a.json, res)
    return 0


def print_report(r: dict) -> None:
    print(f"\n{r['rows']:,} synthetic rows (click + conversion), dim {r['dim']}, batch {r['batch_size']}\n")
    head = f"{'model':<10} {'samples/s':>10} {'RSS MiB':>8} {'MFLOP/sample':>13} {'AUC click':>10} " \
           f"{'AUC conv':>9} {'logloss click':>14}"
    print(head)
    print("-" * len(head))

    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    for name, m in r["models"].items():
        mf = m["flops_per_sample"] / 1e6 if m["flops_per_sample"] else None
        print(f"{name:<10} {f(m['samples_per_s'], ',.0f'):>10} {m['peak_rss_mib']:>8.0f} {f(mf, '.3f'):>13} "
              f"{f(m['auc_click'], '.4f'):>10} {f(m['auc_conversion'], '.4f'):>9} {f(m['logloss_click'], '.4f'):>14}")
    d = r.get("dcnv2_vs_torchrec")
    if d:
        if "torchrec_samples_per_s" in d:
            print(f"\nDCNv2 training steps, same shapes and batches: tierec {d['tierec_samples_per_s']:,.0f} samples/s, "
                  f"TorchRec DLRM_DCN (fused EBC) {d['torchrec_samples_per_s']:,.0f}: {d['tierec_over_torchrec']:.2f}x")
        else:
            print(f"\nDCNv2: tierec {d['tierec_samples_per_s']:,.0f} samples/s; TorchRec {d['torchrec']}")


if __name__ == "__main__":
    sys.exit(main())
