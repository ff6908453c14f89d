"Initialisation (nntrain.init): init_weights and lsuv_init, including what LSUV must leave as it found it."
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.data import DataLoaders
from nntrain.hooks import Hooks, count_hooks
from nntrain.init import LayerStats, LSUVReport, init_weights, lsuv_init
from nntrain.learner import Learner
from nntrain.models import xresnet18
from nntrain.subs.normalize import NormalizationS
from nntrain.testing import same_weights


def plain_cnn(n_convs: int = 6, width: int = 16, head: bool = True) -> nn.Sequential:
    "Convolutions with ReLU and no normalisation; a linear head when `head`."
    layers, ni = [], 1
    for i in range(n_convs):
        layers += [nn.Conv2d(ni, width, 3, stride=2 if i in (0, 2) else 1, padding=1), nn.ReLU()]
        ni = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()] + ([nn.Linear(width, 10)] if head else [])
    return nn.Sequential(*layers)


def output_stats(model, xb, types=(nn.Conv2d, nn.Linear)):
    "Mean and std of each layer's output, from hooks of the test's own, in forward order."
    stats = []
    def hook(i, m, args, out): stats.append((out.mean().item(), out.std().item()))
    with Hooks([m for m in model.modules() if isinstance(m, types)], hook), torch.no_grad(): model(xb)
    return stats


def params(model): return [p.detach().clone() for p in model.parameters()]


@pytest.fixture
def xb():
    torch.manual_seed(0)
    return torch.randn(64, 1, 16, 16)


# -- init_weights ---------------------------------------------------------------------------------------------------

def test_init_weights_kaiming_std_and_zero_bias():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(32, 64, 3), nn.Linear(500, 400)
    for m in (conv, lin): nn.init.constant_(m.bias, 3.)
    init_weights(conv)
    assert math.isclose(conv.weight.std().item(), math.sqrt(2 / (32 * 9)), rel_tol=0.03)
    init_weights(lin, leaky=0.2)
    assert math.isclose(lin.weight.std().item(), math.sqrt(2 / (1.04 * 500)), rel_tol=0.02)
    assert conv.bias.abs().sum() == 0 and lin.bias.abs().sum() == 0
    model = nn.Sequential(nn.Conv1d(4, 8, 3, bias=False), nn.BatchNorm1d(8), nn.GroupNorm(2, 8), nn.LayerNorm(5))
    for m in model[1:]: nn.init.constant_(m.weight, 5.); nn.init.constant_(m.bias, 5.)
    model.apply(partial(init_weights, leaky=0.1))
    for m in model[1:]: assert (m.weight == 1).all() and (m.bias == 0).all()


def test_init_weights_keeps_xresnet_zero_batchnorms_unless_asked():
    m = xresnet18(n_out=10)
    zero = [b for b in m.modules() if getattr(b, 'zero_init', False)]
    assert len(zero) == 8
    m.apply(init_weights)
    assert all((b.weight == 0).all() for b in zero)
    m.apply(partial(init_weights, zero_bn=False))
    assert all((b.weight == 1).all() for b in m.modules() if isinstance(b, nn.BatchNorm2d))


# -- lsuv_init: the result ------------------------------------------------------------------------------------------

def test_lsuv_every_layer_has_mean_0_std_1(xb):
    torch.manual_seed(1)
    model = plain_cnn()
    before = output_stats(model, xb)
    assert max(abs(s - 1) for _, s in before) > 0.2   # something to do
    report = lsuv_init(model, xb, tol=1e-3)
    after = output_stats(model, xb)
    assert len(after) == 7
    for mean, std in after: assert abs(mean) < 1e-3 and abs(std - 1) < 1e-3
    assert isinstance(report, LSUVReport) and all(isinstance(r, LayerStats) for r in report)
    assert [r.name for r in report] == ['0', '2', '4', '6', '8', '10', '14']
    for (mean, std), r in zip(after, report, strict=True):
        assert math.isclose(mean, r.mean, abs_tol=1e-6) and math.isclose(std, r.std, abs_tol=1e-6)
    assert all(1 <= n <= 10 for n in report.iters)


def test_lsuv_report_displays_as_a_table(xb):
    report = lsuv_init(plain_cnn(n_convs=2, head=False), xb)
    text = repr(report)
    assert text.splitlines()[0].split() == ['layer', 'mean', 'std', 'rescalings'] and len(text.splitlines()) == 3
    assert report._repr_markdown_().count('\n') == 3
    name, mean, std = report[0]
    assert name == '0' and abs(mean) < 1e-3


class Reordered(nn.Module):
    "Defines `late` before `early` but calls `early` first; `unused` never runs."
    def __init__(self):
        super().__init__()
        self.late, self.early, self.unused = nn.Linear(8, 8), nn.Linear(4, 8), nn.Linear(3, 3)
    def forward(self, x): return self.late(torch.relu(self.early(x)))


def test_lsuv_follows_forward_order_and_skips_modules_that_do_not_run():
    torch.manual_seed(0)
    model, x = Reordered(), torch.randn(256, 4)
    report = lsuv_init(model, x)
    assert [r.name for r in report] == ['early', 'late']
    for r in report: assert abs(r.mean) < 1e-3 and abs(r.std - 1) < 1e-3
    with pytest.raises(ValueError, match='did not run on xb: unused'): lsuv_init(model, x, modules=['early', 'unused'])


def test_lsuv_chosen_modules_by_name_or_module(xb):
    torch.manual_seed(0)
    model = plain_cnn()
    untouched = params(model[4])
    report = lsuv_init(model, xb, modules=['2', model[14]])
    assert [r.name for r in report] == ['2', '14']
    assert same_weights(untouched, params(model[4]))


def test_lsuv_layer_without_bias_gets_only_its_std_fixed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20, bias=False), nn.ReLU(), nn.Linear(20, 5))
    x = torch.randn(200, 6) + 2   # a mean that a bias-less layer cannot remove
    report = lsuv_init(model, x)
    assert abs(report[0].std - 1) < 1e-3 and abs(report[0].mean) > 0.01
    assert abs(report[1].mean) < 1e-3 and abs(report[1].std - 1) < 1e-3


def test_lsuv_warns_when_it_cannot_reach_tol(xb):
    with pytest.warns(UserWarning, match='not within tol'): lsuv_init(plain_cnn(n_convs=2), xb, tol=1e-12, max_iter=2)


# -- lsuv_init: what it leaves alone --------------------------------------------------------------------------------

def test_lsuv_leaves_no_hooks_modes_grad_mode_and_batchnorm_stats(xb):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 12 * 12, 3))
    model(xb)   # running statistics that differ from their defaults
    model[5].eval(); model[7].eval()
    modes = [m.training for m in model.modules()]
    buffers = [b.clone() for b in model.buffers()]
    user = model[2].register_forward_hook(lambda m, a, o: None)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            report = lsuv_init(model, xb)
            assert torch.is_grad_enabled() == grad
        for r in report: assert abs(r.mean) < 1e-3 and abs(r.std - 1) < 1e-3   # dropout was off: exact
        assert [m.training for m in model.modules()] == modes
        assert same_weights(buffers, list(model.buffers()))   # running mean, var and num_batches_tracked
        assert count_hooks(model) == 1   # only the user's own
    user.remove()
    assert all(p.grad is None for p in model.parameters())


def test_lsuv_restores_everything_when_a_forward_hook_raises(xb):
    torch.manual_seed(0)
    model = nn.Sequential(plain_cnn(head=False), nn.BatchNorm1d(16), nn.Linear(16, 4))
    model[0][2].eval()
    modes, weights, buffers = [m.training for m in model.modules()], params(model), [b.clone() for b in model.buffers()]
    calls = []
    def broken(m, args, out):
        calls.append(1)
        if len(calls) > 5: raise RuntimeError('hook failed')   # after a few layers were rescaled
    handle = model[0][6].register_forward_hook(broken)
    with pytest.raises(RuntimeError, match='hook failed'): lsuv_init(model, xb)
    assert len(calls) > 5
    handle.remove()
    assert same_weights(weights, params(model)) and same_weights(buffers, list(model.buffers()))
    assert [m.training for m in model.modules()] == modes
    assert count_hooks(model) == 0 and torch.is_grad_enabled()


def test_lsuv_dead_layer_is_an_error_naming_it_and_changes_nothing(xb):
    torch.manual_seed(0)
    model = plain_cnn(n_convs=3)
    nn.init.zeros_(model[2].weight); nn.init.zeros_(model[2].bias)
    weights = params(model)
    with pytest.raises(ValueError, match='output of 2 has mean 0.0, std 0.0'): lsuv_init(model, xb)
    assert same_weights(weights, params(model)) and count_hooks(model) == 0


def test_lsuv_bad_arguments_are_errors_before_anything_changes(xb):
    model = plain_cnn(n_convs=2)
    weights = params(model)
    for kwargs, exc, msg in ((dict(tol=0), ValueError, 'tol must be positive'),
                             (dict(max_iter=0), ValueError, 'max_iter must be'),
                             (dict(max_iter=1.5), ValueError, 'max_iter must be'),
                             (dict(modules=['9']), ValueError, "no module named '9'"),
                             (dict(modules=[nn.Linear(2, 2)]), ValueError, 'not a module of the model'),
                             (dict(modules=[model[1]]), ValueError, r'1 \(ReLU\) has no weight')):
        with pytest.raises(exc, match=msg): lsuv_init(model, xb, **kwargs)
    with pytest.raises(TypeError, match='xb must be a tensor'): lsuv_init(model, xb.numpy())
    with pytest.raises(TypeError, match='nn.Module or a Learner'): lsuv_init('model', xb)
    with pytest.raises(ValueError, match='no Conv or Linear'): lsuv_init(nn.Sequential(nn.ReLU()), xb)
    assert same_weights(weights, params(model)) and count_hooks(model) == 0


# -- lsuv_init with a Learner ---------------------------------------------------------------------------------------

def test_lsuv_on_a_learner_sees_the_batch_as_the_model_does():
    torch.manual_seed(0)
    xs, ys = torch.rand(96, 1, 16, 16) * 4 + 3, torch.randint(0, 10, (96,))
    dls = DataLoaders.from_tensors(xs, ys, xs, ys, batch_size=32)
    learn = Learner(plain_cnn(), dls, F.cross_entropy, subs=[NormalizationS(xs.mean(), xs.std())])
    torch.manual_seed(1); learn.model = plain_cnn()
    torch.manual_seed(1); model = plain_cnn()
    report = lsuv_init(learn, xs)
    lsuv_init(model, (xs - xs.mean()) / xs.std())
    pairs = zip(learn.model.parameters(), model.parameters(), strict=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in pairs)
    assert all(abs(r.std - 1) < 1e-3 for r in report)
    assert count_hooks(learn.model) == 0 and learn.global_step == 0 and learn.history == []
    learn.fit(1)
    assert learn.global_step == len(dls.train)


class Scale(nn.Module):
    "A layer of its own kind: a learned scale, no bias attribute at all."
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(5.))
    def forward(self, x): return x * self.weight


def test_lsuv_on_any_module_with_a_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), Scale())
    report = lsuv_init(model, torch.randn(100, 4), modules=[model[1]])
    assert [r.name for r in report] == ['1'] and abs(report[0].std - 1) < 1e-3


def test_lsuv_on_a_learner_checks_modules_before_running_the_learner():
    xs, ys = torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,))
    class Count(NormalizationS):
        calls = 0
        def before_batch(self, learn): Count.calls += 1; super().before_batch(learn)
    learn = Learner(plain_cnn(), DataLoaders.from_tensors(xs, ys, xs, ys, batch_size=4), F.cross_entropy,
                    subs=[Count(0., 1.)])
    with pytest.raises(ValueError, match='no module named'): lsuv_init(learn, xs, modules=['nope'])
    assert Count.calls == 0
    lsuv_init(learn, xs)
    assert Count.calls == 1
