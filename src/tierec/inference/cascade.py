"""Early exits: a cheap head answers for the samples it is confident about, the full ranker for the rest.

A served DLRM or DCNv2 computes, for every sample, the bottom MLP's output x [D] and the pooled embeddings
of its T tables (`FusedLookup`): z = [x; e_1 .. e_T] [(T+1) D]. The expensive part comes after: the dot
interaction and the top MLP (DLRM), the cross network and the top MLP (DCNv2). An `ExitHead` is a linear
map (or an MLP of one small hidden layer) of z to a logit, *distilled* from the ranker: trained on the
training split to reproduce the ranker's own probabilities (`distill`; `tierec distill-exit`). Serving with
a head (`tierec serve --exit-head FILE --exit-threshold T`), each batch

    x, z = bottom(dense), [x; pooled]                       (the ranker's, computed anyway)
    h = head(z); confidence = |sigmoid(h) - 0.5|            (in [0, 0.5])
    exit = confidence >= T                                  (per sample)
    logits[exit] = h[exit]; logits[~exit] = ranker.head(x[~exit], z[~exit])

so the interaction and top MLP run on the remaining rows only. T = 0: every sample exits; T > 0.5: none
can, and the head is not run (the answers are the plain server's, bit for bit). The response says which
samples exited (``"exit"``). `operating_points` measures, per threshold, the share of the test split that
exits, the dense FLOPs per sample and the AUC / log-loss of the cascade against the full ranker's.

The head file (``torch.save`` of plain tensors and JSON-like metadata) is loaded with ``weights_only=True``
(never runs code) and checked: its format tag, a sha256 over its tensors, their shapes, and at start the
served model's kind, width and schema (a head distilled from another step of the same run is served with a
warning; the step it was distilled from is in `ExitHead.meta`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tierec.errors import CheckpointError, ConfigError
from tierec.fsio import atomic_write_bytes
from tierec.modules.dcn import DCNv2, dense_flops_per_sample
from tierec.modules.dense_optim import Adam
from tierec.modules.dlrm import DLRM
from tierec.sparse import KeyedJaggedTensor

if TYPE_CHECKING:
    from tierec.inference.model_store import LoadedModel

log = logging.getLogger(__name__)

FORMAT, VERSION = "tierec-exit-head", 1
DEFAULT_THRESHOLDS = (0.49, 0.48, 0.45, 0.4, 0.3, 0.2, 0.0)


class ExitHead(nn.Module):
    """z [B, in_features] -> logit [B]: one Linear (``hidden == 0``), or Linear -> ReLU -> Linear."""

    def __init__(self, in_features: int, hidden: int = 0):
        super().__init__()
        if in_features < 1 or hidden < 0:
            raise ConfigError(f"an exit head needs in_features >= 1 and hidden >= 0, got {in_features}, {hidden}")
        self.in_features, self.hidden = int(in_features), int(hidden)
        sizes = [self.in_features, *([self.hidden] if self.hidden else []), 1]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.meta: dict = {}  # where it was distilled from, and its offline operating points

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)

    def flops(self) -> int:
        """FLOPs per sample (2 x multiply-adds of its Linears)."""
        return 2 * sum(m.in_features * m.out_features for m in self.net if isinstance(m, nn.Linear))


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(k.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_exit_head(path: str | Path, head: ExitHead) -> None:
    """Write ``head`` to ``path`` atomically: format tag, shapes, its state and the sha256 of that state."""
    state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "in_features": head.in_features, "hidden": head.hidden,
               "state": state, "sha256": _digest(state), "meta": head.meta}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_exit_head(path: str | Path) -> ExitHead:
    """The head saved at ``path`` (`save_exit_head`), read with ``weights_only=True`` and verified;
    CheckpointError (one line) for a file that is not one or does not check out."""
    where = f"--exit-head {path}"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{where}: a directory, not an exit head file (`tierec distill-exit --out FILE`)") \
            from None
    except Exception as e:  # noqa: BLE001 -- a pickle of anything else, a truncated file: one line
        raise CheckpointError(f"{where}: not an exit head file ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else 'unreadable'})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not an exit head file (write one with `tierec distill-exit`)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{where}: exit head format version {payload.get('version')!r}, this tierec reads "
                              f"{VERSION}")
    state = payload.get("state")
    if not isinstance(state, dict) or _digest(state) != payload.get("sha256"):
        raise CheckpointError(f"{where}: its weights do not match their sha256 (a damaged file)")
    head = ExitHead(int(payload["in_features"]), int(payload["hidden"]))
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: its weights do not fit its shapes ({str(e).splitlines()[0][:160]})") from None
    head.meta = payload.get("meta") or {}
    head.eval()
    return head


def ranker_inputs(lm: LoadedModel, dense: torch.Tensor, sparse: KeyedJaggedTensor):
    """(x [B, D], z [B, T+1, D]) as `LoadedModel.forward` computes them for a DLRM / DCNv2 (raw IDs mapped,
    every table pooled in one fused lookup); None for a model or a KJT that path does not take."""
    if lm.id_maps is not None:
        sparse = lm.id_maps.lookup_kjt(sparse)
    if lm.lookup is None or not isinstance(lm.model, (DLRM, DCNv2)) or sparse.keys() != lm.lookup.keys:
        return None
    x = lm.model.bottom(dense)
    return x, torch.cat([x.unsqueeze(1), lm.lookup.pooled(sparse)], 1)


def ranker_of(lm: LoadedModel) -> DLRM | DCNv2:
    """``lm``'s model as a DLRM / DCNv2 (the models early exits apply to)."""
    assert isinstance(lm.model, (DLRM, DCNv2))
    return lm.model


def path_flops(model: nn.Module, head: ExitHead) -> tuple[int, int]:
    """Dense FLOPs per sample of (the full ranker, an exited sample: bottom MLP + head)."""
    layers = model.bottom  # the bottom MLP (nn.Module.__getattr__ types attributes loosely)
    assert isinstance(layers, nn.Module)
    bottom = 2 * sum(m.in_features * m.out_features for m in layers.modules() if isinstance(m, nn.Linear))
    return dense_flops_per_sample(model), bottom + head.flops()


def check_fits(head: ExitHead, lm: LoadedModel, where: str = "--exit-head") -> None:
    """ConfigError unless ``head`` can read ``lm``'s pooled inputs (a DLRM / DCNv2 of the same width); warns when
    it was distilled from another checkpoint or step."""
    if lm.lookup is None or not isinstance(lm.model, (DLRM, DCNv2)):
        raise ConfigError(f"{where}: early exits need a dlrm or dcnv2 ranker, the checkpoint is a {lm.kind} model")
    width = (len(lm.lookup.keys) + 1) * lm.lookup.dim
    if head.in_features != width:
        raise ConfigError(f"{where}: the head reads {head.in_features} inputs, the ranker's pooled inputs are {width} "
                          "wide (distilled from another model)")
    schema = head.meta.get("schema")
    if schema is not None and schema != lm.schema.to_json():
        raise ConfigError(f"{where}: distilled from a model of another data set schema")
    step = head.meta.get("step")
    if step is not None and step != lm.step:
        log.warning("%s: distilled from step %s, serving step %d: its confidence was calibrated on another "
                    "checkpoint (re-run `tierec distill-exit` for this one)", where, step, lm.step)


class Cascade:
    """The served head and threshold; `forward` runs a batch through it (on the model thread). Counters:
    samples that exited / ran the full ranker, and the dense FLOPs spent and saved (per-path estimates)."""

    def __init__(self, head: ExitHead, threshold: float):
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"--exit-threshold must be in [0, 1] (confidence |p - 0.5| is at most 0.5), got "
                              f"{threshold}")
        self.head, self.threshold = head, float(threshold)
        self.exited = self.full = 0
        self.flops_spent = self.flops_saved = 0.0
        self._flops: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> path_flops
        self._fit: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the head fits it (checked once)
        self._lock = threading.Lock()

    def check(self, lm: LoadedModel, where: str = "--exit-head") -> None:
        """`check_fits` for the model served at start (ConfigError if the head does not fit it)."""
        check_fits(self.head, lm, where)
        self._fit[lm.model] = True

    def _fits(self, lm: LoadedModel) -> bool:
        """Whether the head reads ``lm``'s inputs (a reloaded model of another shape: served without exits)."""
        ok = self._fit.get(lm.model)
        if ok is None:
            try:
                check_fits(self.head, lm)
                ok = True
            except ConfigError as e:
                log.warning("%s: serving this model without early exits", e)
                ok = False
            self._fit[lm.model] = ok
        return ok

    def flops(self, model: nn.Module) -> tuple[int, int]:
        """(full, exit) FLOPs per sample of ``model`` with this head."""
        f = self._flops.get(model)
        if f is None:
            f = self._flops[model] = path_flops(model, self.head)
        return f

    @torch.no_grad()
    def forward(self, lm: LoadedModel, dense: torch.Tensor, sparse: KeyedJaggedTensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch -> (logits [B], exited bool [B]): the head's logit where its confidence clears the
        threshold, the ranker's elsewhere (computed on those rows alone)."""
        B = dense.shape[0]
        none = torch.zeros(B, dtype=torch.bool)
        inputs = ranker_inputs(lm, dense, sparse) if self.threshold <= 0.5 and self._fits(lm) else None
        if inputs is None:  # no sample can exit: the plain path, bit for bit
            logits = lm.forward(dense, sparse)
            ex = none
        else:
            x, z = inputs
            h = self.head(z.flatten(1))
            ex = (torch.sigmoid(h) - 0.5).abs() >= self.threshold  # NaN: False (the full ranker answers)
            ranker = ranker_of(lm)
            if bool(ex.all()):
                logits = h
            elif not bool(ex.any()):
                logits = ranker.head(x, z)
            else:
                rest = (~ex).nonzero().squeeze(1)
                logits = h.clone()
                logits[rest] = ranker.head(x.index_select(0, rest), z.index_select(0, rest))
        self.record(lm.model, int(ex.sum()), B)
        return logits, ex

    def record(self, model: nn.Module, exited: int, total: int) -> None:
        full, cheap = self.flops(model)
        with self._lock:
            self.exited += exited
            self.full += total - exited
            self.flops_spent += exited * cheap + (total - exited) * full
            self.flops_saved += exited * (full - cheap)

    def stats(self) -> dict:
        with self._lock:
            return {"exited": self.exited, "full": self.full, "flops_spent": self.flops_spent,
                    "flops_saved": self.flops_saved, "threshold": self.threshold}


# -- distillation and operating points (offline, `tierec distill-exit`) ------------------------------------------


@dataclass
class DistillSettings:
    hidden: int = 0  # 0: a linear head
    epochs: int = 2
    batch_size: int = 4096
    lr: float = 3e-3
    max_rows: int | None = None  # training rows per epoch (None: the whole split)
    eval_rows: int | None = None  # test rows for the operating points (None: the whole split)
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.hidden < 0:
            raise ConfigError(f"--hidden must be >= 0, got {self.hidden}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        for name in ("max_rows", "eval_rows"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def _batches(lm: LoadedModel, ds, split: str, batch_size: int, max_rows: int | None, **kw):
    """(x, z, ranker logits, labels) per batch of ``split``, computed as the server computes them."""
    for batch in ds.batches(split, batch_size, max_rows=max_rows, **kw):
        inputs = ranker_inputs(lm, batch.dense, batch.sparse)
        if inputs is None:
            raise ConfigError(f"{lm.path}: the data set's sparse features are not the ranker's tables")
        x, z = inputs
        labels = batch.labels if batch.labels.dim() == 1 else batch.labels[:, 0]
        yield x, z, ranker_of(lm).head(x, z), labels


def distill(lm: LoadedModel, ds, settings: DistillSettings, progress=None) -> ExitHead:
    """An `ExitHead` trained on ``ds``'s training split to reproduce ``lm``'s probabilities (binary
    cross-entropy against the ranker's sigmoid: soft targets), Adam, ``settings.epochs`` passes."""
    torch.manual_seed(settings.seed)
    width = (len(lm.lookup.keys) + 1) * lm.lookup.dim if lm.lookup is not None else 0
    head = ExitHead(width, settings.hidden)
    opt = Adam(head.parameters(), lr=settings.lr)
    lm.model.eval()
    for epoch in range(settings.epochs):
        t0, n, total = time.perf_counter(), 0, 0.0
        for _x, z, teacher, _y in _batches(lm, ds, "train", settings.batch_size, settings.max_rows, shuffle=True,
                                            seed=settings.seed, epoch=epoch):
            with torch.no_grad():
                zf, target = z.flatten(1).detach(), torch.sigmoid(teacher).detach()
            loss = F.binary_cross_entropy_with_logits(head(zf), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += zf.shape[0]
            total += float(loss.detach()) * zf.shape[0]
        if progress is not None:
            progress(f"epoch {epoch + 1}/{settings.epochs}: {n:,} rows, distillation loss {total / max(n, 1):.5f} "
                     f"({time.perf_counter() - t0:.1f} s)")
    head.eval()
    head.meta = {"checkpoint": str(lm.path), "step": lm.step, "kind": lm.kind, "schema": lm.schema.to_json(),
                 "hidden": settings.hidden, "epochs": settings.epochs, "rows_per_epoch": settings.max_rows}
    return head


@torch.no_grad()
def split_scores(lm: LoadedModel, head: ExitHead, ds, batch_size: int = 4096, max_rows: int | None = None
                ) -> dict[str, np.ndarray]:
    """The test split's labels, the ranker's logits and the head's logits (float64 arrays)."""
    ys, full, cheap = [], [], []
    for _x, z, logits, y in _batches(lm, ds, "test", batch_size, max_rows):
        ys.append(y.numpy())
        full.append(logits.numpy())
        cheap.append(head(z.flatten(1)).numpy())
    if not ys:
        raise ConfigError(f"{ds.root}: the test split has no rows")
    return {"labels": np.concatenate(ys).astype(np.float64), "full": np.concatenate(full).astype(np.float64),
            "head": np.concatenate(cheap).astype(np.float64)}


def operating_points(scores: dict[str, np.ndarray], flops: tuple[int, int],
                     thresholds=DEFAULT_THRESHOLDS) -> list[dict]:
    """Per threshold (plus "never": no exit): share of samples that exit, dense FLOPs per sample, and the
    cascade's AUC / log-loss on the test split next to the full ranker's (`scores` from `split_scores`)."""
    from tierec.train.metrics import log_loss, roc_auc

    y, full, cheap = scores["labels"], scores["full"], scores["head"]
    p_full, p_head = 1 / (1 + np.exp(-full)), 1 / (1 + np.exp(-cheap))
    conf = np.abs(p_head.astype(np.float32) - np.float32(0.5))
    auc0, ll0 = roc_auc(y, p_full), log_loss(y, p_full)
    f_full, f_exit = flops
    out = []
    for t in [None, *thresholds]:
        ex = conf >= t if t is not None else np.zeros(y.size, bool)
        p = np.where(ex, p_head, p_full)
        share = float(ex.mean())
        fl = share * f_exit + (1 - share) * f_full
        auc, ll = roc_auc(y, p), log_loss(y, p)
        out.append({"threshold": t, "exit_share": share, "flops_per_sample": fl, "flops_saved": 1 - fl / f_full,
                    "auc": auc, "auc_change": auc - auc0, "logloss": ll, "logloss_change": ll - ll0,
                    "agree": float(np.mean((p_head > 0.5)[ex] == (p_full > 0.5)[ex])) if ex.any() else None})
    return out


def format_points(points: list[dict]) -> str:
    lines = [f"{'threshold':>10} {'exit %':>8} {'FLOPs/sample':>13} {'saved %':>8} {'AUC':>8} {'dAUC':>9} "
             f"{'logloss':>9} {'dlogloss':>9}"]
    for p in points:
        t = "never" if p["threshold"] is None else f"{p['threshold']:g}"
        lines.append(f"{t:>10} {100 * p['exit_share']:>8.1f} {p['flops_per_sample']:>13,.0f} "
                     f"{100 * p['flops_saved']:>8.1f} {p['auc']:>8.4f} {p['auc_change']:>+9.4f} {p['logloss']:>9.4f} "
                     f"{p['logloss_change']:>+9.4f}")
    return "\n".join(lines)
