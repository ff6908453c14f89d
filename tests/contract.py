"""The subscriber contract every shipped subscriber must pass (the registry that applies it: tests/test_contract.py).

`check_contract(factory, make_learner)` builds the subscriber with `factory()` (a zero-argument callable) and a learner
with `make_learner()`; `check_run_scopes(factory, make_learner)` checks that validate/get_preds/lr_find between two fits
leave no trace.
"""
import copy
import os
from pathlib import Path

import torch
from torch import nn

from nntrain.core import set_seed
from nntrain.learner import Learner
from nntrain import run as run_module
from nntrain.testing import failing, same_state, state_diffs, tiny_classifier

__all__ = ['n_hooks', 'snapshot', 'check_contract', 'check_run_scopes', 'files_on_disk', 'observe', 'changed']


def n_hooks(model: nn.Module) -> int:
    "Every forward/backward hook registered on any module of `model`."
    names = ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks', '_state_dict_hooks')
    return sum(len(getattr(m, a, {})) for m in model.modules() for a in names)


def snapshot(learn: Learner) -> dict:
    "What a subscriber must leave as it found it once a fit ends, however it ends."
    return dict(loss_func=learn.loss_func, opt_func=learn.opt_func, model=learn.model, dls=learn.dls,
                predict=learn.predict, step=learn.step, hooks=n_hooks(learn.model), grad=torch.is_grad_enabled(),
                subs=list(learn.subs))


def check_contract(factory, make_learner=tiny_classifier, fail_event: str = 'after_loss', fail_at: int = 1) -> None:
    "Build with defaults, survive two fits, survive an exception mid-fit, and leave no trace behind."
    sub = factory()
    learn = make_learner()
    before = snapshot(learn)
    learn.fit(1, subs=[sub])
    learn.fit(1, subs=[sub])
    assert snapshot(learn) == before, f'{type(sub).__name__} changed the learner: {_diff(before, snapshot(learn))}'
    try:
        learn.fit(1, subs=[sub, failing(fail_event, fail_at)])
        raise AssertionError('the injected failure did not propagate')
    except RuntimeError as e:
        assert str(e) == 'injected failure', f'the original exception was replaced: {e!r}'
    after = snapshot(learn)
    assert after == before, f'{type(sub).__name__} left changes after an error: {_diff(before, after)}'
    assert learn.preds is None and learn.loss is None
    learn.fit(1, subs=[sub])     # still usable


def _diff(a: dict, b: dict) -> dict:
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def files_on_disk(root) -> dict:
    "Every file under `root` (relative path -> bytes); TensorBoard event files by their events, without clock times."
    root, files, n_events = Path(root), {}, {}
    for p in sorted(root.rglob('*')):
        if not p.is_file(): continue
        if 'tfevents' not in p.name: files[str(p.relative_to(root))] = p.read_bytes(); continue
        key = str(p.parent.relative_to(root))   # names hold a time, host and pid: number them per folder instead
        n_events[key] = n_events.get(key, 0) + 1
        files[f'{key}/events#{n_events[key]}'] = _events(p)
    return files


def _events(path) -> list:
    "The events of a TensorBoard file, serialised, with their wall-clock times removed."
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    out = []
    for e in EventFileLoader(str(path)).Load():
        e.wall_time = 0
        out.append(e.SerializeToString(deterministic=True))
    return out


def observe(learn, folder, sub=None) -> dict:
    "What a user could see: history, files under `folder`, `sub`'s state, weights, optimizer state, counters, RNG."
    sub_state = sub.state_dict() if callable(getattr(sub, 'state_dict', None)) else None
    return dict(history=[dict(r) for r in learn.history], files=files_on_disk(folder), sub=sub_state,
                weights={k: v.clone() for k, v in learn.model.state_dict().items()},
                opt=None if learn.opt is None else copy.deepcopy(learn.opt.state_dict()),
                counters=learn.state_dict()['counters'], subs=list(learn.subs),
                rng=torch.get_rng_state(), loss_func=learn.loss_func, model=learn.model)


def changed(before: dict, after: dict) -> list:
    "The keys of two `observe` results that differ."
    return [k for k in before if not same_state(before[k], after[k])]


def _run(factory, make_learner, folder: Path, middle: bool, lr_find: bool = True) -> dict:
    "Seeded: build, fit, (validate, get_preds, lr_find when `middle`: they must change nothing), fit; what is seen."
    folder.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(folder)   # subscribers that write files write them here
    try:
        set_seed(0)
        sub, learn = factory(), make_learner()
        learn.run_id = 'run'   # both runs under one id: files named and tagged by it compare bit for bit
        learn.add_subs(sub)
        learn.fit(1)
        before = observe(learn, folder, sub)
        if middle:
            learn.validate()
            learn.get_preds()
            if lr_find: learn.lr_find(num_it=5, show_plot=False)
        after = observe(learn, folder, sub)
        for k in before:
            assert same_state(before[k], after[k]), f'validate/get_preds/lr_find changed {k}: ' \
                f'{state_diffs(before[k], after[k])[:3]}'
        learn.fit(1)
        return observe(learn, folder, sub)
    finally: os.chdir(cwd)


class _StillClock:
    "Stands in for the `time` module in `nntrain.run`: every row's `time` is 0, so runs compare bit for bit."
    @staticmethod
    def perf_counter() -> float: return 0.


def check_run_scopes(factory, make_learner, tmp_path: Path, lr_find: bool = True) -> None:
    "validate(), get_preds() and lr_find() between two fits leave history, files, sub state and weights bit for bit."
    clock = run_module.time
    run_module.time = _StillClock
    try:
        plain = _run(factory, make_learner, tmp_path / 'plain', middle=False)
        mixed = _run(factory, make_learner, tmp_path / 'mixed', middle=True, lr_find=lr_find)
    finally: run_module.time = clock
    for k in ('history', 'files', 'sub', 'weights', 'opt', 'counters', 'rng'):   # the objects differ between runs
        assert same_state(plain[k], mixed[k]), f'after validate/get_preds/lr_find, the next fit ends with other {k}: ' \
            f'{state_diffs(plain[k], mixed[k])[:3]}'
