"""tierec.modules.dense_optim: torch.optim's Adam / Adagrad / SGD bit for bit, its state dict format both ways,
and a training run that never imports torch._dynamo."""

import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from tierec.modules import dense_optim

# (our class, torch's class, keyword arguments)
CASES = {
    "adam": (dense_optim.Adam, torch.optim.Adam, dict(lr=1e-2)),
    "adam-betas-0.98": (dense_optim.Adam, torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.98))),
    "adam-weight-decay": (dense_optim.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    "adam-amsgrad": (dense_optim.Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    "adamw": (dense_optim.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    "adagrad": (dense_optim.Adagrad, torch.optim.Adagrad, dict(lr=5e-2)),
    "adagrad-options": (dense_optim.Adagrad, torch.optim.Adagrad,
                        dict(lr=5e-2, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1)),
    "sgd": (dense_optim.SGD, torch.optim.SGD, dict(lr=5e-2)),
    "sgd-momentum": (dense_optim.SGD, torch.optim.SGD, dict(lr=5e-2, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov": (dense_optim.SGD, torch.optim.SGD, dict(lr=5e-2, momentum=0.9, nesterov=True)),
}


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 7, generator=g), torch.rand(32, 1, generator=g)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def assert_same_params(a, b):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def assert_same_state(sa, sb, skip=("foreach",)):
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys(), k
        for key, va in sa["state"][k].items():
            vb = sb["state"][k][key]
            assert va.dtype == vb.dtype and torch.equal(va, vb), (k, key)
    strip = [{k: v for k, v in g.items() if k not in skip} for g in sa["param_groups"]]
    assert strip == [{k: v for k, v in g.items() if k not in skip} for g in sb["param_groups"]]


def pair(case, seed=0):
    ours_cls, torch_cls, kw = CASES[case]
    a, b = mlp(seed), mlp(seed)
    return a, ours_cls(a.parameters(), **kw), b, torch_cls(b.parameters(), foreach=False, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_twenty_steps_are_bit_identical_to_torch_optim(case):
    a, ours, b, ref = pair(case)
    data = batches(20)
    train(a, ours, data)
    train(b, ref, data)
    assert_same_params(a, b)
    assert_same_state(ours.state_dict(), ref.state_dict())
    assert not torch.equal(a[0].weight, mlp()[0].weight)  # it trained


@pytest.mark.parametrize("case", ["adam", "adagrad", "sgd-momentum"])
def test_state_dict_has_torch_optims_keys_and_defaults(case):
    ours_cls, torch_cls, kw = CASES[case]
    a, b = mlp(), mlp()
    ours, ref = ours_cls(a.parameters(), **kw), torch_cls(b.parameters(), **kw)  # torch's defaults: foreach=None
    train(a, ours, batches(1))
    train(b, ref, batches(1))
    so, sr = ours.state_dict(), ref.state_dict()
    assert so["param_groups"] == sr["param_groups"]
    assert list(so["param_groups"][0]) == list(sr["param_groups"][0])
    assert_same_state(so, sr, skip=())
    if case != "sgd-momentum":
        assert so["state"][0]["step"].dtype == torch.float32 and so["state"][0]["step"].dim() == 0
    # torch.save / torch.load(weights_only) of a checkpoint keep it exactly
    buf = io.BytesIO()
    torch.save(so, buf)
    buf.seek(0)
    assert_same_state(torch.load(buf, weights_only=True), sr, skip=())


@pytest.mark.parametrize("case", ["adam", "adam-betas-0.98", "adagrad", "sgd-momentum"])
def test_torch_optim_state_loads_into_ours_and_back(case):
    data = batches(20)
    # torch.optim for 8 steps -> ours from its state dict -> 12 more steps, beside torch going on
    a, ours, b, ref = pair(case)
    train(b, ref, data[:8])
    a.load_state_dict(b.state_dict())
    sd = ref.state_dict()
    ours.load_state_dict(sd)
    theirs = {v.data_ptr() for s in sd["state"].values() for v in s.values()}
    assert not theirs & {v.data_ptr() for s in ours.state.values() for v in s.values()}  # copies, never aliases
    train(a, ours, data[8:])
    train(b, ref, data[8:])
    assert_same_params(a, b)
    assert_same_state(ours.state_dict(), ref.state_dict())
    # ours for 8 steps -> torch.optim from its state dict -> 12 more steps, beside ours going on
    a, ours, b, ref = pair(case, seed=5)
    train(a, ours, data[:8])
    b.load_state_dict(a.state_dict())
    ref.load_state_dict(copy.deepcopy(ours.state_dict()))  # torch.optim keeps the tensors it is given
    train(a, ours, data[8:])
    train(b, ref, data[8:])
    assert_same_params(a, b)
    assert_same_state(ours.state_dict(), ref.state_dict())


def test_state_dict_round_trips_through_ours():
    a, ours, _, _ = pair("adam")
    train(a, ours, batches(3))
    b = copy.deepcopy(a)
    other = dense_optim.Adam(b.parameters(), lr=1e-2)
    other.load_state_dict(ours.state_dict())
    assert_same_state(ours.state_dict(), other.state_dict(), skip=())
    train(a, ours, batches(4, seed=9))
    train(b, other, batches(4, seed=9))
    assert_same_params(a, b)


def test_param_groups_lr_can_be_read_and_set():
    a, ours, b, ref = pair("adam")
    data = batches(6)
    train(a, ours, data[:3])
    train(b, ref, data[:3])
    assert ours.param_groups[0]["lr"] == 1e-2
    ours.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 3e-3
    train(a, ours, data[3:])
    train(b, ref, data[3:])
    assert_same_params(a, b)
    assert ours.state_dict()["param_groups"][0]["lr"] == 3e-3


def test_mismatched_state_dicts_are_refused_with_what_differs():
    a, ours, b, ref = pair("adam")
    train(b, ref, batches(2))
    sd = ref.state_dict()
    small = dense_optim.Adam(list(mlp().parameters())[:2])
    with pytest.raises(ValueError, match="group 0 has 6 parameters, the optimizer's 2"):
        small.load_state_dict(sd)
    with pytest.raises(ValueError, match="parameter group"):
        ours.load_state_dict({"state": {}, "param_groups": sd["param_groups"] * 2})
    wrong = nn.Sequential(nn.Linear(7, 15), nn.ReLU(), nn.Linear(15, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(ValueError, match=r"exp_avg.* is \(16, 7\), the parameter \(15, 7\)"):
        dense_optim.Adam(wrong.parameters()).load_state_dict(sd)
    with pytest.raises(ValueError, match="betas"):  # Adam's state into Adagrad
        dense_optim.Adagrad(mlp().parameters()).load_state_dict(sd)
    before = {k: {key: v.clone() for key, v in s.items()} for k, s in ours.state_dict()["state"].items()}
    bad = copy.deepcopy(sd)
    del bad["state"][3]["exp_avg_sq"]
    with pytest.raises(ValueError, match="parameter 3 has keys"):
        ours.load_state_dict(bad)
    assert ours.state_dict()["state"].keys() == before.keys()  # a refused load changes nothing


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError):
        dense_optim.Adam(mlp().parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="empty"):
        dense_optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        dense_optim.SGD(mlp().parameters(), lr=0.1, nesterov=True)
    with pytest.raises(TypeError):
        dense_optim.Adam(mlp().parameters(), lr=torch.tensor(0.1))  # type: ignore[arg-type]


def test_zero_grad_keeps_zeros_when_asked():
    a, ours, _, _ = pair("sgd")
    train(a, ours, batches(1))
    ours.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in a.parameters())
    ours.zero_grad()
    assert all(p.grad is None for p in a.parameters())


def test_training_never_imports_torch_dynamo(tiny_dataset, tmp_path):
    """A `tierec train` (and a resume: load_state_dict) in a fresh process: torch.optim would import
    torch._dynamo and sympy (~72 MiB resident); tierec's dense optimizers do not."""
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        from tierec.cli import main
        common = ["train", "--data", {str(tiny_dataset)!r}, "--out", {str(tmp_path / "run")!r}, "--no-progress",
                  "--embedding-dim", "8", "--bottom-mlp", "16", "--top-mlp", "16", "--batch-size", "512"]
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([*common, "--max-steps", "2"]) == 0
            assert main([*common, "--max-steps", "3", "--resume"]) == 0
        print("torch._dynamo" in sys.modules, "sympy" in sys.modules)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["False", "False"], p.stdout
