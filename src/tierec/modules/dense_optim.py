"""Optimizers of the dense layers (the MLPs, attention blocks, heads): Adam, Adagrad, SGD.

Why not torch.optim: every torch.optim optimizer imports ``torch._dynamo`` (and with it sympy) on its
first call -- ``Optimizer.step`` is wrapped by ``_use_grad_for_differentiable``, which calls
``torch._dynamo.graph_break()``, and ``zero_grad`` / ``state_dict`` / ``load_state_dict`` /
``add_param_group`` are decorated with ``torch._disable_dynamo``. That is about 72 MiB of resident
memory in every training process (260 -> 332 MiB after ``import tierec.cli.train``) for a compiler
that is never used, and the memory budget (peak RSS <= budget + a fixed overhead) cannot carry it.
These classes never import ``torch._dynamo``.

They match torch.optim bit for bit: each step is the arithmetic of torch's single-tensor path
(``_single_tensor_adam`` / ``_single_tensor_adagrad`` / ``_single_tensor_sgd`` of torch 2.13, the path
torch takes by default for CPU parameters), the same expressions in the same order, under
``torch.no_grad()``, one parameter at a time (the ``_foreach_*`` kernels round differently). On CUDA
torch defaults to its ``foreach`` path instead, which may differ from this one in the last bit.

``state_dict()`` has exactly torch.optim's format (state keyed by parameter index, ``step`` a float32
scalar tensor, every param-group key torch writes with torch's default values), so checkpoints written
with torch.optim load into these and theirs into torch.optim. As in torch, ``state_dict()`` returns
the live state tensors (no copy: save it, or copy it, before stepping again); ``load_state_dict``
copies the tensors it is given.

Supported: float learning rates and hyper-parameters, dense real gradients. ``foreach`` / ``fused`` /
``capturable`` / ``differentiable`` are kept in the param groups (torch's keys) but the step is always
the single-tensor path; constructing one with any of them on is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

# keys a param group may carry besides the optimizer's hyper-parameters
_GROUP_EXTRA = ("params", "param_names")


def _scalar_dtype() -> torch.dtype:
    """dtype of ``state['step']``: as torch.optim's ``_get_scalar_dtype`` (not fused)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _check_nonneg(name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a number, not a Tensor (tierec's dense optimizers take plain numbers)")
    if not 0.0 <= value:
        raise ValueError(f"Invalid {name}: {value}")


class DenseOptimizer:
    """Base: param groups, per-parameter state, ``zero_grad``, ``state_dict`` / ``load_state_dict`` in
    torch.optim's format. Subclasses set ``defaults`` and implement ``_step_group`` and ``_state_keys``."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]):
        for flag in ("foreach", "fused", "capturable", "differentiable"):
            if defaults.get(flag):
                raise ValueError(f"{type(self).__name__}: {flag}=True is not supported (single-tensor path only)")
        self.defaults = defaults
        self.state: dict[Tensor, dict[str, Any]] = {}
        self.param_groups: list[dict[str, Any]] = []
        if isinstance(params, Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                            f"but got {torch.typename(params)}")
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for g in groups:
            self.add_param_group(g)

    # -- groups ------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections (a list), not a set")
        params = list(params)
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)}")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
            if p.is_complex():
                raise ValueError(f"{type(self).__name__}: complex parameters are not supported")
        group = dict(param_group)
        group["params"] = params
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        unknown = sorted(set(group) - set(self.defaults) - set(_GROUP_EXTRA))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown param group option(s) {', '.join(unknown)}")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in params}) != len(params) or seen & {id(p) for p in params}:
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(group)

    # -- stepping ----------------------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _with_grad(self, group: dict[str, Any]) -> list[tuple[Tensor, Tensor]]:
        out = []
        for p in group["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                out.append((p, p.grad))
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        if p.grad.grad_fn is not None:
                            p.grad.detach_()
                        else:
                            p.grad.requires_grad_(False)
                        p.grad.zero_()

    # -- state dicts -------------------------------------------------------------------------------------

    def _state_keys(self, group: dict[str, Any]) -> tuple[set[str], set[str]]:
        """(required, allowed) keys of one parameter's state in ``group``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's format: ``{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}``.
        The state tensors are the live ones (as torch.optim does)."""
        index: dict[int, int] = {}
        groups = []
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            for p in g["params"]:
                index.setdefault(id(p), len(index))
            packed["params"] = [index[id(p)] for p in g["params"]]
            groups.append(packed)
        state = {index[id(p)]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict` of this class or of the same torch.optim optimizer. Validated whole first
        (ValueError naming what does not match: groups, parameter counts, options, state keys, shapes);
        the tensors are copied onto the parameters' devices (floating state in the parameter's dtype)."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"{name}: a state dict needs 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}: loaded state dict has {len(saved_groups)} parameter group(s), "
                             f"the optimizer {len(self.param_groups)}")
        id_map: dict[Any, Tensor] = {}
        new_groups = []
        for i, (g, sg) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"{name}: loaded parameter group {i} has {len(sg['params'])} parameters, "
                                 f"the optimizer's {len(g['params'])}")
            unknown = sorted(set(sg) - set(self.defaults) - set(_GROUP_EXTRA))
            if unknown:
                raise ValueError(f"{name}: loaded parameter group {i} has option(s) {', '.join(unknown)} that "
                                 f"{name} does not take (a state dict of another optimizer?)")
            for k, p in zip(sg["params"], g["params"], strict=True):
                id_map[k] = p
            ng = copy.deepcopy({k: v for k, v in sg.items() if k != "params"})
            for k, default in self.defaults.items():  # keys older torch versions did not write
                ng.setdefault(k, default)
            if "param_names" in g and "param_names" not in ng:
                ng["param_names"] = g["param_names"]
            ng["params"] = g["params"]
            new_groups.append(ng)
        group_of = {id(p): ng for ng in new_groups for p in ng["params"]}
        state: dict[Tensor, dict[str, Any]] = {}
        for k, saved in state_dict["state"].items():
            if k not in id_map:
                raise ValueError(f"{name}: loaded state of parameter {k!r}, which no parameter group lists")
            p = id_map[k]
            required, allowed = self._state_keys(group_of[id(p)])
            keys = set(saved)
            if not required <= keys or not keys <= allowed:
                raise ValueError(f"{name}: loaded state of parameter {k} has keys {sorted(keys)}, expected "
                                 f"{sorted(required)}" + (f" (optional {sorted(allowed - required)})"
                                                          if allowed != required else ""))
            entry: dict[str, Any] = {}
            for key, v in saved.items():
                if key == "step":
                    entry[key] = (v.detach().clone() if isinstance(v, Tensor)
                                  else torch.tensor(float(v), dtype=_scalar_dtype()))
                elif v is None:
                    entry[key] = None
                else:
                    if not isinstance(v, Tensor) or v.shape != p.shape:
                        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                        raise ValueError(f"{name}: loaded state {key!r} of parameter {k} is {shape}, "
                                         f"the parameter {tuple(p.shape)}")
                    entry[key] = v.detach().to(device=p.device, dtype=p.dtype if p.is_floating_point() else None,
                                               copy=True)
            state[p] = entry
        self.param_groups = new_groups
        self.state = state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {v}" for k, v in sorted(g.items()) if k != "params"]
        return "\n".join(lines + [")"])


class Adam(DenseOptimizer):
    """torch.optim.Adam (``amsgrad``, ``maximize``, ``decoupled_weight_decay`` included), single-tensor path."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *, maximize: bool = False,
                 decoupled_weight_decay: bool = False):
        _check_nonneg("learning rate", lr)
        _check_nonneg("epsilon value", eps)
        _check_nonneg("weight_decay value", weight_decay)
        for i, b in enumerate(betas):
            if isinstance(b, Tensor) or not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "amsgrad": amsgrad, "maximize": maximize, "foreach": None, "capturable": False,
                                  "differentiable": False, "fused": None,
                                  "decoupled_weight_decay": decoupled_weight_decay})

    def _state_keys(self, group: dict[str, Any]) -> tuple[set[str], set[str]]:
        keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group["amsgrad"] else set())
        return keys, keys

    def _step_group(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay, amsgrad = group["lr"], group["eps"], group["weight_decay"], group["amsgrad"]
        for param, grad in self._with_grad(group):
            state = self.state.setdefault(param, {})
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype(), device="cpu")
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["maximize"]:
                grad = -grad
            exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            step_t += 1
            if weight_decay != 0:
                if group["decoupled_weight_decay"]:
                    param.mul_(1 - lr * weight_decay)
                else:
                    grad = grad.add(param, alpha=weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = step_t.item()
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            if amsgrad:
                max_sq = state["max_exp_avg_sq"]
                torch.maximum(max_sq, exp_avg_sq, out=max_sq)
                denom = (max_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            else:
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)


class Adagrad(DenseOptimizer):
    """torch.optim.Adagrad (``lr_decay``, ``weight_decay``, ``maximize`` included), single-tensor path. As
    torch, the state of every parameter is created at construction (sum = ``initial_accumulator_value``)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, *, maximize: bool = False):
        _check_nonneg("learning rate", lr)
        _check_nonneg("lr_decay value", lr_decay)
        _check_nonneg("weight_decay value", weight_decay)
        _check_nonneg("initial_accumulator_value value", initial_accumulator_value)
        _check_nonneg("epsilon value", eps)
        super().__init__(params, {"lr": lr, "lr_decay": lr_decay, "eps": eps, "weight_decay": weight_decay,
                                  "initial_accumulator_value": initial_accumulator_value, "foreach": None,
                                  "maximize": maximize, "differentiable": False, "fused": None})
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p)

    def _init_state(self, p: Tensor) -> None:
        self.state[p] = {"step": torch.tensor(0.0, dtype=_scalar_dtype()),
                         "sum": torch.full_like(p, self.defaults["initial_accumulator_value"],
                                                memory_format=torch.preserve_format)}

    def _state_keys(self, group: dict[str, Any]) -> tuple[set[str], set[str]]:
        return {"step", "sum"}, {"step", "sum"}

    def _step_group(self, group: dict[str, Any]) -> None:
        lr, lr_decay, eps, weight_decay = group["lr"], group["lr_decay"], group["eps"], group["weight_decay"]
        for param, grad in self._with_grad(group):
            if not self.state.get(param):
                self._init_state(param)  # torch: a group added later starts at the optimizer's defaults
            state = self.state[param]
            step_t, state_sum = state["step"], state["sum"]
            step_t += 1
            step = step_t.item()
            if group["maximize"]:
                grad = -grad
            if weight_decay != 0:
                grad = grad.add(param, alpha=weight_decay)
            clr = lr / (1 + (step - 1) * lr_decay)
            state_sum.addcmul_(grad, grad, value=1)
            std = state_sum.sqrt().add_(eps)
            param.addcdiv_(grad, std, value=-clr)


class SGD(DenseOptimizer):
    """torch.optim.SGD (momentum, dampening, nesterov, weight_decay, maximize), single-tensor path."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False):
        _check_nonneg("learning rate", lr)
        _check_nonneg("momentum value", momentum)
        _check_nonneg("weight_decay value", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize,
                                  "foreach": None, "differentiable": False, "fused": None})

    def _state_keys(self, group: dict[str, Any]) -> tuple[set[str], set[str]]:
        return set(), {"momentum_buffer"}

    def _step_group(self, group: dict[str, Any]) -> None:
        lr, momentum, dampening, weight_decay = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        for param, grad in self._with_grad(group):
            if group["maximize"]:
                grad = -grad
            if weight_decay != 0:
                grad = grad.add(param, alpha=weight_decay)
            if momentum != 0:
                state = self.state.setdefault(param, {})
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = grad.detach().clone()
                    state["momentum_buffer"] = buf
                else:
                    buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
            param.add_(grad, alpha=-lr)
