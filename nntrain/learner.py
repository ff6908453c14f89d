"""The training loop: fit → epoch (train, then valid) → batch, with subscribers called at named events."""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .batch import (LABEL_NAMES, batch_size, call_model, check_inputs, check_loss, check_targets, class_dim, describe,
                    is_index, output_loss, output_preds)
from .core import (CANCELS, EVENTS, RUNS, STEPS, CancelBatchException, CancelEpochException, CancelFitException,
                   CancelStepException, add_note, build_table, check_bool, check_int, check_number, check_subs,
                   get_rank, get_world_size, note_origin, preserve_modes, set_rng_state)
from . import inference, state
from .data import DataLoaders, undisturbed
from .run import Position, Run, WeightedMean

# %% learning rates
def lr_for_groups(lr: float | slice | list, n_groups: int) -> list[float]:
    "A learning rate per param group: a number for all; `slice(hi)`: `hi/10` but the last; `slice(lo, hi)`: geometric."
    if isinstance(lr, (list, tuple)):
        if len(lr) != n_groups: raise ValueError(f'{len(lr)} learning rates for {n_groups} param groups')
        return [float(v) for v in lr]
    if not isinstance(lr, slice): return [lr] * n_groups
    lo, hi = lr.start, lr.stop
    if lo is None: return [hi / 10] * (n_groups - 1) + [hi]
    if n_groups == 1:
        raise ValueError(f'lr={lr!r} spreads rates over parameter groups, but the optimizer has one: give a number, '
                         'or a splitter (e.g. learn.freeze() or Learner(..., splitter=default_splitter))')
    return [lo * (hi / lo) ** (i / (n_groups - 1)) for i in range(n_groups)]

def check_lr(name: str, lr, allow_none: bool = False) -> None:
    "Raise unless `lr` is a positive finite number, a `slice` of them, or a list of them (or None when allowed)."
    if lr is None and allow_none: return
    if hasattr(lr, 'valley') and hasattr(lr, 'suggestions'):
        raise TypeError(f'{name} must be a number; got the LR finder\'s result {lr!r}: pass one of its suggestions, '
                        f'e.g. {name}=result.valley')
    if isinstance(lr, slice):
        if lr.step is not None: raise ValueError(f'{name}: a slice of learning rates takes no step, got {lr!r}')
        for v in (lr.start, lr.stop):
            if v is not None: check_number(f'{name} (in {lr!r})', v, 0, low_open=True)
        if lr.stop is None: raise ValueError(f'{name}: a slice of learning rates needs its upper end, got {lr!r}')
        return
    for v in (lr if isinstance(lr, (list, tuple)) else [lr]): check_number(name, v, 0, low_open=True)

# %% first-batch checks
def loader_targets(dl, n_inp: int | None = None) -> torch.Tensor | None:
    "Every target of an in-memory loader when it has exactly one target tensor (a `TensorLoader`), else None."
    tensors = getattr(dl, 'tensors', None)
    if not isinstance(tensors, tuple) or getattr(dl, 'names', None) is not None: return None
    n = max(len(tensors) - 1, 1) if n_inp is None else n_inp
    return tensors[n] if len(tensors) - n == 1 else None

@contextmanager
def buffers_kept_on_error(model: nn.Module):
    "Inside: if an error (not a cancel) escapes, put back the model's buffers (batch-norm statistics) as they were."
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try: yield
    except CANCELS: raise
    except BaseException:
        with torch.no_grad():
            for b, v in saved: b.copy_(v)
        raise

def _failed(learn, e: Exception, what: str, given: str) -> None:
    param = next(learn.model.parameters(), None)
    model = f'; model parameters: {param.dtype} on {param.device}' if param is not None else ''
    add_note(e, f'nntrain: {what} failed on the first {"training" if learn.training else "validation"} batch; '
                f'{given}{model}')

def _standard_loss(learn) -> bool:
    "Is the loss the learner's own `loss_func(preds, *targets)` (so the checks know what it compares)?"
    return learn.loss_func is not None and not learn.provides('get_loss')

def checked_step(learn, name: str, step: Callable) -> None:
    "Run step `name` of a phase's first batch with the checks around it; a failing model or loss says what it got."
    run = learn.run
    if name == 'predict':
        if not learn.provides('predict'): check_inputs(run.xb, run.yb, learn.model)
        try: step()
        except Exception as e:
            _failed(learn, e, 'the model', f'inputs: {describe(run.xb)}')
            raise
    elif name == 'get_loss':   # after `after_predict`: the predictions the loss will see
        if _standard_loss(learn) and len(run.yb) == 1:
            dim = check_targets(learn.preds, run.yb[0], all_targets=loader_targets(run.dl, run.n_inp))
            if dim is not None: learn.class_dim = dim
            if learn.training: _check_valid_labels(learn, run.yb[0])
        try: step()
        except Exception as e:
            _failed(learn, e, 'the loss', f'predictions: {describe(learn.preds)}, targets: {describe(run.yb)}')
            if not run.yb and learn.loss_func is not None:
                add_note(e, 'nntrain: this batch has no targets: a batch of one item, e.g. (x,), is inputs only; '
                            'yield (x, y) for a target, or set n_inp (on the Learner or the DataLoaders)')
            raise
        check_loss(learn.loss)
    else: step()

def _check_valid_labels(learn, y) -> None:
    "Before the first step: the validation labels must fit the model too (in-memory: all of them; else a first batch)."
    run, dl = learn.run, learn.dls.valid
    if dl is None or dl is run.dl or not is_index(y) or class_dim(learn.preds, y) is None: return
    targets = loader_targets(dl, run.n_inp)
    if targets is None:
        with undisturbed(dl): first = next(iter(dl), None)
        if first is None: return
        probe = Run('predict', [], n_inp=run.n_inp, label_names=run.label_names)
        probe.batch = first
        targets = probe.yb[0] if len(probe.yb) == 1 else None
    if isinstance(targets, torch.Tensor) and targets.dtype == y.dtype and targets.ndim == y.ndim:
        dim = class_dim(learn.preds, y)
        n = learn.preds.shape[dim]
        # scores shaped for every validation label: (N, C) or (N, ..., C), as the training batch's layout
        shape = (len(targets), n, *targets.shape[1:]) if dim == 1 else (*targets.shape, n)
        check_targets(learn.preds.new_zeros(()).expand(shape), targets.to(y.device), where='the validation set has')

# %% arguments
def _check_learner_args(model, dls, loss_func, opt_func, lr, subs, splitter, n_inp, label_names) -> None:
    "Refuse a learner that cannot train, naming the argument, before anything is built."
    if not isinstance(model, nn.Module): raise TypeError(f'model must be a torch.nn.Module, got {describe(model)}')
    if not isinstance(dls, DataLoaders) and not (isinstance(dls, (tuple, list)) and len(dls) == 2):
        raise TypeError(f'dls must be DataLoaders or a (train, valid) pair of loaders, got {describe(dls)}')
    if isinstance(opt_func, torch.optim.Optimizer):
        raise TypeError('opt_func must make an optimizer from (params, lr), e.g. torch.optim.AdamW; got an optimizer '
                        f'already built ({type(opt_func).__name__}): pass its class instead')
    for name, f in (('loss_func', loss_func), ('opt_func', opt_func), ('splitter', splitter)):
        if f is None and name != 'opt_func': continue   # no loss_func: the model computes its own loss
        if isinstance(f, type) and issubclass(f, nn.Module):
            raise TypeError(f'{name} is the class {f.__name__}: pass an instance, {f.__name__}()')
        if not callable(f): raise TypeError(f'{name} must be callable, got {f!r}')
    check_lr('lr', lr)
    check_subs(subs)
    check_int('n_inp', n_inp, allow_none=True)
    if label_names is not None and (isinstance(label_names, str) or not all(isinstance(k, str) for k in label_names)):
        raise TypeError(f"label_names must be a tuple of key names, e.g. ('labels',), got {label_names!r}")

def _check_loaders(phases: list) -> None:
    "Refuse a missing, unsized or empty loader before the run starts."
    for dl, training in phases:
        what = 'training' if training else 'validation'
        if dl is None: raise ValueError(f'there is no {what} loader (it is None)')
        if not hasattr(dl, '__len__'): raise TypeError(f'the {what} loader has no len(); wrap it or give it one')
        if len(dl) == 0: raise ValueError(f'the {what} loader is empty (len 0): nothing to iterate')

# %% the learner
_WHAT = {'fit': 'a fit', 'validate': 'a validation', 'predict': 'a prediction', 'lr_find': 'a learning-rate search'}
_STAGE_CANCEL = {'fit': CancelFitException, 'epoch': CancelEpochException, 'batch': CancelBatchException}

RUN_STATE = ('n_epochs', 'epoch', 'training', 'dl', 'n_iter', 'iter', 'pct_train', 'batch', 'xb', 'yb', 'out',
             'preds', 'loss', 'scaler')
"What `learn.<name>` reads from (and writes to) the run in progress; each is None between runs."

def _run_attr(name: str) -> property:
    def get(self): return None if self.run is None else getattr(self.run, name)
    def set(self, value):
        if self.run is None: raise AttributeError(f'learn.{name} belongs to a run, and no run is in progress')
        setattr(self.run, name, value)
    return property(get, set, doc=f"The run's `{name}` (None between runs).")

class Learner:
    "Train `model` on `dls` with `loss_func` and an optimizer from `opt_func`; `subs` act at named events."
    def __init__(self, model: nn.Module,                      # the model to train
                 dls,                                          # `DataLoaders`, or a (train, valid) pair of loaders
                 loss_func: Callable | None = F.cross_entropy, # `loss_func(preds, *targets)`; None: the model's own loss
                 opt_func: Callable = torch.optim.SGD,         # makes the optimizer: `opt_func(param_groups, lr)`
                 lr: float | slice = 1e-2,                     # the learning rate (a `slice` spreads it over groups)
                 subs=(),                                      # subscribers, acting at the loop's events
                 splitter: Callable | None = None,             # model -> list of parameter groups (freezing, slices)
                 n_inp: int | None = None,                     # leading batch items that are inputs (default: dls')
                 label_names: tuple | None = None):            # target keys of mapping batches (default: dls')
        _check_learner_args(model, dls, loss_func, opt_func, lr, subs, splitter, n_inp, label_names)
        self.model, self.loss_func, self.opt_func, self.lr, self.splitter = model, loss_func, opt_func, lr, splitter
        self.dls = dls if isinstance(dls, DataLoaders) else DataLoaders(*dls)
        self.n_inp = n_inp if n_inp is not None else getattr(self.dls, 'n_inp', None)
        self.label_names = tuple(label_names or getattr(self.dls, 'label_names', None) or LABEL_NAMES)
        self.opt, self.global_step, self.history, self.subs, self.run = None, 0, [], [], None
        self.class_dim: int | None = None   # where predictions hold class scores, as the first batch's check found
        self._fit_end = (0, Position())     # (n_epochs, position) of the last fit: what `state_dict` saves between fits
        self._resume: dict | None = None    # a loaded checkpoint's position and state, until fit(resume=True)
        self.add_subs(*subs)

    def __repr__(self):
        return (f'Learner({type(self.model).__name__}, loss_func={getattr(self.loss_func, "__name__", self.loss_func)}, '
                f'opt_func={getattr(self.opt_func, "__name__", self.opt_func)}, lr={self.lr}, '
                f'subs=[{", ".join(type(s).__name__ for s in self.subs)}])')

    @property
    def run_kind(self) -> str | None:
        "The kind of run in progress ('fit', 'validate', 'predict', 'lr_find'), None between runs."
        return None if self.run is None else self.run.kind

    # -- subscribers -------------------------------------------------------------------------------------------
    def add_subs(self, *subs) -> Learner:
        "Add subscribers; the dispatch tables are checked and rebuilt once."
        check_subs(subs)
        for s in subs:
            if any(s is t for t in self.subs): raise ValueError(f'{s!r} is already subscribed to this learner')
        self._set_subs(self.subs + list(subs))
        return self

    def remove_subs(self, *subs) -> Learner:
        "Remove subscribers (by identity) and rebuild the dispatch tables."
        self._set_subs([t for t in self.subs if not any(t is s for s in subs)])
        return self

    def _set_subs(self, subs: list) -> None:
        tables = {kind: build_table(subs, kind) for kind in RUNS}   # raises before anything changes
        self.subs = sorted(subs, key=lambda s: getattr(s, 'order', 0))
        wrappers = [s.instrument for s in self.subs if callable(getattr(s, 'instrument', None))]
        self._tables = {kind: self._dispatch(*table, wrappers) for kind, table in tables.items()}
        if self.run is not None: self._use(self.run)

    def _dispatch(self, table: dict, providers: dict, arounds: dict, wrappers: list) -> tuple[dict, dict, dict]:
        "(event → handlers, step → callable, step → provider): a provider's step (else the learner's), in its wrappers."
        steps = {n: partial(getattr(providers[n], n), self) if n in providers else getattr(self, n) for n in STEPS}
        for n in STEPS:   # `around_<step>` subscribers wrap whichever step runs, the lowest order outermost
            for s in reversed(arounds[n]): steps[n] = partial(getattr(s, f'around_{n}'), self, steps[n])
        for wrap in wrappers:   # instruments (tracing, sync audits) see every handler and step; none: no cost
            table = {e: tuple(wrap(f, e, f.__self__) for f in fs) for e, fs in table.items()}
            # a step is named after its outermost wrapper when it has one (e.g. MixedPrecisionS around the step)
            steps = {n: wrap(f, n, (arounds[n] or [providers.get(n, self)])[0]) for n, f in steps.items()}
        return table, steps, providers

    def _use(self, run: Run) -> None:
        run.table, run.steps, run.providers = self._tables[run.kind]

    def provides(self, step: str) -> bool:
        "Does a subscriber provide `step` in the current kind of run (instead of the learner's own method)?"
        return step in self._tables[self.run_kind or 'fit'][2]

    def publish(self, event: str) -> None:
        "Call every subscriber listening to `event` in this kind of run, in order."
        try: fns = (self.run.table if self.run is not None else self._tables['fit'][0])[event]
        except KeyError: raise ValueError(f'unknown event {event!r}; events are: {", ".join(EVENTS)}') from None
        for f in fns:
            try: f(self)
            except CANCELS: raise
            except BaseException as e:
                note_origin(e, f, event)
                raise

    def _cleanup(self, event: str, exc: BaseException | None = None) -> None:
        "Run `event` for every subscriber, each isolated: one failing cleanup never stops the others."
        errors = []
        for f in self.run.table[event]:
            try: f(self)
            except BaseException as e:
                note_origin(e, f, event)
                errors.append(e)
        if not errors: return
        if exc is None: raise errors[0]
        for e in errors: add_note(exc, f'nntrain: while cleaning up, {e._nntrain_origin} also raised {e!r}')

    # -- the replaceable steps ---------------------------------------------------------------------------------
    def run_step(self, name: str) -> None:
        "Run the batch step `name` as the loop does: the subscriber that provides it (else the learner's), wrapped."
        if name not in STEPS: raise ValueError(f'unknown step {name!r}; steps are: {", ".join(STEPS)}')
        self.run.steps[name]()

    def predict(self) -> None:
        "Run the model on the batch's inputs (and its targets, when the model computes its loss): sets `out`, `preds`."
        run = self.run
        if self.loss_func is not None or not run.yb: inputs = run.xb
        else: inputs = (run.batch,) if isinstance(run.batch, Mapping) else run.xb + run.yb
        run.out = call_model(self.model, inputs)
        run.preds = output_preds(run.out)

    def get_loss(self) -> None:
        "The loss: `loss_func(preds, *targets)`, or the model's own (`out.loss`) when `loss_func` is None: sets `loss`."
        run = self.run
        run.loss = output_loss(run.out) if self.loss_func is None else self.loss_func(run.preds, *run.yb)

    def backward(self) -> None:
        "Backpropagate `loss`."
        self.run.loss.backward()

    def step(self) -> None:
        "Take one optimizer step."
        self.opt.step()

    def zero_grad(self) -> None:
        "Reset the gradients after a step."
        self.opt.zero_grad()


    # -- the loop ----------------------------------------------------------------------------------------------
    def fit(self, n_epochs: int = 1,              # epochs: each a training pass, then a validation pass
            lr: float | slice | None = None,      # a new learning rate (kept: it becomes `learn.lr`)
            subs=(),                              # subscribers for this fit only
            train: bool = True,                   # run the training passes
            valid: bool = True,                   # run the validation passes
            reset_opt: bool = False,              # start from a fresh optimizer
            resume: bool = False,                 # continue the fit a loaded checkpoint was taken in
            n_batches: int | None = None) -> None:  # at most this many batches per pass (a quick check)
        "Train for `n_epochs` (each a train pass, then a valid pass); `subs` are added for this fit only."
        self._refuse_nested(_WHAT['fit'])
        check_int('n_epochs', n_epochs)
        check_lr('lr', lr, allow_none=True)
        for name, v in (('train', train), ('valid', valid), ('reset_opt', reset_opt), ('resume', resume)):
            check_bool(name, v)
        if not (train or valid): raise ValueError('fit(train=False, valid=False) has nothing to do')
        check_int('n_batches', n_batches, allow_none=True)
        check_subs(subs)
        phases = [(dl, t) for dl, t, on in ((self.dls.train, True, train), (self.dls.valid, False, valid)) if on]
        resumed = state.take_resume(self, n_epochs, lr, reset_opt) if resume else None
        run = Run('fit', phases, n_epochs, n_batches, resumed['start'] if resumed else Position(), self.n_inp,
                  self.label_names)
        before, step = self._opt_state(), self.global_step
        try:
            if train: self._make_opt(lr, reset_opt, fresh=resumed is None)
            if resumed is not None: state.resume_run(run, resumed)
            self.execute(run, subs)
        except BaseException:
            if self.global_step == step:   # refused before its first step: as it was, the loaded resume too
                self._opt_state(before)
                if resumed is not None: self._resume = resumed
                raise
            self._fit_end = (n_epochs, run.pos)
            raise
        self._fit_end = (n_epochs, run.pos)

    def _refuse_nested(self, what: str) -> None:
        "Refuse to start a run while one is in progress."

        if self.run is not None:   # subscribers keep per-run state (set up in before_fit): runs do not nest
            raise RuntimeError(f'cannot start {what} during a {self.run.kind} (from a subscriber?): runs do not '
                               'nest. Read the valid pass\'s row in after_epoch (learn.history[-1]), or start it after.')

    def execute(self, run: Run, subs=()) -> None:
        "Carry out `run` (every fit, validation, prediction and LR search goes through here) with extra `subs`."
        self._refuse_nested(_WHAT[run.kind])
        _check_loaders(run.phases)
        subs = list(subs)
        self.add_subs(*subs)
        self.run, grad = run, torch.is_grad_enabled()
        try:
            self._use(run)
            run.unchecked = {t for _, t in run.phases}
            with preserve_modes(self.model), run.interrupt:
                if self._stage('fit', self._epochs, run) and self.opt is not None: self.opt.zero_grad()
        except BaseException as e:
            self._after_error(run, e)
            raise
        finally:
            torch.set_grad_enabled(grad)
            self.run = None
            self.remove_subs(*subs)

    def _stage(self, name: str, body: Callable, *args) -> bool:
        "Run `body` between `before_{name}` and `after_{name}`; always `cleanup_{name}`. True if it was cancelled."
        cancelled = False
        try:
            self.publish(f'before_{name}')
            body(*args)
            self.publish(f'after_{name}')
        except _STAGE_CANCEL[name]: cancelled = True
        except BaseException as e:
            self._cleanup(f'cleanup_{name}', e)
            raise
        self._cleanup(f'cleanup_{name}')
        return cancelled

    def _epochs(self, run: Run) -> None:
        start = run.start
        for run.epoch in range(start.epoch, run.n_epochs):
            for dl, training in run.phases:
                resuming = run.epoch == start.epoch
                if resuming and training and not start.training: continue   # resume in the valid pass
                skip = start.done if resuming and training == start.training else 0
                self._one_epoch(run, dl, training, skip)

    def _one_epoch(self, run: Run, dl, training: bool, skip: int) -> None:
        run.dl, run.training, run.iter = dl, training, 0
        run.n_iter = len(dl) if run.n_batches is None else min(len(dl), run.n_batches)
        run.pos = Position(run.epoch, training, skip)
        if not skip: run.losses, run.elapsed = WeightedMean(), 0.
        run.resuming = skip > 0
        self.model.train(training)
        with torch.set_grad_enabled(training):
            self._stage('epoch', self._all_batches, run, skip)

    def _all_batches(self, run: Run, skip: int) -> None:
        run.start_phase()
        # A fit resumed at a phase's start has its random state back before the loader starts (a sampler may draw
        # its order from torch's generator); resumed mid-phase, once the batches done before are skipped.
        if run.resume_rng is not None and not skip: set_rng_state(run.resume_rng); run.resume_rng = None
        if skip < run.n_iter:   # resuming after the pass's last batch: starting the loader would draw an order
            batches = run.dl if run.n_batches is None else itertools.islice(run.dl, run.n_iter)
            for run.iter, run.batch in enumerate(batches):
                # A deferred Ctrl-C stops once the work done so far is complete (after an optimizer step, or a
                # validation batch) and the loader has moved on as it would have anyway: torch's samplers draw
                # again when asked past their last batch, so stopping earlier would shift the next epoch.
                if run.interrupt.requested and run.pos.done == run.iter: self._stop(run, 'before')
                if run.iter < skip: continue   # resuming: these batches were done before the checkpoint
                if run.resume_rng is not None: set_rng_state(run.resume_rng); run.resume_rng = None
                if run.training: run.pct_train = (run.epoch + run.iter / run.n_iter) / run.n_epochs
                self._stage('batch', self._one_batch, run)
            run.batch = None
        if run.training: run.pct_train = (run.epoch + 1) / run.n_epochs
        self._end_phase(run)
        if run.interrupt.requested: self._stop(run, 'after')

    def _one_batch(self, run: Run) -> None:
        first = run.training in run.unchecked   # each phase's first batch runs its steps with checks around it
        run.unchecked.discard(run.training)
        do = partial(checked_step, self) if first else lambda name, step: step()
        # a refused first training batch changes nothing, not even batch-norm statistics
        with buffers_kept_on_error(self.model) if first and run.training else nullcontext():
            do('predict', run.steps['predict']); self.publish('after_predict')
            if run.kind == 'predict': return
            do('get_loss', run.steps['get_loss']); self.publish('after_loss')
        if run.training:
            try:
                run.steps['backward'](); self.publish('after_backward')
                run.steps['step']()
                self.global_step, run.pos = self.global_step + 1, Position(run.epoch, True, run.iter + 1)
                self.publish('after_step')
                run.steps['zero_grad']()
            except CancelStepException: pass
        else: run.pos = Position(run.epoch, False, run.iter + 1)
        run.losses.add(run.loss, batch_size(run.xb, run.yb))

    def _end_phase(self, run: Run) -> None:
        "The phase is done: where a checkpoint would restart now, and (fits, validations) the phase's history row."
        i = [t for _, t in run.phases].index(run.training)
        run.pos = Position(run.epoch, False) if i + 1 < len(run.phases) else Position(run.epoch + 1)
        if run.kind not in ('fit', 'validate') or not len(run.losses): return
        loss = run.losses.synced() if run.sharded else run.losses.value()
        row = {'epoch': run.epoch, 'phase': 'train' if run.training else 'valid', 'loss': loss.item(),
               'time': run.phase_seconds()}
        run.rows.append(row)
        if run.kind == 'fit': self.history.append(row)

    def _stop(self, run: Run, when: str):
        run.batch = None   # the batch fetched after the stop was asked for never ran
        where = f'batch {run.iter} of epoch {run.epoch}' if when == 'before' else f'the last batch of epoch {run.epoch}'
        stop = KeyboardInterrupt(f'stopped by Ctrl-C {when} {where}')
        stop.nntrain_clean_stop = True   # between batches: what is saved on the way out is consistent
        raise stop

    def _after_error(self, run: Run, e: BaseException) -> None:
        "Say where `e` happened, and drop partial gradients (the run, with its batch and graph, goes with `self.run`)."
        if not isinstance(e, CANCELS):
            phase = 'train' if run.training else 'valid'
            add_note(e, f'nntrain: stopped in epoch {run.epoch} of {run.n_epochs}, {phase} batch {run.iter}'
                        f' of {run.n_iter} ({run.kind})')
        if self.opt is not None: self.opt.zero_grad()   # partial gradients must not leak into the next step

    # -- the optimizer -----------------------------------------------------------------------------------------
    def param_groups(self) -> list:
        "The model's parameters in groups: `splitter(model)` when given, else one group."
        if self.splitter is None: return [list(self.model.parameters())]
        groups = [list(g) for g in self.splitter(self.model)]
        if not groups or not all(groups): raise ValueError('the splitter returned an empty parameter group')
        return groups

    def _new_opt(self, lr) -> torch.optim.Optimizer:
        groups = self.param_groups()
        lrs = lr_for_groups(lr, len(groups))
        if len(groups) == 1: return self.opt_func(groups[0], lrs[0])   # any `(params, lr)` optimizer, torch's or not
        return self.opt_func([{'params': g, 'lr': r} for g, r in zip(groups, lrs)], lrs[-1])

    def _make_opt(self, lr, reset_opt: bool, fresh: bool) -> None:
        "The optimizer of a fit: made on the first fit (or `reset_opt`); a fit that does not resume starts at `lr`."
        if lr is not None: self.lr = lr
        if self.opt is None or reset_opt:
            self.opt = self._new_opt(self.lr)
            return
        groups = self.opt.param_groups
        if lr is None and not fresh: return
        # Each fit starts from the learner's rates (a schedule's last values are not carried into the next fit):
        # its learning rate(s), and the optimizer's own defaults for what schedules set (momentum, betas, ...).
        defaults = {k: v for k, v in getattr(self.opt, 'defaults', {}).items() if k not in ('params', 'lr')}
        for g, r in zip(groups, lr_for_groups(self.lr, len(groups))):
            g['lr'] = r
            if fresh: g.update({k: v for k, v in defaults.items() if k in g})

    def _opt_state(self, saved: tuple | None = None) -> tuple | None:
        "Read (no `saved`) or put back the optimizer, `lr` and every param group's hyper-parameters."
        if saved is None:
            groups = [] if self.opt is None else self.opt.param_groups
            return self.opt, self.lr, [{k: v for k, v in g.items() if k != 'params'} for g in groups]
        self.opt, self.lr, groups = saved
        if self.opt is not None:
            for g, values in zip(self.opt.param_groups, groups): g.update(values)

    # -- other kinds of run: a validation here; predictions (nntrain.inference) and state (nntrain.state) ---------
    def validate(self, dl=None) -> dict:   # a loader (default: the validation loader)
        "One validation pass over `dl` (default: the valid loader); returns its results and leaves `history` alone."
        run = Run('validate', [(self.dls.valid if dl is None else dl, False)], n_inp=self.n_inp,
                  label_names=self.label_names)
        self.execute(run)
        return dict(run.rows[-1]) if run.rows else {}

    get_preds, infer, tta = inference.get_preds, inference.infer, inference.tta
    state_dict, load_state_dict = state.state_dict, state.load_state_dict
    save, load, load_weights = state.save, state.load, state.load_weights

    def show_training_loop(self, kind: str = 'fit') -> TrainingLoop:   # the kind of run to show
        "For each event of a `kind` run, the subscribers that run there in order, and who provides each step (a table)."
        if kind not in RUNS: raise ValueError(f'kind must be one of {RUNS}, got {kind!r}')
        table, steps, providers = self._tables[kind]
        name = lambda f: type(getattr(f, '__self__', f)).__name__
        rows = [(e, ', '.join(name(f) for f in table[e])) for e in EVENTS if table[e]]
        arounds = {n: [type(s).__name__ for s in self.subs if kind in getattr(s, 'runs', RUNS)
                       and callable(getattr(s, f'around_{n}', None))] for n in STEPS}
        rows += [(n + '()', type(providers.get(n, self)).__name__ +
                  (f' (around it: {", ".join(arounds[n])})' if arounds[n] else '')) for n in STEPS]
        return TrainingLoop(kind, rows)

    # -- processes ---------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        "This process's rank in the torch.distributed process group (0 without one, e.g. not launched by torchrun)."
        return get_rank()

    @property
    def world_size(self) -> int:
        "The number of processes training together (1 without a process group)."
        return get_world_size()

    @property
    def is_main(self) -> bool:
        "Is this the main process (rank 0)? Only it displays progress, writes logs and checkpoints."
        return self.rank == 0

for _name in RUN_STATE: setattr(Learner, _name, _run_attr(_name))

# %% training loop table
class TrainingLoop:
    "Who runs at each event of a kind of run, and who provides each step: text, markdown and HTML tables."
    def __init__(self, kind: str, rows: list[tuple[str, str]]): self.kind, self.rows = kind, rows

    def __repr__(self) -> str: return '\n'.join(f'{what:<15} {who}' for what, who in self.rows)

    def _repr_markdown_(self) -> str:
        lines = [f'| {self.kind}: event or step | subscribers, in order |', '|---|---|']
        return '\n'.join(lines + [f'| `{what}` | {who} |' for what, who in self.rows])

    def _repr_html_(self) -> str:
        body = ''.join(f'<tr><td><code>{what}</code></td><td>{who}</td></tr>' for what, who in self.rows)
        return (f'<table><thead><tr><th>{self.kind}: event or step</th><th>subscribers, in order</th></tr></thead>'
                f'<tbody>{body}</tbody></table>')

# %% momentum learner
class MomentumLearner(Learner):
    "A `Learner` whose `zero_grad` decays the gradients by `mom` instead of zeroing them (momentum for any optimizer)."
    def __init__(self, model: nn.Module, dls, loss_func: Callable | None = F.cross_entropy,
                 opt_func: Callable = torch.optim.SGD, lr: float = 1e-2, subs=(), mom: float = 0.85, **kwargs):
        check_number('mom', mom, 0, 1, high_open=True)
        self.mom = mom
        super().__init__(model, dls, loss_func, opt_func, lr, subs, **kwargs)

    def zero_grad(self) -> None:
        "Decay the gradients by `mom`."
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None: p.grad.mul_(self.mom)
