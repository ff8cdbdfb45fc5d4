"""Fused sparse optimizers against PyTorch's own sparse-gradient reference path."""

import math

import pytest
import torch

from tierec.modules.embedding import TableConfig, build_collection, dedup
from tierec.storage.base import INIT_CHUNK_ROWS, init_rows
from tierec.modules.optim import SparseOptimizer
from tierec.sparse import KeyedJaggedTensor

N, D, B = 40, 8, 16


def random_batch(g, weighted=False, max_len=4):
    lengths = torch.randint(0, max_len, (B,), generator=g)
    lengths[0] = 0  # always one empty bag
    values = torch.randint(0, 12, (int(lengths.sum()),), generator=g)  # few rows: lots of repeats
    w = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(["t"], values, lengths, weights=w)


def reference(kind, lr, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=1e-8, initial_accumulator_value=0.0)
    return torch.optim.SparseAdam(params, lr=lr, eps=1e-8)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_matches_torch_sparse_optimizers(kind, pooling, weighted):
    g = torch.Generator().manual_seed(0)
    opt = SparseOptimizer(kind, lr=0.1)
    coll = build_collection([TableConfig("t", N, D, pooling)], opt, seed=3)
    ref = torch.nn.EmbeddingBag(N, D, mode=pooling, sparse=True)
    ref.weight.data.copy_(coll.tables[0].storage.weight)
    ropt = reference(kind, 0.1, ref.parameters())
    # Adam divides by sqrt(v) + eps with tiny v: float reordering shows at ~1e-5 relative.
    tol = dict(rtol=1e-4, atol=1e-5) if kind == "adam" else dict(rtol=1e-5, atol=1e-6)
    for _ in range(5):
        kjt = random_batch(g, weighted)
        target = torch.randn(B, D, generator=g)
        out = coll(kjt)[:, 0]
        ((out - target) ** 2).sum().backward()
        r = ref(kjt.values(), kjt.offsets()[:-1], per_sample_weights=kjt.weights_or_none())
        ropt.zero_grad()
        ((r - target) ** 2).sum().backward()
        ropt.step()
        torch.testing.assert_close(out, r.detach(), **tol)
    torch.testing.assert_close(coll.tables[0].storage.weight, ref.weight.detach(), **tol)


def test_rowwise_adagrad_formula_and_untouched_rows():
    opt = SparseOptimizer("rowwise_adagrad", lr=0.5, eps=1e-8)
    coll = build_collection([TableConfig("t", N, D)], opt, seed=1)
    st = coll.tables[0].storage
    w0 = st.weight.clone()
    # rows 3 (twice, same bag), 5 (one bag) -> bag0 = w3 + w3, bag1 = w5
    kjt = KeyedJaggedTensor(["t"], torch.tensor([3, 3, 5]), torch.tensor([2, 1]))
    out = coll(kjt)[:, 0]
    grad_out = torch.randn(2, D)
    (out * grad_out).sum().backward()
    for row, g in [(3, 2 * grad_out[0]), (5, grad_out[1])]:
        acc = (g * g).mean()
        torch.testing.assert_close(st.state[row, 0], acc)
        torch.testing.assert_close(st.weight[row], w0[row] - 0.5 * g / (acc.sqrt() + 1e-8))
    touched = torch.zeros(N, dtype=torch.bool)
    touched[[3, 5]] = True
    assert torch.equal(st.weight[~touched], w0[~touched]), "untouched rows must not change"
    assert torch.all(st.state[~touched] == 0)
    assert st.weight.grad is None, "no dense gradient of the table may exist"


def test_eval_mode_does_not_update():
    coll = build_collection([TableConfig("t", N, D)], SparseOptimizer("sgd", lr=1.0), seed=1)
    w0 = coll.tables[0].storage.weight.clone()
    coll.eval()
    kjt = KeyedJaggedTensor(["t"], torch.tensor([1, 2]), torch.tensor([1, 1]))
    with torch.no_grad():
        coll(kjt)
    assert torch.equal(w0, coll.tables[0].storage.weight)


def test_dedup_contract():
    v = torch.tensor([5, 1, 5, 9, 1, 5])
    uniq, inverse, perm, counts = dedup(v)
    assert uniq.tolist() == [1, 5, 9]
    assert torch.equal(uniq[inverse], v)
    assert counts.tolist() == [2, 3, 1]
    assert v[perm].tolist() == [1, 1, 5, 5, 5, 9]
    assert perm.tolist()[:2] == [1, 4], "stable: equal IDs keep input order"


def test_init_is_independent_of_range_and_bounded():
    n = INIT_CHUNK_ROWS + 100
    full = init_rows(7, 2, n, 4, 0, n)
    part = init_rows(7, 2, n, 4, INIT_CHUNK_ROWS - 10, INIT_CHUNK_ROWS + 10)
    assert torch.equal(full[INIT_CHUNK_ROWS - 10 : INIT_CHUNK_ROWS + 10], part)
    assert full.abs().max() <= 1 / math.sqrt(n)
    assert not torch.equal(init_rows(8, 2, n, 4, 0, 10), full[:10]), "seed must matter"


def test_multi_table_collection_shapes():
    cfgs = [TableConfig("a", 10, 4), TableConfig("b", 20, 4, feature="fb")]
    coll = build_collection(cfgs, SparseOptimizer(), seed=0)
    kjt = KeyedJaggedTensor(["fb", "a"], torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1, 0]))
    out = coll(kjt)
    assert out.shape == (2, 2, 4)
    # table "a" gets key "a" values: sample0 -> [3], sample1 -> []
    torch.testing.assert_close(out[0, 0], coll.tables[0].storage.weight[3])
    assert torch.all(out[1, 0] == 0)
