"""DCNv2: parity with TorchRec's DLRM_DCN / CrossNet, training through the tiers, the MLPerf preset, serving."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from test_serve import serving
from test_tiered import cfg as tiered_cfg
from test_tiered import table_rows

from tierec.data.dataset import Dataset, Schema, SparseFeature
from tierec.modules.dcn import CrossNetV2, DCNv2, dense_flops_per_sample
from tierec.modules.embedding import TableConfig, build_collection
from tierec.modules.optim import SparseOptimizer
from tierec.sparse import KeyedJaggedTensor
from tierec.train.trainer import Trainer


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """Equal to float32 rounding (the same operations, possibly summed in another order)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=msg)


def cfg(data, out, **kw):
    """test_tiered's small config (dim 8, 2 epochs of 256-sample batches) as a low-rank DCNv2."""
    return tiered_cfg(data, out, **{"model": "dcnv2", "cross_layers": 2, "cross_rank": 4, **kw})


def sparse_batch(rng: np.random.Generator, keys: list[str], rows: list[int], batch: int) -> KeyedJaggedTensor:
    """A multi-hot batch with empty bags and IDs repeated across samples (gradients of a row add up)."""
    lengths = rng.integers(0, 4, size=len(keys) * batch)
    lengths[0] = 0
    values = np.concatenate([rng.integers(0, rows[k], size=int(n))
                             for k in range(len(keys)) for n in lengths[k * batch:(k + 1) * batch]])
    return KeyedJaggedTensor(keys, torch.from_numpy(values.astype(np.int64)), torch.from_numpy(lengths))


# ---------------------------------------------------------------------------------------- TorchRec parity
def torchrec_names(bottom: int, top: int, layers: int) -> dict[str, str]:
    """tierec DCNv2 parameter name -> TorchRec DLRM_DCN parameter name (``bottom`` / ``top``: Linear layers)."""
    names = {}
    for k in range(bottom):  # mlp(): Linear, ReLU, Linear, ReLU, ...; TorchRec: an MLP of Perceptrons
        for p in ("weight", "bias"):
            names[f"bottom.{2 * k}.{p}"] = f"dense_arch.model._mlp.{k}._linear.{p}"
    for k in range(top - 1):  # OverArch: an MLP of the hidden layers, then one Linear to the logit
        for p in ("weight", "bias"):
            names[f"top.{2 * k}.{p}"] = f"over_arch.model.0._mlp.{k}._linear.{p}"
    for p in ("weight", "bias"):
        names[f"top.{2 * (top - 1)}.{p}"] = f"over_arch.model.1.{p}"
    for i in range(layers):  # LowRankCrossNet: U = W_kernels [d, r], V^T = V_kernels [r, d]
        names[f"cross.U.{i}"] = f"inter_arch.crossnet.W_kernels.{i}"
        names[f"cross.V.{i}"] = f"inter_arch.crossnet.V_kernels.{i}"
        names[f"cross.b.{i}"] = f"inter_arch.crossnet.bias.{i}"
    return names


def test_dlrm_dcn_parity_with_torchrec_forward_and_gradients():
    """TorchRec's DLRM_DCN (low-rank cross) and tierec's DCNv2 with the same weights: the same logits, the
    same dense gradients, and tierec's SGD (lr 1) update of every embedding row is TorchRec's row gradient."""
    pytest.importorskip("torchrec", reason="torchrec is an optional extra (make torchrec)")
    from torchrec.models.dlrm import DLRM_DCN
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection as TREBC

    keys, rows, dim, n_dense, B = ["f0", "f1", "f2"], [20, 31, 7], 8, 4, 24
    torch.manual_seed(0)
    ebc = TREBC(tables=[EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=n, feature_names=[k])
                        for i, (k, n) in enumerate(zip(keys, rows, strict=True))])
    ref = DLRM_DCN(ebc, n_dense, dense_arch_layer_sizes=[16, dim], over_arch_layer_sizes=[16, 1], dcn_num_layers=2,
                   dcn_low_rank_dim=4)
    with torch.no_grad():  # TorchRec's cross biases start at zero: make them count
        for b in ref.inter_arch.crossnet.bias:
            b.normal_(0, 0.1)

    tables = build_collection([TableConfig(f"t{i}", n, dim, feature=k) for i, (k, n) in enumerate(zip(keys, rows,
                                                                                                       strict=True))],
                              SparseOptimizer("sgd", 1.0), seed=0)
    model = DCNv2(n_dense, tables, [16], [16], cross_layers=2, cross_rank=4, structure="stacked")
    ref_params = dict(ref.named_parameters())
    names = torchrec_names(bottom=2, top=2, layers=2)
    assert set(names) == {n for n, _ in model.named_parameters()}, "every tierec parameter has a TorchRec twin"
    assert set(names.values()) | {f"sparse_arch.embedding_bag_collection.embedding_bags.t{i}.weight"
                                  for i in range(3)} == set(ref_params)
    with torch.no_grad():
        for ours, theirs in names.items():
            p = model.get_parameter(ours)
            assert p.shape == ref_params[theirs].shape, (ours, theirs)
            p.copy_(ref_params[theirs])
        for i, bag in enumerate(model.embeddings.bags):
            bag.storage.weight.copy_(ref_params[f"sparse_arch.embedding_bag_collection.embedding_bags.t{i}.weight"])
    before = [bag.storage.weight.clone() for bag in model.embeddings.bags]

    rng = np.random.default_rng(1)
    dense = torch.randn(B, n_dense)
    kjt = sparse_batch(rng, keys, rows, B)
    labels = torch.from_numpy((rng.random(B) < 0.5).astype(np.float32))

    ref_logits = ref(dense, kjt.to_torchrec()).squeeze(1)
    torch.nn.functional.binary_cross_entropy_with_logits(ref_logits, labels).backward()
    model.train()
    logits = model(dense, kjt)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()

    close(logits, ref_logits)
    for ours, theirs in names.items():
        close(model.get_parameter(ours).grad, ref_params[theirs].grad, ours)
    for i, bag in enumerate(model.embeddings.bags):
        grad = ref_params[f"sparse_arch.embedding_bag_collection.embedding_bags.t{i}.weight"].grad
        touched = torch.unique(kjt[keys[i]].values)
        assert grad[touched].abs().sum(1).gt(0).all()
        close(before[i] - bag.storage.weight, grad)  # untouched rows: 0 both


def test_full_rank_cross_matches_torchrec_crossnet():
    pytest.importorskip("torchrec", reason="torchrec is an optional extra (make torchrec)")
    from torchrec.modules.crossnet import CrossNet

    d, layers = 24, 3
    torch.manual_seed(0)
    ref = CrossNet(d, layers)
    with torch.no_grad():
        for b in ref.bias:
            b.normal_(0, 0.1)
    ours = CrossNetV2(d, layers, rank=0)
    with torch.no_grad():  # kernels[l] [d, d] -> W[l]; bias[l] [d, 1] -> b[l] [d]
        for i in range(layers):
            ours.W[i].copy_(ref.kernels[i])
            ours.b[i].copy_(ref.bias[i].view(-1))
    x = torch.randn(16, d, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, ref_out = ours(x), ref(x2)
    close(out, ref_out)
    g = torch.randn_like(out)
    out.backward(g)
    ref_out.backward(g)
    close(x.grad, x2.grad)
    for i in range(layers):
        close(ours.W[i].grad, ref.kernels[i].grad)
        close(ours.b[i].grad, ref.bias[i].grad.view(-1))


def test_cross_layer_formula_and_init():
    """x_{l+1} = x_0 * (W x_l + b) + x_l written out, both ranks; Xavier-normal weights, zero biases."""
    torch.manual_seed(0)
    x0 = torch.randn(5, 12)
    for rank in (0, 3):
        net = CrossNetV2(12, 2, rank)
        with torch.no_grad():
            for b in net.b:
                assert not b.any()
                b.normal_()
        x = x0
        for i in range(2):
            W = net.W[i] if rank == 0 else net.U[i] @ net.V[i]
            x = x0 * (x @ W.T + net.b[i]) + x
        torch.testing.assert_close(net(x0), x, rtol=1e-5, atol=1e-5)
    big = CrossNetV2(512, 1, 0)
    assert abs(big.W[0].std().item() - (2 / (512 + 512)) ** 0.5) < 2e-3  # xavier_normal_: std sqrt(2 / (in + out))


def test_parallel_structure_and_dedup_and_flops():
    """parallel = top Linear([cross(z), deep MLP(z)]); a deduplicated batch gives the expanded batch's logits;
    FLOPs count the Linear and cross matmuls."""
    keys, rows, dim = ["u", "a", "b"], [10, 12, 9], 4
    torch.manual_seed(0)
    tables = build_collection([TableConfig(k, n, dim) for k, n in zip(keys, rows, strict=True)],
                              SparseOptimizer("sgd", 0.1), seed=0)
    model = DCNv2(3, tables, [8], [6, 5], cross_layers=2, cross_rank=0, structure="parallel").eval()
    d = 4 * dim
    assert model.deep is not None
    assert [m.out_features for m in model.deep if isinstance(m, torch.nn.Linear)] == [6, 5]
    assert [(m.in_features, m.out_features) for m in model.top] == [(d + 5, 1)]
    rng = np.random.default_rng(0)
    dense, kjt = torch.randn(7, 3), sparse_batch(rng, keys, rows, 7)
    with torch.no_grad():
        z = torch.stack([model.bottom(dense), *model.embeddings.pooled(kjt)], 1).flatten(1)
        want = model.top(torch.cat([model.cross(z), model.deep(z)], 1)).squeeze(1)
        torch.testing.assert_close(model(dense, kjt), want, rtol=0, atol=0)

        # deduplicated: the user key "u" once per unique row (3 rows for 7 samples), the item keys per sample
        user = KeyedJaggedTensor(["u"], torch.tensor([1, 2, 3, 4]), torch.tensor([2, 0, 2]), stride=3,
                                 inverse_indices=(["u"], torch.tensor([0, 1, 0, 2, 2, 1, 0])))
        items = KeyedJaggedTensor(["a", "b"], kjt.values()[kjt.offset_per_key()[1]:], kjt.lengths()[7:])
        u = user.expand()
        full = KeyedJaggedTensor(keys, torch.cat([u.values(), items.values()]), torch.cat([u.lengths(), items.lengths()]))
        close(model(dense, items, user), model(dense, full))

    stacked = DCNv2(4, build_collection([TableConfig(f"t{i}", 5, 8) for i in range(3)], SparseOptimizer(), seed=0),
                    [16], [16], cross_layers=2, cross_rank=4)
    # bottom 4-16-8, cross 2 x (32 x 4 + 4 x 32), top 32-16-1
    assert dense_flops_per_sample(stacked) == 2 * (4 * 16 + 16 * 8 + 2 * 2 * 32 * 4 + 32 * 16 + 16 * 1)
    assert dense_flops_per_sample(model) == 2 * (3 * 8 + 8 * 4 + 2 * d * d + d * 6 + 6 * 5 + (d + 5))


# ---------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """DCNv2 trained with all tables in memory: summary, table rows, dense weights, run dir."""
    out = tmp_path_factory.mktemp("dcn-ref")
    t = Trainer(cfg(tiny_dataset, out))
    summary = t.fit()
    dense = {k: v.clone() for k, v in t.model.state_dict().items()}
    return summary, table_rows(t), dense, out


def assert_same_run(t, summary, reference):
    ref_summary, ref_rows, ref_dense, _ = reference
    assert summary["auc"] == ref_summary["auc"] and summary["logloss"] == ref_summary["logloss"]
    for name, (w, s) in table_rows(t).items():
        assert torch.equal(w, ref_rows[name][0]) and torch.equal(s, ref_rows[name][1]), name
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, ref_dense[k]), k


def test_ssd_lookahead_training_is_bit_identical(tiny_dataset, tmp_path, reference):
    t = Trainer(cfg(tiny_dataset, tmp_path, memory_budget="6KiB", cache_policy="lookahead", lookahead=3,
                    prefetch_depth=2))
    summary = t.fit()
    assert {type(tb.storage).__name__ for tb in t.model.embeddings.bags} <= {"TableView", "LookaheadCache"}
    assert summary["ssd_bytes_read"] > 0
    assert_same_run(t, summary, reference)


def test_resume_mid_run_is_exact(tiny_dataset, tmp_path, reference):
    Trainer(cfg(tiny_dataset, tmp_path, max_steps=11)).fit()  # mid-epoch (16 steps an epoch)
    t = Trainer(cfg(tiny_dataset, tmp_path), resume=True)
    assert_same_run(t, t.fit(), reference)


def test_parallel_structure_learns(tiny_dataset, tmp_path):
    t = Trainer(cfg(tiny_dataset, tmp_path, dcn_structure="parallel", cross_rank=0))
    summary = t.fit()
    assert isinstance(t.model, DCNv2) and t.model.deep is not None
    assert summary["auc"] > 0.55, summary


# ---------------------------------------------------------------------------------------- preset
def test_mlperf_preset_shapes_and_flags_win(tiny_dataset):
    from tierec.train.config import make_config
    from tierec.train.trainer import build_model

    c = make_config(None, {"data": str(tiny_dataset), "preset": "mlperf-dcnv2"})
    assert (c.model, c.embedding_dim, c.bottom_mlp, c.top_mlp) == ("dcnv2", 128, [512, 256], [1024, 1024, 512, 256])
    assert (c.cross_layers, c.cross_rank, c.dcn_structure, c.dense_optimizer) == (3, 512, "stacked", "adagrad")
    schema = Schema([f"I{i}" for i in range(13)], [SparseFeature(f"C{i}", 3) for i in range(26)])  # Criteo's
    model = build_model(c, schema, torch.device("cpu"))
    assert isinstance(model, DCNv2)
    linears = [(m.in_features, m.out_features) for m in model.bottom if isinstance(m, torch.nn.Linear)]
    assert linears == [(13, 512), (512, 256), (256, 128)]
    d = 27 * 128
    assert model.cross.num_layers == 3 and len(model.cross.U) == 3
    assert all(u.shape == (d, 512) and v.shape == (512, d) for u, v in zip(model.cross.U, model.cross.V, strict=True))
    linears = [(m.in_features, m.out_features) for m in model.top if isinstance(m, torch.nn.Linear)]
    assert linears == [(d, 1024), (1024, 1024), (1024, 512), (512, 256), (256, 1)]
    macs = 13 * 512 + 512 * 256 + 256 * 128 + 3 * 2 * d * 512 + d * 1024 + 1024 * 1024 + 1024 * 512 + 512 * 256 + 256
    assert dense_flops_per_sample(model) == 2 * macs  # ~32 MFLOP per sample

    c = make_config(None, {"data": str(tiny_dataset), "preset": "mlperf-dcnv2", "embedding_dim": 16,
                           "cross_rank": 0})
    assert (c.embedding_dim, c.cross_rank, c.cross_layers, c.top_mlp) == (16, 0, 3, [1024, 1024, 512, 256])


# ---------------------------------------------------------------------------------------- serving
def test_serve_predict_equals_offline_model(tiny_dataset, reference, monkeypatch):
    """/v1/predict of a DCNv2 checkpoint (all tables pooled by one `FusedLookup`, then `DCNv2.head`) gives the
    offline model's logits bit for bit, tables in DRAM or read from the SSD files."""
    from tierec.inference.model_store import FusedLookup, ServeOptions, load_model
    from tierec.inference.service import ServeConfig, build_server
    from tierec.train.trainer import load_for_eval

    run = str(reference[3])
    assert load_model(run, ServeOptions(tables="dram", warm_rows=0)).lookup is not None, "DCNv2 uses the fused lookup"
    fused = []
    pooled = FusedLookup.pooled
    monkeypatch.setattr(FusedLookup, "pooled", lambda self, kjt: fused.append(kjt.stride()) or pooled(self, kjt))
    n = 64
    ds = Dataset(str(tiny_dataset))
    batch = next(ds.batches("test", n))
    model, _, _ = load_for_eval(run, str(tiny_dataset), "cpu")
    with torch.no_grad():
        offline = model(batch.dense, batch.sparse).numpy()
    samples: list[dict] = [{name: float(batch.dense[i, j]) for j, name in enumerate(ds.schema.dense)}
                           for i in range(n)]
    for f in ds.schema.sparse:
        jt = batch.sparse[f.name]
        o = jt.offsets().tolist()
        for i in range(n):
            samples[i][f.name] = jt.values[o[i]:o[i + 1]].tolist()
    for tables in ("dram", "ssd"):
        app = build_server(ServeConfig(checkpoint=run, data=str(tiny_dataset), tables=tables, warm_rows=0, threads=1))
        with serving(app) as c:
            r = c.post("/v1/predict", json={"samples": samples})
            assert r.status_code == 200, r.text
            assert np.array_equal(np.array(r.json()["logits"], np.float32), offline), tables
    assert sum(fused) == 2 * n, "every sample went through the fused lookup"


def test_preset_flag_from_the_command_line(tiny_dataset, tmp_path, capsys):
    """`tierec train --preset mlperf-dcnv2` (an optional choice flag): the preset's architecture, a flag wins."""
    from tierec.cli import main

    out = tmp_path / "r"
    assert main(["train", "--data", str(tiny_dataset), "--out", str(out), "--preset", "mlperf-dcnv2",
                 "--embedding-dim", "8", "--cross-rank", "4", "--max-steps", "2", "--no-progress"]) == 0
    m = json.loads(next((out / "checkpoints").glob("step-*/manifest.json")).read_text())
    c = m["config"]
    assert (c["model"], c["top_mlp"], c["cross_layers"], c["embedding_dim"], c["cross_rank"]) == (
        "dcnv2", [1024, 1024, 512, 256], 3, 8, 4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse: one line naming the choices, exit 2
        main(["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "x"), "--preset", "nope"])
    assert e.value.code == 2 and "mlperf-dcnv2" in capsys.readouterr().err
