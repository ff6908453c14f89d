"The first subscribers: device, normalization, metrics, progress."
import warnings
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torcheval.metrics import MulticlassAccuracy

from nntrain.core import Order, Subscriber, to_device
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.run import Run
from nntrain.subs.device import DeviceS
from nntrain.subs.metrics import MetricsS
from nntrain.subs.normalize import NormalizationS, mean_std
from nntrain.subs.progress import ProgressS
from nntrain.testing import same_state, tiny_classifier


def test_metrics_flush_bounds_memory_and_gives_same_result():
    torch.manual_seed(0)
    learn_a, learn_b = tiny_classifier(), tiny_classifier()
    learn_b.model.load_state_dict(learn_a.model.state_dict())
    a, b = MetricsS(acc=MulticlassAccuracy()), MetricsS(acc=MulticlassAccuracy(), flush_every=1)
    learn_a.fit(1, subs=[a], train=False); learn_b.fit(1, subs=[b], train=False)
    assert learn_a.history[-1]['acc'] == learn_b.history[-1]['acc']
    assert learn_a.history[-1]['loss'] == pytest.approx(learn_b.history[-1]['loss'])


def test_normalization_measured_once_and_applied_on_both_phases():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 4, 4) * 5 + 2
    y = torch.randint(0, 2, (64,))
    dls = DataLoaders.from_tensors(x, y, x, y, batch_size=16)
    norm = NormalizationS()
    seen = {True: [], False: []}
    class Spy(Subscriber):
        order = norm.order + 1
        def before_batch(self, learn): seen[learn.training].append(learn.xb[0].clone())
    learn = Learner(nn.Sequential(nn.Flatten(), nn.Linear(48, 2)), dls, lr=0.01, subs=[norm, Spy()])
    learn.fit(1)
    assert norm.mean.shape == norm.std.shape == (3,)
    assert same_state((norm.mean, norm.std), mean_std(dls.train, n_batches=None))   # all 4 batches, measured exactly
    for training in (True, False):   # what the model saw, in both phases: each channel standardized, not just shifted
        x = torch.cat(seen[training])
        assert x.shape == (64, 3, 4, 4)
        torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    stats = norm.mean.clone()
    learn.fit(1)
    assert torch.equal(norm.mean, stats)


def test_normalization_scalar_for_flat_inputs():
    x = torch.randn(32, 10) * 3
    mean, std = mean_std([(x, None)], n_batches=None)
    assert mean.shape == () and std.item() == pytest.approx(x.double().std(unbiased=False).item(), rel=1e-4)


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def test_device_moves_model_and_nested_batches():
    "To the 'meta' device, which no tensor here starts on: a DeviceS that did nothing would fail."
    learn, dev = tiny_classifier(), DeviceS('meta')
    dev.before_fit(learn)
    assert {p.device.type for p in learn.model.parameters()} == {'meta'}
    nested = {'y': torch.zeros(2), 'w': [torch.ones(2), 3]}
    learn.run = Run('fit', [])   # a run in progress holds the batch
    learn.batch = (torch.randn(2, 8), nested, Pair(torch.ones(1), torch.ones(1)))
    dev.before_batch(learn)
    x, d, pair = learn.batch
    assert x.device.type == d['y'].device.type == d['w'][0].device.type == 'meta' and d['w'][1] == 3
    assert isinstance(pair, Pair) and pair.x.device.type == pair.y.device.type == 'meta'


def test_device_moves_every_batch_of_a_fit(monkeypatch):
    import nntrain.subs.device as device_module
    moved = []
    def spy(obj, device, non_blocking=False):
        moved.append((id(obj), torch.device(device)))
        return to_device(obj, device, non_blocking)
    monkeypatch.setattr(device_module, 'to_device', spy)
    seen = []
    class Spy(Subscriber):
        order = Order.DEVICE - 1
        def before_batch(self, learn): seen.append(id(learn.batch))
    learn = tiny_classifier()
    learn.fit(1, subs=[DeviceS('cpu'), Spy()])
    n = len(learn.dls.train) + len(learn.dls.valid)
    assert len(moved) == n and [m[0] for m in moved] == seen and {m[1] for m in moved} == {torch.device('cpu')}


def test_progress_table_rows_and_plot_data(capsys):
    learn = tiny_classifier()
    progress = ProgressS(plot=True)
    learn.fit(2, subs=[MetricsS(acc=MulticlassAccuracy()), progress])
    out = capsys.readouterr().out
    assert 'epoch' in out and 'valid' in out and 'acc' in out
    assert len(progress.train_losses) == 2 * len(learn.dls.train)
    assert progress.valid_steps == [3, 6]
    ax = progress.figure().axes[0]
    train, valid = ax.get_lines()
    assert list(train.get_xdata()) == progress.train_steps and list(valid.get_xdata()) == [3, 6]
    assert list(valid.get_ydata()) == pytest.approx([r['loss'] for r in learn.history if r['phase'] == 'valid'])
    assert (ax.get_xlabel(), ax.get_ylabel()) == ('optimizer step', 'loss')
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['train', 'valid']


def test_progress_display_failure_never_stops_training():
    class Broken(ProgressS):
        def _start_epoch(self, learn): raise OSError('front-end gone')
    learn = tiny_classifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        learn.fit(2, subs=[MetricsS(), Broken()])
    assert learn.global_step == 6 and len(learn.history) == 4
    assert sum('stopped displaying' in str(w.message) for w in caught) == 1
