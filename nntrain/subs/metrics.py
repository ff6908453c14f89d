"""`MetricsS`: any metrics per phase and epoch, beside the learner's loss, with no host sync per batch."""

from __future__ import annotations

__all__ = ['on_preds', 'flat_tokens', 'MetricsS']

import copy
import re
import warnings
from typing import Callable

import torch

from ..batch import describe
from ..core import Order, Subscriber, check_int

def _snake(name: str) -> str:
    return re.sub(r'(?<!^)(?=[A-Z])', '_', name).lower()

def _value(t):
    "A metric result as a Python number (or list, for per-class results)."
    if not isinstance(t, torch.Tensor): return t
    t = t.detach()
    return t.item() if t.numel() == 1 else t.cpu().tolist()

def on_preds(f: Callable) -> Callable:
    "A metric transform applying `f` to the predictions only, e.g. `on_preds(torch.sigmoid)` for multi-label logits."
    def transform(preds, *targets): return f(preds), targets
    transform.__qualname__ = f'on_preds({getattr(f, "__name__", f)})'
    return transform

def flat_tokens(ignore_index: int | None = -100) -> Callable:
    "A metric transform for sequences: scores `(B, T, V)` and labels `(B, T)` become `(B*T, V)` and `(B*T,)`."
    def transform(preds, y):
        preds, y = preds.reshape(-1, preds.shape[-1]), y.reshape(-1)
        if ignore_index is None: return preds, (y,)
        keep = y != ignore_index   # boolean indexing reads the mask's count: one host sync per batch on a GPU
        return preds[keep], (y[keep],)
    transform.__qualname__ = f'flat_tokens(ignore_index={ignore_index})'
    return transform

class _Buffer:
    "Predictions and targets of batches for some metrics, concatenated and given to them at once (fewer updates)."
    def __init__(self, metrics: list, limit: int): self.metrics, self.limit, self.preds, self.targets, self.n = metrics, limit, [], [], 0

    def add(self, preds: torch.Tensor, targets: tuple) -> None:
        if self.preds and (preds.shape[1:] != self.preds[0].shape[1:] or
                           [t.shape[1:] for t in targets] != [t.shape[1:] for t in self.targets[0]]):
            self.flush()   # batches of another shape (variable lengths) cannot be concatenated with these
        self.preds.append(preds); self.targets.append(targets)
        self.n += preds.numel()
        if self.n >= self.limit: self.flush()

    def flush(self) -> None:
        if not self.preds: return
        preds = torch.cat(self.preds)
        targets = tuple(torch.cat(ts) for ts in zip(*self.targets))
        self.preds, self.targets, self.n = [], [], 0
        for m in self.metrics:
            if getattr(m, 'device', preds.device) != preds.device and callable(getattr(m, 'to', None)): m.to(preds.device)
            m.update(preds, *targets)

def _pair(out) -> tuple[torch.Tensor, tuple]:
    "A transform's `(preds, targets)` with the targets as a tuple."
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f'a metric transform must return (preds, targets), got {describe(out)}')
    preds, targets = out
    return preds, (targets,) if isinstance(targets, torch.Tensor) else tuple(targets)

def _name_of(spec) -> str:
    "A metric's column name from its class (a class passed by mistake is named after itself, for the error)."
    m = spec[0] if isinstance(spec, tuple) else spec
    return _snake((m if isinstance(m, type) else type(m)).__name__)

class MetricsS(Subscriber):
    "Metrics per phase (torcheval's or any object with update/compute/reset) added to the learner's history rows."
    order = Order.METRICS
    runs = ('fit', 'validate')

    def __init__(self, *metrics,                  # metrics named after their class (MulticlassAccuracy -> multiclass_accuracy)
                 flush_every: int = 2**24,        # buffered prediction elements before the metrics are updated
                 **named_metrics):                # name=metric, or name=(metric, transform(preds, *targets) -> (preds, targets))
        specs = {**{_name_of(m): m for m in metrics}, **named_metrics}
        self.metrics, self.transforms = {}, {}
        for name, spec in specs.items():
            m, tfm = spec if isinstance(spec, tuple) and len(spec) == 2 else (spec, None)
            if isinstance(m, type) or not all(callable(getattr(m, f, None)) for f in ('update', 'compute', 'reset')):
                raise TypeError(f'metric {name!r} must be an object with update/compute/reset (e.g. a torcheval metric '
                                f'instance), or a (metric, transform) pair; got {spec!r}'
                                + (f': pass {m.__name__}()' if isinstance(m, type) else ''))
            if tfm is not None and not callable(tfm):
                raise TypeError(f'the transform of metric {name!r} must be callable (preds, *targets) -> (preds, '
                                f'targets), got {tfm!r}')
            self.metrics[name], self.transforms[name] = m, tfm
        clash = sorted(set(self.metrics) & {'epoch', 'phase', 'loss', 'time'})
        if clash:
            raise ValueError(f'metric names {clash} would overwrite the columns every row has (epoch, phase, loss, '
                             'time): pass them under other names, e.g. MetricsS(train_loss=...)')
        check_int('flush_every', flush_every)
        self.flush_every = flush_every
        self._buffers, self._pending, self._probing = {}, None, False

    def _groups(self) -> dict:
        "The metrics by transform: one buffer per distinct transform."
        groups = {}
        for name, m in self.metrics.items(): groups.setdefault(self.transforms[name], []).append(m)
        return groups

    def before_epoch(self, learn):
        pending, self._pending = self._pending, None
        for name, m in self.metrics.items():
            m.reset()
            if learn.run.resuming and pending is not None and name in pending: m.load_state_dict(pending[name])
        self._buffers = {tfm: _Buffer(ms, self.flush_every) for tfm, ms in self._groups().items()}
        self._probing = True

    def after_loss(self, learn):
        # The phase's first batch (before any optimizer step): each metric, on a copy, must take these predictions.
        if not self._probing: return
        self._probing = False
        for name, m in self.metrics.items(): self._probe(name, m, learn)

    def _probe(self, name: str, m, learn) -> None:
        tfm, preds, yb = self.transforms[name], learn.preds, learn.yb
        try:
            with torch.no_grad():
                p, t = (preds.detach(), tuple(y.detach() for y in yb)) if tfm is None else _pair(tfm(preds.detach(), *yb))
                probe = copy.deepcopy(m)
                probe.reset()
                probe.update(p, *t)
                probe.compute()
        except Exception as e:
            raise ValueError(f'metric {name!r} ({type(m).__name__}) cannot take this phase\'s predictions '
                             f'({describe(preds)}) and targets ({describe(yb)}): {type(e).__name__}: {e}. Give it a '
                             f'transform: MetricsS({name}=(metric, transform)), e.g. on_preds(torch.sigmoid) or '
                             'flat_tokens()') from e

    def after_batch(self, learn):
        if not self.metrics: return
        preds, yb = learn.preds.detach(), tuple(y.detach() for y in learn.yb)
        for tfm, buf in self._buffers.items(): buf.add(*((preds, yb) if tfm is None else _pair(tfm(preds, *yb))))

    def after_epoch(self, learn):
        rows = learn.run.rows
        if not rows: return
        for buf in self._buffers.values(): buf.flush()
        if learn.run.sharded and self.metrics:   # every rank's shard, in one transfer: every rank adds the same row
            from torcheval.metrics.toolkit import sync_and_compute_collection
            results = sync_and_compute_collection(self.metrics)
        else: results = {name: m.compute() for name, m in self.metrics.items()}
        row = rows[-1]
        seconds = row.pop('time', None)   # metrics go before the time column, as the tables show them
        row.update({name: _value(results[name]) for name in self.metrics})
        if seconds is not None: row['time'] = seconds

    def cleanup_epoch(self, learn):
        self._buffers = {}   # release device memory, even after an error

    def state_dict(self) -> dict:
        "Mid-phase: each metric's state so far, so a resumed phase's row covers the whole phase."
        for buf in self._buffers.values(): buf.flush()
        states = {}
        for name, m in self.metrics.items():
            if not callable(getattr(m, 'state_dict', None)): return {'metrics': None}
            states[name] = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                            for k, v in m.state_dict().items()}   # plain tensors: checkpoints load weights_only
        return {'metrics': states}

    def load_state_dict(self, state: dict) -> None:
        "Keep the metric states for the phase a resumed fit continues."
        self._pending = state.get('metrics')
        if self._pending is None and self.metrics:
            warnings.warn('MetricsS: the checkpoint holds no metric states (a metric without state_dict): a phase '
                          'resumed mid-way reports metrics over its remaining batches only', RuntimeWarning)
