"""The subscriber contract every shipped subscriber must pass.

A test module calls `check_contract(factory)` for each subscriber it ships; `factory()` builds the subscriber with
default arguments (a zero-argument lambda is fine for subscribers that need a required argument).
"""
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.core import Subscriber
from nntrain.data import DataLoaders
from nntrain.learner import Learner


def tiny_classifier(n: int = 48, n_in: int = 8, n_classes: int = 3, bs: int = 16, seed: int = 0) -> Learner:
    "A linear-ish classifier on random data: 3 train and 2 valid batches, milliseconds on CPU."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, n_in, generator=g), torch.randint(0, n_classes, (n,), generator=g)
    dls = DataLoaders.from_tensors(x, y, x[:32], y[:32], batch_size=bs, valid_batch_size=bs, seed=seed)
    model = nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, n_classes))
    return Learner(model, dls, F.cross_entropy, torch.optim.SGD, lr=0.1)


def n_hooks(model: nn.Module) -> int:
    "Every forward/backward hook registered on any module of `model`."
    names = ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks', '_state_dict_hooks')
    return sum(len(getattr(m, a, {})) for m in model.modules() for a in names)


def snapshot(learn: Learner) -> dict:
    "What a subscriber must leave as it found it once a fit ends, however it ends."
    return dict(loss_func=learn.loss_func, opt_func=learn.opt_func, model=learn.model, dls=learn.dls,
                predict=learn.predict, step=learn.step, hooks=n_hooks(learn.model), grad=torch.is_grad_enabled(),
                subs=list(learn.subs))


def failing(event: str = 'after_loss', at: int = 1) -> Subscriber:
    "A subscriber raising `RuntimeError` at `event` of training batch `at` (an error, not a cancel), after the others."
    def handler(self, learn):
        if learn.training and learn.iter == at: raise RuntimeError('injected failure')
    return type('Fail', (Subscriber,), {'order': 1000, event: handler})()


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
    assert snapshot(learn) == before, f'{type(sub).__name__} left changes after an error: {_diff(before, snapshot(learn))}'
    assert learn.preds is None and learn.loss is None
    learn.fit(1, subs=[sub])     # still usable


def _diff(a: dict, b: dict) -> dict:
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}
