"""Multi-task models (MMoE, PLE) and sparse mixtures of experts: dispatch, gates, training exactness."""

import json

import pytest
import torch

from tierec.modules.embedding import TableConfig, build_collection
from tierec.modules.multitask import MultiTask, balancing_loss, dense_flops_per_sample, gate_weights
from tierec.modules.optim import SparseOptimizer
from tierec.sparse import KeyedJaggedTensor
from tierec.train.trainer import Trainer

from test_tiered import cfg, table_rows


def _model(kind="mmoe", tasks=2, experts=4, top_k=0, levels=1, seed=0):
    torch.manual_seed(seed)
    ebc = build_collection([TableConfig(f"t{i}", 50, 8) for i in range(3)], SparseOptimizer("sgd", 0.1), seed=1)
    return MultiTask(kind, 4, ebc, tasks, [16], [16, 12], [8], experts, top_k, levels)


def _inputs(B=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (3 * B,), generator=g)
    values = torch.randint(0, 50, (int(lengths.sum()),), generator=g)
    return torch.randn(B, 4, generator=g), KeyedJaggedTensor(["t0", "t1", "t2"], values, lengths)


def test_gate_weights_keep_the_top_k_renormalised():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    w, p = gate_weights(logits, 2)
    assert torch.equal((w > 0).sum(1), torch.tensor([2, 2])) and torch.allclose(w.sum(1), torch.ones(2))
    assert w[0, 1] > w[0, 2] > 0 and w[0, 0] == 0 and torch.allclose(p.sum(1), torch.ones(2))
    dense, _ = gate_weights(logits, 0)
    assert torch.equal(dense, torch.softmax(logits, 1))
    assert float(balancing_loss(torch.eye(4), torch.full((4, 4), 0.25))) == pytest.approx(1.0)  # balanced


@pytest.mark.parametrize("kind,levels", [("mmoe", 1), ("ple", 1), ("ple", 2)])
def test_sparse_dispatch_equals_masked_dense_compute(kind, levels):
    """Top-k experts run on their rows alone (gather / scatter); the result is what running every expert on every
    row and weighting by the sparse gates gives."""
    m = _model(kind, top_k=2, levels=levels)
    dense, kjt = _inputs()
    m.eval()
    with torch.no_grad():
        got = m(dense, kjt)
        rows = m.expert_rows_per_sample
        for lvl in m.levels:
            lvl.top_k_dense_reference = True
        ref = _masked_dense(m, dense, kjt)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    n_gates = 2 if kind == "mmoe" else 2 * levels + (levels - 1)
    assert 0 < rows <= n_gates * 2  # each gate sends a sample to 2 experts; shared choices run once
    assert rows < sum(len(lvl.experts) for lvl in m.levels)  # fewer than every expert


def _masked_dense(m, dense, kjt):
    """Every expert on every row, outputs weighted by the sparse gates (the reference for the dispatch)."""
    x = m.bottom(dense)
    h0 = torch.cat([x, *m.embeddings.pooled(kjt)], 1)
    inputs = [h0] * (m.num_tasks + 1)
    for lvl in m.levels:
        ys = [e(inputs[i]) for e, i in zip(lvl.experts, lvl.expert_input, strict=True)]
        outs = []
        for gate, gi in zip(lvl.gates, lvl.gate_input, strict=True):
            w, _ = gate_weights(gate.proj(inputs[gi]), lvl.top_k)
            outs.append(sum(w[:, j : j + 1] * ys[c] for j, c in enumerate(gate.candidates)))
        inputs = outs if len(outs) > m.num_tasks else [*outs, outs[0]]
    return torch.cat([t(inputs[k]) for k, t in enumerate(m.towers)], 1)


def test_top_k_of_all_experts_is_the_dense_mixture_and_gradients_reach_gates_and_experts():
    dense, kjt = _inputs()
    a, b = _model(top_k=0), _model(top_k=4)  # same weights (same seed), k = every expert
    torch.testing.assert_close(a(dense, kjt), b(dense, kjt), rtol=1e-6, atol=1e-7)
    m = _model(top_k=1)
    out = m(dense, kjt)
    (out.sum() + m.aux_loss).backward()
    lvl = m.levels[0]
    assert all(g.proj.weight.grad is not None and g.proj.weight.grad.abs().sum() > 0 for g in lvl.gates)
    assert sum(e[0].weight.grad is not None for e in lvl.experts) >= 2
    assert float(m.aux_loss.detach()) >= 1.0 - 1e-6  # >= 1, 1 when balanced
    assert dense_flops_per_sample(m) < dense_flops_per_sample(_run(_model(top_k=0), dense, kjt))


def _run(m, dense, kjt):
    m(dense, kjt)
    return m


@pytest.mark.parametrize("model,kw", [("mmoe", {}), ("ple", dict(ple_levels=2, expert_top_k=2))])
def test_multitask_models_train_exactly_on_every_tier(tiny_dataset, tmp_path, model, kw):
    """One label (the tiny data set): the model trains (AUC well above chance), SSD tables behind the look-ahead
    cache give the same losses bit for bit, and a resumed run ends where the straight one does."""
    base = dict(model=model, expert_mlp=[16], tower_mlp=[8], experts=2, log_every=1, **kw)
    ref = Trainer(cfg(tiny_dataset, tmp_path / "mem", **base))
    s_ref = ref.fit()
    assert s_ref["auc"] > 0.6
    t = Trainer(cfg(tiny_dataset, tmp_path / "ssd", memory_budget="6KiB", cache_policy="lookahead", lookahead=20,
                    **base))
    s = t.fit()
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
               if json.loads(x)["event"] == "train"] for r in ("mem", "ssd")]
    assert losses[0] == losses[1] and s["auc"] == s_ref["auc"]
    Trainer(cfg(tiny_dataset, tmp_path / "res", max_steps=9, **base)).fit()
    r = Trainer(cfg(tiny_dataset, tmp_path / "res", **base), resume=True)
    r.fit()
    for name, (w, st) in table_rows(r).items():
        assert torch.equal(w, table_rows(ref)[name][0]), name


@pytest.fixture(scope="module")
def two_labels(tmp_path_factory):
    """A synthetic data set with a click and a conversion label, and an MMoE with sparse experts trained on it."""
    from tierec.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("mtl")
    data = root / "data"
    generate(SynthConfig(rows=16000, num_sparse=4, cardinalities=[1000], num_dense=3, tasks=2, seed=3, signal=2.5,
                         progress=False), data, progress=False)
    run = root / "run"
    summary = Trainer(cfg(data, run, model="mmoe", experts=4, expert_top_k=2, expert_mlp=[16], tower_mlp=[8],
                          epochs=3, task_weights=[1.0, 0.5], eval_every=40)).fit()
    return data, run, summary


def test_mmoe_learns_both_labels_and_reports_each(two_labels):
    data, run, summary = two_labels
    assert set(summary["tasks"]) == {"label", "conversion"}
    assert summary["tasks"]["label"]["auc"] == summary["auc"] > 0.6
    assert summary["tasks"]["conversion"]["auc"] > 0.65
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("tasks" in r for r in evals if r["event"] == "eval" and "auc" in r)


def test_eval_command_and_server_answer_every_label(two_labels, capsys):
    from tierec.cli import main
    from tierec.data.dataset import Dataset
    from tierec.inference.service import ServeConfig, build_server
    from tierec.train.trainer import load_for_eval

    from test_serve import serving

    data, run, summary = two_labels
    assert main(["eval", str(run)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tasks"]["conversion"]["auc"] == summary["tasks"]["conversion"]["auc"]
    ds = Dataset(str(data))
    batch = next(ds.batches("test", 16))
    model, _, _ = load_for_eval(str(run), str(data), "cpu")
    with torch.no_grad():
        offline = torch.sigmoid(model(batch.dense, batch.sparse)).numpy()  # [16, 2]
    samples = [{n: float(batch.dense[i, j]) for j, n in enumerate(ds.schema.dense)} for i in range(16)]
    for f in ds.schema.sparse:
        jt = batch.sparse.to_dict()[f.name]
        o = jt.offsets().tolist()
        for i in range(16):
            samples[i][f.name] = jt.values[o[i] : o[i + 1]].tolist()
    with serving(build_server(ServeConfig(checkpoint=str(run), data=str(data), tables="dram", warm_rows=0,
                                          threads=1))) as c:
        r = c.post("/v1/predict", json={"samples": samples})
        assert r.status_code == 200, r.text
        body = r.json()
    assert set(body["tasks"]) == {"label", "conversion"}
    for k, name in enumerate(["label", "conversion"]):
        assert body["tasks"][name] == pytest.approx(offline[:, k].tolist(), rel=1e-5, abs=1e-7)
    assert body["probabilities"] == body["tasks"]["label"]


def test_one_task_model_on_two_labels_uses_the_first(two_labels, tmp_path):
    data, _, _ = two_labels
    s = Trainer(cfg(data, tmp_path, model="dlrm", max_steps=10)).fit()
    assert "tasks" not in s and 0 < s["auc"] < 1
    with pytest.raises(Exception, match="task_weights"):
        Trainer(cfg(data, tmp_path / "w", model="mmoe", max_steps=2, task_weights=[1.0, 1.0, 1.0])).fit()
