"""A run (one fit, validation, prediction or LR search) as an object: everything that belongs to it, gone when it ends."""

from __future__ import annotations

__all__ = ['Position', 'DeferredInterrupt', 'WeightedMean', 'Run']

import signal
import sys
import threading
import time
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch

from .batch import LABEL_NAMES, join_batch, split_batch
from .core import RUNS, comm_device

# %% position
class Position(NamedTuple):
    "Where a fit stands, as a resume would restart it: the epoch, which phase, and how many of its batches are done."
    epoch: int = 0
    training: bool = True
    done: int = 0

# %% interrupt
class DeferredInterrupt:
    "A first Ctrl-C inside sets `requested` (the loop stops between batches, consistent); a second stops at once."
    def __init__(self): self.requested, self._previous, self._handler = False, None, None

    def __enter__(self) -> DeferredInterrupt:
        self.requested, previous = False, signal.getsignal(signal.SIGINT)
        # Signals are handled on the main thread only; a foreign (non-callable) handler is left alone.
        if threading.current_thread() is threading.main_thread() and callable(previous):
            self._previous, self._handler = previous, self._request
            signal.signal(signal.SIGINT, self._handler)
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        print('nntrain: Ctrl-C: stopping after this batch; press it again to stop now', file=sys.stderr)

    def __exit__(self, *exc) -> None:
        self.requested = False
        if self._handler is not None and signal.getsignal(signal.SIGINT) is self._handler:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = self._handler = None

# %% weighted mean
class WeightedMean:
    "The mean of per-batch values weighted by batch size, accumulated on the device: no host sync until read."
    def __init__(self): self.values, self.sizes = [], []
    def add(self, value: torch.Tensor, n: int) -> None: self.values.append(value.detach()); self.sizes.append(n)
    def __len__(self) -> int: return len(self.values)

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        "(weighted sum, count) as float tensors on the values' device (what a distributed sum adds up)."
        if not self.values: return torch.zeros(()), torch.zeros(())
        v = torch.stack(self.values).float()
        n = torch.tensor(self.sizes, dtype=v.dtype, device=v.device)
        return (v * n).sum(), n.sum()

    def value(self) -> torch.Tensor:
        "The weighted mean, as a tensor (NaN when nothing was added)."
        total, count = self.totals()
        return total / count

    def synced(self) -> torch.Tensor:
        "The weighted mean over every process of the group: one all-reduce of (sum, count) (a collective)."
        totals = torch.stack(self.totals()).to(comm_device())
        torch.distributed.all_reduce(totals)
        return totals[0] / totals[1]

    def state_dict(self) -> dict:
        "The (weighted sum, count) so far, on the CPU: a resumed phase goes on from them."
        total, count = self.totals()
        return {'total': total.cpu(), 'count': count.cpu()}

    def load_state_dict(self, state: dict) -> None:
        "Go on from a saved (weighted sum, count)."
        self.values, self.sizes = [], []
        if state['count'] > 0: self.add(state['total'] / state['count'], int(state['count']))

# %% run
class Run:
    "One fit, validation, prediction or LR search: its kind, loaders, counters, batch, outputs, rows, stop requests."
    def __init__(self, kind: str, phases: list, n_epochs: int = 1, n_batches: int | None = None,
                 start: Position = Position(), n_inp: int | None = None, label_names: tuple = LABEL_NAMES):
        if kind not in RUNS: raise ValueError(f'unknown kind of run {kind!r}; kinds: {RUNS}')
        self.kind, self.phases, self.n_epochs, self.n_batches = kind, phases, n_epochs, n_batches
        self.n_inp, self.label_names = n_inp, label_names
        self.start = self.pos = start   # where it starts, and where a checkpoint taken now would restart
        self.resume_rng = None          # the random state to restore before the first batch of a resumed fit
        self.epoch, self.training, self.dl, self.iter, self.n_iter, self.pct_train = start.epoch, False, None, 0, 0, 0.
        self._batch, self._xb, self._yb = None, (), ()
        self.out = self.preds = self.loss = self.scaler = None
        self.rows: list[dict] = []      # the history rows this run made (a fit also adds them to `learn.history`)
        self.losses = WeightedMean()    # this phase's losses, weighted by batch size
        self.elapsed = 0.               # seconds this phase ran before a resume
        self.phase_start = 0.           # when this phase's batches started (time.perf_counter)
        self.unchecked: set = set()     # phases whose first batch has not run its checks yet
        self.resuming = False           # is this phase the one a resumed fit continues mid-way?
        self.gather: Callable | None = None   # set when each rank sees a shard: one rank's per-item tensor -> all
        self.interrupt = DeferredInterrupt()
        self.table = self.steps = self.providers = None   # the dispatch of this kind of run
        self._of: dict = {}

    # the batch, its inputs and its targets always agree: set one, the others follow
    @property
    def batch(self): return self._batch

    @batch.setter
    def batch(self, batch):
        self._batch = batch
        self._xb, self._yb = ((), ()) if batch is None else split_batch(batch, self.n_inp, self.label_names)

    @property
    def xb(self) -> tuple: return self._xb

    @xb.setter
    def xb(self, xb) -> None:
        self._xb = tuple(xb)
        if self._batch is not None: self._batch = join_batch(self._batch, self._xb, self._yb, self.label_names)

    @property
    def yb(self) -> tuple: return self._yb

    @yb.setter
    def yb(self, yb) -> None:
        self._yb = tuple(yb)
        if self._batch is not None: self._batch = join_batch(self._batch, self._xb, self._yb, self.label_names)

    @property
    def sharded(self) -> bool:
        "Does each process see only its shard of the data (so results are combined over processes)?"
        return self.gather is not None

    def start_phase(self) -> None:
        "Start the clock of a phase (its batches)."
        self.phase_start = time.perf_counter()

    def phase_seconds(self) -> float:
        "Seconds this phase has run so far (with the part before a resume)."
        return self.elapsed + time.perf_counter() - self.phase_start

    def of(self, sub) -> SimpleNamespace:
        "This run's record for subscriber `sub`: an empty namespace at first use, gone with the run."
        return self._of.setdefault(id(sub), SimpleNamespace())

    def __repr__(self):
        phase = 'train' if self.training else 'valid'
        return f'Run({self.kind!r}, epoch {self.epoch} of {self.n_epochs}, {phase} batch {self.iter} of {self.n_iter})'
