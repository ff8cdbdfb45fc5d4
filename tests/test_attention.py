"""Pruned causal attention (tierec.modules.attention) and SASRec's --attention pruned."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tierec.errors import ConfigError
from tierec.modules.attention import PrunedAttention, full_attention_flops
from tierec.modules.sasrec import SASRec
from tierec.train.config import TrainConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread (two threads on a loaded 2-core machine spin ~30x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(D=16, H=2, **kw) -> tuple[PrunedAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    pa = PrunedAttention(D, H, **kw).eval()
    with torch.no_grad():
        pa.in_proj_bias.normal_()
        pa.out_proj.bias.normal_()
    mha = nn.MultiheadAttention(D, H, batch_first=True).eval()
    mha.load_state_dict(pa.state_dict())  # the same parameters, the same keys
    return pa, mha


def _masks(B, L, pad):
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    return causal.unsqueeze(0) | pad[:, None, :]


@pytest.mark.parametrize("score", ["int8", "lowrank"])
def test_keep_all_equals_full_attention(score):
    B, L, D, H = 3, 20, 16, 2
    pa, mha = _pair(D, H, keep=L, score=score)
    x, y = torch.randn(B, L, D), torch.randn(B, L, D)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    with torch.no_grad():
        ref = mha(x, y, y, attn_mask=causal, need_weights=False)[0]
        assert torch.allclose(pa(x, y, y), ref, atol=1e-5, rtol=1e-5)  # query differs from key/value (post-LN)
        ref = mha(x, x, x, attn_mask=causal, need_weights=False)[0]
        assert torch.allclose(pa(x, x, x), ref, atol=1e-5, rtol=1e-5)
        # padding keys are masked: the same as full attention with them masked, on the real queries
        pad = torch.zeros(B, L, dtype=torch.bool)
        pad[1, :5], pad[2, :19] = True, True
        ref = mha(x, y, y, attn_mask=_masks(B, L, pad).repeat_interleave(H, 0), need_weights=False)[0]
        out = pa(x, y, y, key_padding_mask=pad)
    assert torch.isfinite(out).all()  # padding queries keep their own position: no empty row
    assert torch.allclose(out[~pad], ref[~pad], atol=1e-5, rtol=1e-5)
    s = pa.stats.summary()
    assert s["keys_kept_per_query"] == s["keys_causal_per_query"]
    assert pa.stats.flops_full == 3 * full_attention_flops(B, L, D)


@pytest.mark.parametrize("score", ["int8", "lowrank"])
def test_kept_keys_respect_causality_padding_and_keep(score):
    B, L, D, H, keep = 4, 30, 16, 2, 5
    pa, _ = _pair(D, H, keep=keep, score=score)
    x = torch.randn(B, L, D)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, :10], pad[3, :29] = True, True
    idx, valid = pa.kept_keys(x, x, pad)
    pos = torch.arange(L).view(1, 1, L, 1)
    assert idx.shape[:3] == (B, H, L) and idx.shape[-1] <= keep
    assert torch.equal(idx[..., 0], pos[..., 0].expand(B, H, L)) and valid[..., 0].all()  # own position first
    assert not (valid & (idx > pos)).any()  # no future key
    padded_key = pad.gather(1, idx.reshape(B, -1)).view_as(idx)
    assert not (valid[..., 1:] & padded_key[..., 1:]).any()  # no padding key but a query's own
    # no duplicates among kept keys
    kept = torch.where(valid, idx, -1 - torch.arange(idx.shape[-1]))
    assert (kept.sort(-1).values.diff(dim=-1) != 0).all()
    real_before = (~pad).cumsum(1).view(B, 1, L).expand(B, H, L)  # causal non-padding keys of each query
    want = torch.where(pad.view(B, 1, L), 1, real_before.clamp(max=keep))
    assert torch.equal(valid.sum(-1), want)


def _identity_attention(D: int, keep: int, threshold=None) -> PrunedAttention:
    """One head whose q = k = v = x and output = attention output (identity projections, no bias)."""
    pa = PrunedAttention(D, 1, keep=keep, threshold=threshold).eval()
    with torch.no_grad():
        pa.in_proj_weight.copy_(torch.eye(D).repeat(3, 1))
        pa.in_proj_bias.zero_()
        pa.out_proj.weight.copy_(torch.eye(D))
        pa.out_proj.bias.zero_()
    return pa


def test_top_k_limits_the_keys_hand_built():
    D = 4
    e = torch.eye(D) * 3.0
    # query at position 3 is e0; keys: e0 (pos 0, matches), e1, e2; position 3 itself e0
    x = torch.stack([e[0], e[1], e[2], e[0]]).unsqueeze(0)  # [1, 4, D]
    with torch.no_grad():
        one = _identity_attention(D, keep=1)(x, x, x)
        two = _identity_attention(D, keep=2)(x, x, x)
        full = _identity_attention(D, keep=4)(x, x, x)
    assert torch.allclose(one, x)  # only its own key: the output is its own value
    # keep 2 at position 3: itself and position 0 (the best other key, both e0): the output is e0 exactly
    assert torch.allclose(two[0, 3], e[0], atol=1e-6)
    # full attention also mixes in e1 and e2 (score 0 vs 9 / sqrt(4) = 4.5)
    w = torch.softmax(torch.tensor([4.5, 0.0, 0.0, 4.5]), 0)
    assert torch.allclose(full[0, 3], w[0] * e[0] + w[1] * e[1] + w[2] * e[2] + w[3] * e[0], atol=1e-5)
    assert not torch.allclose(two[0, 3], full[0, 3], atol=1e-3)
    # keep 2 at position 2 (query e2): itself, then one of the two keys scoring 0 (e0, e1): weights 1 : e^-4.5
    p = torch.softmax(torch.tensor([4.5, 0.0]), 0)
    assert any(torch.allclose(two[0, 2], p[0] * e[2] + p[1] * e[j], atol=1e-5) for j in (0, 1))


def test_threshold_drops_keys_far_below_the_best():
    D = 4
    e = torch.eye(D) * 3.0
    x = torch.stack([e[0], e[1], e[2], e[0]]).unsqueeze(0)
    pa = _identity_attention(D, keep=4, threshold=1.0)
    idx, valid = pa.kept_keys(x, x)
    # position 3 (e0): itself and position 0 (logit 4.5); e1, e2 (logit 0) are 4.5 below: dropped
    assert sorted(idx[0, 0, 3][valid[0, 0, 3]].tolist()) == [0, 3]
    assert valid.shape[-1] == 2  # the gathered width is trimmed to the most any query keeps
    with torch.no_grad():
        assert torch.allclose(pa(x, x, x)[0, 3], e[0], atol=1e-6)
    wide = _identity_attention(D, keep=4, threshold=10.0)
    assert torch.equal(wide.kept_keys(x, x)[1].sum(-1), torch.tensor([[[1, 2, 3, 4]]]))


def test_gradient_flows_through_the_exact_part():
    B, L, D, H = 2, 12, 8, 2
    pa, mha = _pair(D, H, keep=4)
    pa.train(), mha.train()  # dropout 0: train mode only builds the graph
    x = torch.randn(B, L, D, requires_grad=True)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, :3] = True
    pa(x, x, x, key_padding_mask=pad)[~pad].pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the same gradients as exact attention with every key but the kept ones masked (selection: no gradient)
    idx, valid = pa.kept_keys(x, x, pad)
    allowed = torch.zeros(B, H, L, L, dtype=torch.bool)
    allowed.scatter_(-1, idx, valid)
    x2 = x.detach().clone().requires_grad_()
    mha(x2, x2, x2, attn_mask=~allowed.view(B * H, L, L), need_weights=False)[0][~pad].pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    for (name, p), p2 in zip(pa.named_parameters(), mha.parameters(), strict=True):
        assert p.grad is not None and torch.allclose(p.grad, p2.grad, atol=1e-5), name


def test_stats_count_keys_and_flops():
    B, L, D = 2, 40, 16
    pa, _ = _pair(D, 2, keep=8)
    with torch.no_grad():
        pa(torch.randn(B, L, D), torch.randn(B, L, D), torch.randn(B, L, D))
    s = pa.stats.summary()
    causal_mean = (L + 1) / 2
    assert s["keys_causal_per_query"] == causal_mean
    assert s["keys_kept_per_query"] == sum(min(i + 1, 8) for i in range(L)) / L
    assert s["flops_full"] == full_attention_flops(B, L, D)
    assert s["flops_approx"] == 2 * (B * 2) * L * L * (D // 2)  # one query chunk: every key of the row scored
    assert s["flops_exact_kept"] == 4 * (D // 2) * round(s["keys_kept_per_query"] * B * 2 * L)
    assert s["exact_kept_over_full"] < 0.25
    assert pa.reset_stats().forwards == 1 and pa.stats.forwards == 0


# --------------------------------------------------------------------------- SASRec
def _sasrec(**kw) -> SASRec:
    torch.manual_seed(0)  # the FFN biases draw from torch's generator
    return SASRec(100, 16, 12, 2, 2, 0.0, False, seed=3, **kw).eval()


def test_sasrec_full_is_unchanged_and_pruned_keep_all_matches_it():
    base, full, pruned = _sasrec(), _sasrec(attention="full"), _sasrec(attention="pruned", attn_keep=12)
    assert all(type(b.attn) is nn.MultiheadAttention for b in full.blocks)
    assert base.state_dict().keys() == pruned.state_dict().keys()
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in base.state_dict().items())
    x = torch.randint(1, 101, (4, 12))
    with torch.no_grad():
        h0 = base.encode(x, base.lookup(x)[0])
        assert torch.equal(h0, full.encode(x, full.lookup(x)[0]))  # bit-identical
        hp = pruned.encode(x, pruned.lookup(x)[0])
    assert torch.allclose(h0, hp, atol=1e-5)  # no padding: every key kept is full attention
    assert full.attention_stats() is None
    st = pruned.attention_stats(reset=True)
    assert st is not None and st["keys_kept_per_query"] == 6.5
    assert pruned.attention_stats()["flops_full"] == 0
    # a pruned model trains (loss decreases on one batch)
    model = _sasrec(attention="pruned", attn_keep=3).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pos, neg = torch.randint(1, 101, (4, 12)), torch.randint(1, 101, (4, 12))
    losses = []
    for _ in range(5):
        loss = model.loss(x, pos, neg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("bad,match", [
    (dict(attn_keep=0), "attn_keep must be an integer >= 1"),
    (dict(attn_threshold=-1.0), "attn_threshold must be a finite number >= 0"),
    (dict(attn_threshold=math.inf), "attn_threshold must be a finite number >= 0"),
    (dict(attn_score="fp4"), "attn_score must be one of int8, lowrank"),
    (dict(attn_rank=0), "attn_rank must be an integer >= 1"),
])
def test_config_validation(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(data="x", model="sasrec", attention="pruned", **bad)
    with pytest.raises(ValueError, match="attention must be one of full, pruned"):
        SASRec(10, 8, 4, attention="sparse")


def test_cli_trains_pruned_and_records_its_stats(tmp_path, capsys):
    import json

    import numpy as np

    from tierec.cli import main

    rng = np.random.default_rng(0)
    src = tmp_path / "pairs.txt"
    src.write_text("".join(f"{u} {i}\n" for u in range(1, 41) for i in rng.integers(1, 30, size=12)))
    assert main(["data", "convert", "--format", "sequences", str(src), "--out", str(tmp_path / "ds")]) == 0
    capsys.readouterr()
    assert main(["train", "--model", "sasrec", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"),
                 "--embedding-dim", "8", "--max-len", "10", "--batch-size", "16", "--num-blocks", "1",
                 "--no-progress", "--attention", "pruned", "--attn-keep", "3", "--num-threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 <= summary["test"]["hr@10"] <= 1
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch = next(r for r in records if r["event"] == "epoch")
    assert 1 <= epoch["attention"]["keys_kept_per_query"] <= 3 < epoch["attention"]["keys_causal_per_query"]
    start = next(r for r in records if r["event"] == "start")
    assert start["config"]["attention"] == "pruned" and start["config"]["attn_keep"] == 3
    assert main(["eval", str(tmp_path / "run")]) == 0  # the checkpoint rebuilds the pruned model
    assert json.loads(capsys.readouterr().out)["hr@10"] == summary["test"]["hr@10"]
