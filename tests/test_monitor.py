"Model summary, MAC counting, ModelMonitorS and ActivationStatsS (nntrain.subs.monitor)."
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nntrain.core import CancelFitException, Subscriber
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.models import resnet, simple_cnn
from nntrain.subs.monitor import ActivationStatsS, Hooks, ModelMonitorS, activation_stats
from nntrain.summary import (conv_macs, conv_transpose_macs, leaf_modules, linear_macs, mha_macs, module_macs,
                             norm_macs, summary)
from nntrain.testing import same_state, state_diffs, tiny_classifier
from tests.contract import n_hooks


def macs_of(m, *args):
    "MACs `module_macs` gives for one call of `m` on `args`."
    with torch.no_grad(): out = m(*args)
    return module_macs(m, args, {}, out)


def flops(m, *args) -> int:
    "PyTorch's own count of a forward pass (2 FLOPs per MAC for convolutions and matrix products)."
    with FlopCounterMode(display=False) as counter, torch.no_grad(): m(*args)
    return counter.get_total_flops()


# -- MACs per layer type, by hand ---------------------------------------------------------------------------------

def test_conv_macs_by_hand():
    x = torch.randn(2, 3, 10, 10)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)                    # out (2, 8, 5, 5)
    assert macs_of(conv, x) == 2 * 8 * 5 * 5 * (3 * 3 * 3)
    assert conv_macs(conv, conv(x)) == 400 * 27
    grouped = nn.Conv2d(4, 8, (3, 1), groups=2, bias=False)          # out (2, 8, 8, 10), 2 inputs per group
    assert macs_of(grouped, torch.randn(2, 4, 10, 10)) == 2 * 8 * 8 * 10 * (2 * 3)
    depthwise = nn.Conv2d(4, 4, 3, groups=4, padding=1)
    assert macs_of(depthwise, torch.randn(1, 4, 6, 6)) == 4 * 6 * 6 * 9
    conv1 = nn.Conv1d(3, 6, 5, dilation=2)                           # 20 - 2*4 = 12 outputs
    assert macs_of(conv1, torch.randn(2, 3, 20)) == 2 * 6 * 12 * (3 * 5)
    conv3 = nn.Conv3d(2, 4, (3, 2, 1))                              # out (2, 4, 3, 5, 7)
    assert macs_of(conv3, torch.randn(2, 2, 5, 6, 7)) == 2 * 4 * 3 * 5 * 7 * (2 * 3 * 2 * 1)


def test_conv_transpose_macs_by_hand():
    x = torch.randn(2, 3, 5, 5)
    up = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)
    assert macs_of(up, x) == 2 * 3 * 5 * 5 * (4 * 3 * 3)        # every input pixel times a 4×3×3 kernel
    assert conv_transpose_macs(up, x) == 5400
    grouped = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)
    assert macs_of(grouped, torch.randn(1, 4, 3, 3)) == 4 * 3 * 3 * (3 * 2 * 2)


def test_linear_and_norm_macs_by_hand():
    lin = nn.Linear(10, 7)
    assert macs_of(lin, torch.randn(5, 10)) == 5 * 10 * 7
    assert macs_of(lin, torch.randn(5, 6, 10)) == 5 * 6 * 10 * 7    # leading dimensions multiply
    assert linear_macs(lin, torch.zeros(3, 7)) == 3 * 70
    assert macs_of(nn.Bilinear(3, 4, 5), torch.randn(6, 3), torch.randn(6, 4)) == 6 * 5 * 3 * 4
    x = torch.randn(4, 6, 3, 3)
    for norm in (nn.BatchNorm2d(6), nn.GroupNorm(2, 6), nn.InstanceNorm2d(6), nn.LayerNorm([6, 3, 3])):
        assert macs_of(norm.eval(), x) == 4 * 6 * 3 * 3, type(norm).__name__
    assert macs_of(nn.BatchNorm1d(5).eval(), torch.randn(3, 5)) == 15
    assert norm_macs(x) == x.numel()


def test_attention_macs_by_hand():
    e, n, lq, lk = 8, 3, 5, 7
    q = torch.randn(n, lq, e)
    mha = nn.MultiheadAttention(e, 2, batch_first=True)
    # q, k, v and out projections (e·e per token each), then QKᵀ and attention·V (lq·lk·e each)
    assert macs_of(mha, q, q, q) == n * (4 * lq * e * e + 2 * lq * lq * e)
    cross = nn.MultiheadAttention(e, 2, kdim=6, vdim=4)              # sequence-first, other key/value widths
    k, v = torch.randn(lk, n, 6), torch.randn(lk, n, 4)
    assert macs_of(cross, q.transpose(0, 1), k, v) == n * (2 * lq * e * e + lk * 6 * e + lk * 4 * e + 2 * lq * lk * e)
    assert mha_macs(mha, torch.randn(lq, e), torch.randn(lq, e)) == 4 * lq * e * e + 2 * lq * lq * e   # unbatched
    out = mha(query=q, key=q, value=q)
    assert module_macs(mha, (), {'query': q, 'key': q, 'value': q}, out) == n * (4 * lq * e * e + 2 * lq * lq * e)


@pytest.mark.parametrize('m, args', [
    (nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2), (torch.randn(2, 4, 9, 9),)),
    (nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (torch.randn(2, 3, 5, 5),)),
    (nn.Linear(10, 7), (torch.randn(5, 6, 10),)),
    (nn.MultiheadAttention(8, 2, kdim=6, vdim=4), (torch.randn(5, 3, 8), torch.randn(7, 3, 6), torch.randn(7, 3, 4))),
], ids=['conv', 'conv_transpose', 'linear', 'attention'])
def test_macs_agree_with_torch_flop_counter(m, args):
    assert 2 * macs_of(m, *args) == flops(m, *args)


def test_zero_mac_and_uncounted_modules():
    x = torch.randn(2, 3, 8, 8)
    for m in (nn.ReLU(), nn.GELU(), nn.SiLU(), nn.Softmax(1), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1),
              nn.Dropout(), nn.Flatten(), nn.Identity(), nn.Upsample(scale_factor=2), nn.ZeroPad2d(1)):
        assert macs_of(m, x) == 0, type(m).__name__
    assert macs_of(nn.Embedding(10, 4), torch.tensor([1, 2])) == 0
    assert macs_of(nn.LSTM(3, 4), torch.randn(5, 2, 3)) is None           # no formula: no guess

    class Scale(nn.Module):   # a leaf nntrain knows nothing about
        def forward(self, x): return 2 * x
    s = summary(nn.Sequential(nn.Linear(3, 4), Scale(), nn.LSTM(4, 2)), torch.randn(2, 3))
    assert s.not_counted == ['LSTM', 'Scale']
    assert [l.macs for l in s.layers] == [12, None, None]
    assert 'Not counted' in str(s) and 'LSTM, Scale' in s._repr_markdown_()


# -- summary -------------------------------------------------------------------------------------------------------

def cnn_macs_per_image(channels=(16, 32, 64, 128), n_classes=10):
    "simple_cnn on 28×28 by hand: stride-2 3×3 convs (28→14→7→4→2), a batch norm after each, the linear head."
    macs, size, c_in = 0, 28, 1
    for c in channels:
        size = (size + 1) // 2
        macs += size * size * c * (9 * c_in) + size * size * c   # conv, then batch norm
        c_in = c
    return macs + channels[-1] * n_classes


def test_simple_cnn_totals():
    model = simple_cnn()
    s = summary(model, torch.randn(4, 1, 28, 28))
    assert s.macs == cnn_macs_per_image() == 14*14*16*9 + 7*7*32*144 + 4*4*64*288 + 2*2*128*576 + 6240 + 1280
    assert s.batch_size == 4
    assert s.params == s.trainable == sum(p.numel() for p in model.parameters())
    assert sum(l.macs for l in s.layers) == s.macs
    assert [l.type for l in s.layers[:3]] == ['Conv2d', 'BatchNorm2d', 'ReLU']
    assert (s.layers[0].input_shape, s.layers[0].output_shape) == ('(4, 1, 28, 28)', '(4, 16, 14, 14)')
    assert (s.layers[-1].name, s.layers[-1].output_shape, s.layers[-1].macs) == ('6', '(4, 10)', 1280)
    small = summary(simple_cnn(channels=(4, 8)), torch.randn(1, 1, 28, 28))
    assert small.macs == cnn_macs_per_image((4, 8))


def test_summary_of_chosen_modules_and_shared_layers():
    model = resnet()
    x = torch.randn(2, 1, 28, 28)
    leaves, blocks = summary(model, x), summary(model, x, modules=list(model))
    assert sum(l.macs for l in blocks.layers) == leaves.macs == blocks.macs
    assert [l.name for l in blocks.layers] == [str(i) for i in range(len(model))]
    assert blocks.layers[1].params == sum(p.numel() for p in model[1].parameters())
    named = summary(model, x, modules=['0.convs', '0'])
    assert named.layers[0].name == '0' and named.layers[1].name == '0.convs'     # in order of entry
    assert named.layers[1].macs == 28 * 28 * 8 * 9 + 28 * 28 * 8 + 28 * 28 * 8 * 72 + 28 * 28 * 8

    lin = nn.Linear(4, 4)
    shared = summary(nn.Sequential(lin, nn.ReLU(), lin), torch.randn(3, 4))
    assert shared.params == 20                         # counted once
    assert [(l.name, l.macs) for l in shared.layers] == [('0', 16), ('1', 0), ('0', 16)]   # but run twice
    assert shared.macs == 32
    assert len(leaf_modules(nn.Sequential(lin, nn.ReLU(), lin))) == 2


def test_summary_restores_modes_and_uses_no_grad():
    model = simple_cnn()
    model.train()
    model[0].eval()
    modes = [m.training for m in model.modules()]
    grads = []
    model[0].register_forward_hook(lambda m, a, out: grads.append((torch.is_grad_enabled(), m.training)))
    summary(model, torch.randn(2, 1, 28, 28))
    assert [m.training for m in model.modules()] == modes
    assert grads == [(False, False)]


def state(learn):
    "Everything a summary must leave alone."
    return dict(weights=copy.deepcopy(learn.model.state_dict()), opt=copy.deepcopy(learn.opt.state_dict()),
                counters=(learn.global_step, learn.epoch, learn.n_epochs, learn.iter, learn.n_iter, learn.pct_train,
                          learn.training, len(learn.history)),
                loader=learn.dls.train.generator.get_state().clone(), modes=[m.training for m in learn.model.modules()])


def same(a, b): assert same_state(a, b), state_diffs(a, b)


def test_summary_of_a_learner_changes_nothing():
    learn = tiny_classifier()
    learn.opt_func = lambda ps, lr: torch.optim.SGD(ps, lr, momentum=0.9)
    learn.fit(1)
    learn.model.train()
    before = state(learn)
    xb, yb = next(iter(learn.dls.valid))
    s = learn.summary()
    same(before, state(learn))
    assert s.batch_size == 16 and s.layers[0].input_shape == '(16, 8)'
    assert s.macs == 8 * 16 + 16 + 16 * 3          # Linear, BatchNorm1d, Linear per item
    s2 = summary(learn, batch=(xb, yb))
    assert s2.macs == s.macs
    same(before, state(learn))
    assert n_hooks(learn.model) == 0


def test_summary_goes_through_input_subscribers():
    learn = tiny_classifier()
    class Widen(Subscriber):   # an input transform, as a normalization or device subscriber would be
        def before_batch(self, learn): learn.batch = (torch.cat([learn.batch[0]] * 2), torch.cat([learn.batch[1]] * 2))
    learn.add_subs(Widen())
    assert learn.summary().batch_size == 32


def test_summary_removes_hooks_after_an_error():
    class Broken(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(3, 3)
        def forward(self, x): self.lin(x); raise ValueError('broken')
    model = Broken()
    with pytest.raises(ValueError, match='broken'): summary(model, torch.randn(2, 3))
    assert n_hooks(model) == 0 and model.training
    with pytest.raises(ValueError, match='needs a batch'): summary(model)


def test_hooks_remove_all_even_on_failure():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(AttributeError, match='register_forward_hook'):
        Hooks([model[0], model[1], 'not a module'], lambda *a: None)
    assert n_hooks(model) == 0
    with pytest.raises(KeyError, match='x'):
        with Hooks(model, lambda i, m, a, out: None, pre=False) as h:
            assert len(h) == 2 and n_hooks(model) == 2
            raise KeyError('x')
    assert n_hooks(model) == 0
    h = Hooks(model.modules(), lambda i, m, a: None, pre=True)
    assert n_hooks(model) == 3
    h.remove(); h.remove()
    assert n_hooks(model) == 0


# -- ModelMonitorS ------------------------------------------------------------------------------------------------

class Recorder(Subscriber):
    order = 1000
    def __init__(self): self.events = []
    def after_predict(self, learn): self.events.append('after_predict')
    def after_backward(self, learn): self.events.append('after_backward')
    def after_step(self, learn): self.events.append('after_step')


def test_model_monitor_cancels_before_any_change(capsys):
    learn = tiny_classifier()
    learn.fit(1)
    learn.model.train()
    before = state(learn)
    rec, monitor = Recorder(), ModelMonitorS()
    learn.fit(1, subs=[monitor, rec])
    assert rec.events == []                       # cancelled in after_predict, before any backward or step
    same(before | {'counters': None}, state(learn) | {'counters': None})   # weights, buffers, optimizer, loader, modes
    assert learn.global_step == before['counters'][0]
    out = capsys.readouterr().out
    assert 'Linear' in out and 'MACs per item' in out
    assert monitor.summary.macs == summary(learn.model, torch.randn(2, 8)).macs
    assert n_hooks(learn.model) == 0


def test_model_monitor_without_cancel_records_once_and_trains():
    learn = tiny_classifier()
    monitor, rec = ModelMonitorS(show=False, cancel=False), Recorder()
    seen = []
    monitor_hooks = lambda: seen.append(n_hooks(learn.model))
    class Count(Subscriber):
        def after_batch(self, learn): monitor_hooks()
    learn.fit(2, subs=[monitor, rec, Count()])
    assert learn.global_step == 2 * len(learn.dls.train)
    assert seen[0] == 0 and set(seen) == {0}      # hooks gone after the first batch's predict
    assert monitor.summary.batch_size == 16 and monitor.summary.macs == 8 * 16 + 16 + 16 * 3


@pytest.mark.parametrize('where', ['before_batch', 'after_predict'])
def test_model_monitor_cleans_up_after_an_error(where):
    learn = tiny_classifier()
    learn.model.train()
    before = dict(modes=[m.training for m in learn.model.modules()], loader=learn.dls.train.generator.get_state())
    class Boom(Subscriber):
        order = 0   # before the monitor's after_predict
    setattr(Boom, where, lambda self, learn: (_ for _ in ()).throw(RuntimeError('boom')))
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, subs=[ModelMonitorS(show=False), Boom()])
    assert n_hooks(learn.model) == 0
    assert [m.training for m in learn.model.modules()] == before['modes']
    assert torch.equal(learn.dls.train.generator.get_state(), before['loader'])


# -- ActivationStatsS ---------------------------------------------------------------------------------------------

def test_activation_stats_function_by_hand():
    a = torch.tensor([[0., 1., -2.], [0., 3., 0.]])
    st = activation_stats(a, bins=4, hist_range=(-4., 4.))
    assert torch.allclose(st['mean'], torch.tensor(2 / 6))
    assert torch.allclose(st['std'], a.flatten().std())
    assert st['hist'].tolist() == [0, 1, 4, 1]                 # -2 | 0 0 0 1 | 3
    assert torch.allclose(st['dead'], torch.tensor(.5))
    assert st['dead_units'].tolist() == [1., 0., .5]
    conv = activation_stats(torch.zeros(2, 3, 4, 4).index_fill_(1, torch.tensor([1]), 1.), dead_threshold=0.5)
    assert conv['dead_units'].tolist() == [1., 0., 1.]           # per channel (dim 1)


def test_activation_stats_match_a_manual_computation():
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    dls = DataLoaders.from_tensors(x, y, x[:8], y[:8], batch_size=8, seed=1)
    batches = []
    class Keep(Subscriber):
        order = 2000
        def before_batch(self, learn):
            if learn.training: batches.append((learn.batch[0].clone(), copy.deepcopy(learn.model)))
    acts = ActivationStatsS(modules=['1', model[2]], every=2, bins=5, hist_range=(-2., 2.), dead_threshold=0.)
    learn = Learner(model, dls, F.cross_entropy, lr=0.5, subs=[acts, Keep()])
    learn.fit(2)
    assert len(batches) == 10
    st = acts.stats
    assert list(st) == ['1', '2']
    assert len(st['1']['mean']) == 5                            # batches 0, 2, 4, 6, 8
    for j, (xb, m) in enumerate(batches[::2]):                 # the model as it was when the batch ran
        with torch.no_grad(): relu, out = m[1](m[0](xb)), m(xb)
        assert torch.allclose(st['1']['mean'][j], relu.mean()) and torch.allclose(st['1']['std'][j], relu.std())
        assert torch.equal(st['1']['hist'][j], torch.histc(relu, 5, -2., 2.))
        assert torch.allclose(st['1']['dead'][j], (relu == 0).float().mean())
        assert torch.allclose(st['1']['dead_units'][j], (relu == 0).float().mean(0))
        assert torch.allclose(st['2']['mean'][j], out.mean(), atol=1e-6)
    acts.reset()
    assert acts.stats == {}


def test_activation_stats_default_modules_and_accumulation():
    learn = tiny_classifier()
    acts = ActivationStatsS()
    learn.fit(1, subs=[acts])
    learn.fit(1, subs=[acts])
    assert list(acts.stats) == ['0', '1', '2', '3']            # children of the Sequential
    assert len(acts.stats['0']['mean']) == 2 * len(learn.dls.train)   # accumulates over fits, train batches only
    assert acts.stats['1']['hist'].shape == (6, 40) and acts.stats['0']['dead_units'].shape == (6, 16)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
            self.head = nn.Linear(16, 3)
        def forward(self, x): return self.head(self.body(x))
    learn.model = Net()
    acts = ActivationStatsS()
    learn.fit(1, subs=[acts])
    assert list(acts.stats) == ['body.0', 'head']              # leaves with parameters


def test_activation_stats_survive_a_cancel_and_plot():
    import matplotlib
    matplotlib.use('Agg')
    learn = tiny_classifier()
    acts = ActivationStatsS()
    class Stop(Subscriber):
        def after_batch(self, learn):
            if learn.iter == 1: raise CancelFitException()
    learn.fit(1, subs=[acts, Stop()])
    assert n_hooks(learn.model) == 0
    assert len(acts.stats['3']['std']) == 2                    # read lazily: after_fit never ran
    n = len(acts.stats['3']['std'])
    means, stds = acts.plot_stats().axes
    assert [len(l.get_ydata()) for l in means.get_lines() + stds.get_lines()] == [n] * 2 * len(acts.names)
    assert list(stds.get_lines()[-1].get_ydata()) == acts.stats['3']['std'].tolist()
    for fig in (acts.color_dim(), acts.dead_chart(per_unit=True)):   # one panel per module, a picture in each
        assert [ax.get_title().split(':')[0] for ax in fig.axes[:len(acts.names)]] == acts.names
        assert all(ax.get_images() for ax in fig.axes[:len(acts.names)])
    dead = acts.dead_chart().axes
    assert [ax.get_title().split(':')[0] for ax in dead[:len(acts.names)]] == acts.names
    assert all(len(ax.get_lines()[0].get_ydata()) == n for ax in dead[:len(acts.names)])
    with pytest.raises(ValueError, match='every must be at least 1'): ActivationStatsS(every=0)


def test_summary_text_and_markdown_tables():
    s = summary(simple_cnn(), torch.randn(2, 1, 28, 28))
    lines = str(s).splitlines()
    table = lines[:2 + len(s.layers)]
    assert table[0].split() == ['module', 'type', 'input', 'output', 'params', 'trainable', 'MACs']
    assert len({len(l) for l in table}) == 1                      # numbers right-aligned to one column edge
    assert table[2].endswith(f'{s.layers[0].macs:,}') and f'{s.macs:,} MACs per item' in str(s)
    md = s._repr_markdown_().splitlines()
    assert md[0].startswith('| module |') and md[1].endswith('---:|')
    assert len([l for l in md if l.startswith('| ')]) == 1 + len(s.layers)
