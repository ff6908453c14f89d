"""Issue 18, rules 6 and 9: a run of one kind leaves no trace in state that belongs to another, and nothing holds
autograd graphs or a run's tensors after a fit: a learner can then be deep-copied and pickled.

Both are checked for every entry of the subscriber registry (tests/test_contract.py).
"""
import copy
import gc
import os
import pickle
import warnings
import weakref

import pytest
import torch
from torcheval.metrics import MulticlassAccuracy

from nntrain import run as run_module
from nntrain.core import Subscriber, set_seed
from nntrain.subs.checkpoint import CheckpointS, latest_checkpoint
from nntrain.subs.metrics import MetricsS
from nntrain.subs.training import EMAS
from nntrain.testing import failing, tiny_classifier
from tests.contract import observe, same_state
from tests.registry import REGISTRY, params


class _StillClock:
    @staticmethod
    def perf_counter() -> float: return 0.


@pytest.fixture(autouse=True)
def still_clock(monkeypatch):
    monkeypatch.setattr(run_module, 'time', _StillClock)


# -- rule 6 -----------------------------------------------------------------------------------------------------------
def test_validate_before_any_fit_leaves_emas_average_alone():
    "Issue 18's example: validate() before training set the average from the untrained weights."
    def run(first):
        set_seed(0)
        ema = EMAS(0.9)
        learn = tiny_classifier(subs=[ema, MetricsS()])
        untrained = learn.validate()
        if first: first(learn)
        learn.fit(2)
        return learn, ema, untrained
    plain, plain_ema, _ = run(None)
    mixed, mixed_ema, row = run(lambda learn: (learn.validate(), learn.get_preds()))
    assert same_state(plain.history, mixed.history) and same_state(plain_ema.state_dict(), mixed_ema.state_dict())
    assert same_state(plain.model.state_dict(), mixed.model.state_dict())
    fresh = tiny_classifier(subs=[EMAS(0.9)])
    fresh.validate()
    assert fresh.subs[0].ema is None and fresh.subs[0].n_updates == 0   # nothing averaged from untrained weights


def _scoped(factory, make_learner, folder, first: bool, lr_find: bool = True) -> dict:
    "Seeded: (validate, get_preds and lr_find first, when `first`), then two fits; what a user could see."
    folder.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        set_seed(0)
        sub, learn = factory(), make_learner()
        learn.run_id = 'run'   # the same run id in both: files compare bit for bit
        learn.add_subs(sub)
        if first:
            learn.validate()
            learn.get_preds()
            if lr_find: learn.lr_find(num_it=5, show_plot=False)
        learn.fit(1)
        learn.fit(1)
        return observe(learn, folder, sub)
    finally: os.chdir(cwd)


@pytest.mark.parametrize('name', params('contract'))
def test_runs_before_the_first_fit_leave_no_trace(name, tmp_path, capsys):
    "validate(), get_preds() and lr_find() before any fit: the fits after end exactly as without them."
    e = REGISTRY[name]
    plain = _scoped(e.factory, e.learner, tmp_path / 'plain', first=False, lr_find=e.lr_find)
    mixed = _scoped(e.factory, e.learner, tmp_path / 'mixed', first=True, lr_find=e.lr_find)
    for k in ('history', 'files', 'sub', 'weights', 'opt', 'counters', 'rng'):
        assert same_state(plain[k], mixed[k]), f'validate/get_preds/lr_find before the first fit changed {k}'


def test_a_validation_between_load_and_resume_keeps_the_metrics_for_the_resumed_phase(tmp_path):
    "MetricsS keeps a loaded mid-phase state for the fit that resumes it: a validate() in between does not take it."
    class Stop(Subscriber):
        def after_batch(self, learn):
            if learn.training and learn.global_step == 2: raise RuntimeError('crash')
    def make():
        set_seed(0)
        return tiny_classifier(subs=[MetricsS(acc=MulticlassAccuracy()), CheckpointS(tmp_path, every=1)])
    straight = make()
    straight.fit(2)
    first = make()
    with pytest.raises(RuntimeError): first.fit(2, subs=[Stop()])
    resumed = make()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        resumed.load(latest_checkpoint(tmp_path))
        resumed.validate()
        resumed.get_preds()
        resumed.fit(2, resume=True)
    assert same_state(resumed.history, straight.history)


# -- rule 9 -----------------------------------------------------------------------------------------------------------
class Spy(Subscriber):
    "Weak references to every batch tensor, prediction, output and loss of a run: none may outlive it."
    order = 10 ** 6
    def __init__(self): self.refs = []
    def after_batch(self, learn):
        for name in ('preds', 'loss', 'out'):
            v = getattr(learn, name)
            if isinstance(v, torch.Tensor): self.refs.append((name, weakref.ref(v)))
        for i, x in enumerate(learn.xb + learn.yb):
            if isinstance(x, torch.Tensor): self.refs.append((f'batch item {i}', weakref.ref(x)))
    def alive(self) -> list:
        gc.collect()
        return sorted({name for name, r in self.refs if r() is not None})


def _graphs(obj) -> list:
    "Tensors with an autograd graph (a grad_fn) reachable from `obj` through objects' attributes and containers."
    seen, found, todo = set(), [], [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, (str, bytes, int, float, type)) or callable(o) and not hasattr(o, '__dict__'):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if o.grad_fn is not None: found.append(tuple(o.shape))
            continue
        if isinstance(o, dict): todo += list(o.keys()) + list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)): todo += list(o)
        if hasattr(o, '__dict__'): todo += list(vars(o).values())
    return found


def _picklable(obj) -> bool:
    try: pickle.dumps(obj)
    except Exception: return False
    return True


@pytest.mark.parametrize('ending', ['done', 'error'])
@pytest.mark.parametrize('name', params('contract'))
def test_after_a_fit_nothing_holds_a_run_and_the_learner_copies_and_pickles(name, ending, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    factory, make_learner, kwargs = REGISTRY[name].factory, REGISTRY[name].learner, REGISTRY[name].contract
    sub, learn, spy = factory(), make_learner(), Spy()
    # a subscriber holding a function of the test's own (a lambda) cannot be pickled, whatever nntrain does
    picklable = _picklable(sub) and _picklable(learn)
    learn.add_subs(sub)
    if ending == 'done': learn.fit(1, subs=[spy])
    else:
        with pytest.raises(RuntimeError, match='injected failure'):
            learn.fit(1, subs=[spy, failing(kwargs.get('fail_event', 'after_loss'), kwargs.get('fail_at', 1))])
    assert spy.alive() == [], f'{name}: a run\'s tensors outlive it'
    assert _graphs(learn) == [], f'{name}: the learner holds tensors with autograd graphs'
    twin = copy.deepcopy(learn)
    assert twin.subs[0] is not learn.subs[0] and same_state(twin.model.state_dict(), learn.model.state_dict())
    if picklable:
        again = pickle.loads(pickle.dumps(learn))
        assert [type(s) for s in again.subs] == [type(s) for s in learn.subs]


def test_a_copy_trains_on_its_own():
    learn = tiny_classifier(subs=[MetricsS(), EMAS(0.9)])
    learn.fit(1)
    weights = copy.deepcopy(learn.model.state_dict())
    twin = copy.deepcopy(learn)
    twin.fit(1)
    assert same_state(learn.model.state_dict(), weights) and not same_state(twin.model.state_dict(), weights)
    assert next(s for s in twin.subs if isinstance(s, EMAS)).params is None and twin.global_step == learn.global_step + 3
    assert pickle.loads(pickle.dumps(twin)).global_step == twin.global_step
