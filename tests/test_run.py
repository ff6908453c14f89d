"The run object: every run's state lives on it and goes with it, whatever way the run ends."
import gc
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.core import CancelFitException, Subscriber
from nntrain.data import DataLoaders
from nntrain.learner import RUN_STATE, Learner
from nntrain.run import Run
from nntrain.testing import failing, tiny_classifier

for _feature in ('nntrain.subs.lr_find', 'nntrain.summary'): importlib.import_module(_feature)   # learn.lr_find, .summary


def graphs(obj, seen=None, depth=0) -> list:
    "Tensors reachable from `obj` (attributes, containers) that hold an autograd graph."
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6: return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor): return [obj] if obj.grad_fn is not None else []
    if isinstance(obj, nn.Module): return []
    items = (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple, set)) else
             vars(obj).values() if hasattr(obj, '__dict__') and not isinstance(obj, type) else ())
    return [t for v in items for t in graphs(v, seen, depth + 1)]


def left_on(learn: Learner) -> dict:
    "What a run may have left: the learner's attribute names, its run, every run-state name, graphs held."
    return dict(attrs=sorted(vars(learn)), run=learn.run, state={n: getattr(learn, n) for n in RUN_STATE},
                graphs=len(graphs(learn)))


class Interrupt(Subscriber):
    "Asks the run to stop, as a first Ctrl-C does."
    def after_batch(self, learn):
        if learn.training and learn.iter == 1: learn.run.interrupt.requested = True


class Cancel(Subscriber):
    def after_batch(self, learn):
        if learn.training: raise CancelFitException()


class Keep(Subscriber):
    "Tries to keep per-run data on the run."
    def after_batch(self, learn): learn.run.of(self).preds = learn.preds


def runs():
    bad = lambda l: setattr(l, 'dls', DataLoaders.from_tensors(torch.randn(8, 8), torch.full((8,), 9), torch.randn(8, 8),
                                                                 torch.full((8,), 9), batch_size=4))
    def raises(f, exc):
        def go(learn):
            with pytest.raises(exc): f(learn)
        return go
    return {
        'fit': lambda l: l.fit(1, subs=[Keep()]),
        'validate': lambda l: l.validate(),
        'get_preds': lambda l: l.get_preds(with_loss=True),
        'infer': lambda l: l.infer(torch.randn(2, 8)),
        'tta': lambda l: l.tta(transform=lambda x: -x),
        'lr_find': lambda l: l.lr_find(num_it=4, show_plot=False),
        'summary': lambda l: l.summary(),
        'cancelled': lambda l: l.fit(2, subs=[Cancel()]),
        'error': raises(lambda l: l.fit(1, subs=[failing('after_loss', 1)]), RuntimeError),
        'ctrl_c': raises(lambda l: l.fit(2, subs=[Interrupt()]), KeyboardInterrupt),
        'refused data': raises(lambda l: (bad(l), l.fit(1)), ValueError),
        'refused args': raises(lambda l: l.fit(1, subs=[print]), TypeError),
        'nested': raises(lambda l: l.fit(1, subs=[type('N', (Subscriber,), {'after_batch': lambda s, l: l.validate()})()]),
                         RuntimeError),
    }


@pytest.mark.parametrize('name', sorted(runs()))
def test_nothing_of_a_run_is_left_on_the_learner(name):
    learn = tiny_classifier()
    learn.fit(1)   # the optimizer exists: later runs must not add attributes either
    before = left_on(learn)
    runs()[name](learn)
    gc.collect()
    after = left_on(learn)
    assert after['attrs'] == before['attrs']
    assert after['run'] is None and all(v is None for v in after['state'].values()), after['state']
    assert after['graphs'] == 0
    assert learn.subs == []


def test_run_state_reads_the_run_and_refuses_writes_between_runs():
    learn = tiny_classifier()
    seen = []

    class Look(Subscriber):
        def after_loss(self, learn):
            seen.append((learn.run_kind, learn.epoch, learn.training, learn.iter, learn.loss is learn.run.loss))
    learn.fit(1, subs=[Look()])
    assert seen[0] == ('fit', 0, True, 0, True) and seen[-1][:3] == ('fit', 0, False)
    with pytest.raises(AttributeError, match='learn.batch belongs to a run, and no run is in progress'):
        learn.batch = (torch.zeros(1), torch.zeros(1))


def test_per_run_records_start_empty():
    learn, sub = tiny_classifier(), Keep()
    records = []

    class Check(Subscriber):
        def before_fit(self, learn): records.append(vars(learn.run.of(sub)).copy())
    learn.fit(1, subs=[sub, Check()])
    learn.fit(1, subs=[sub, Check()])
    assert records == [{}, {}]


def test_batch_inputs_and_targets_agree():
    run = Run('fit', [])
    run.batch = {'ids': torch.ones(2, 3), 'labels': torch.zeros(2)}
    run.yb = (torch.ones(2),)
    assert torch.equal(run.batch['labels'], torch.ones(2)) and list(run.xb[0]) == ['ids']
    run.batch = (torch.zeros(2, 3), torch.ones(2))
    assert torch.equal(run.yb[0], torch.ones(2))


def test_validation_rows_do_not_enter_history_and_fit_rows_do():
    learn = tiny_classifier()
    row = learn.validate()
    assert set(row) == {'epoch', 'phase', 'loss', 'time'} and learn.history == []
    learn.fit(2)
    assert [(r['epoch'], r['phase']) for r in learn.history] == [(0, 'train'), (0, 'valid'), (1, 'train'),
                                                                (1, 'valid')]
    x, y = learn.dls.valid.tensors
    with torch.no_grad(): expected = F.cross_entropy(learn.model.eval()(x), y).item()
    assert learn.validate()['loss'] == pytest.approx(expected, rel=1e-5) and len(learn.history) == 4


def test_a_kept_traceback_holds_no_batch_or_graph():
    import weakref
    refs = []

    class Boom(Subscriber):
        def after_loss(self, learn):
            refs.extend([weakref.ref(learn.xb[0]), weakref.ref(learn.loss)])
            raise RuntimeError('boom')
    learn = tiny_classifier()
    try: learn.fit(1, subs=[Boom()])
    except RuntimeError as e: kept = e   # as a notebook keeps sys.last_traceback
    gc.collect()
    assert kept.__traceback__ is not None and all(r() is None for r in refs)
    tb, frames = kept.__traceback__, {}
    while tb is not None: frames[tb.tb_frame.f_code.co_name] = tb.tb_frame.f_locals; tb = tb.tb_next
    assert frames['fit']['n_epochs'] == 1   # the frames keep their locals: the traceback stays readable


def test_validate_leaves_the_random_generators_as_they_were():
    class Noisy(nn.Module):
        "Samples while evaluated (as a generative model does)."
        def __init__(self): super().__init__(); self.lin = nn.Linear(8, 3)
        def forward(self, x): return self.lin(x + torch.randn_like(x))
    def fitted(validate_first: bool):
        torch.manual_seed(0)
        learn = tiny_classifier()
        learn.model = Noisy()
        if validate_first: a, b = learn.validate(), learn.validate()
        else: a = b = None
        learn.fit(1)
        return learn, a, b
    plain, _, _ = fitted(False)
    learn, a, b = fitted(True)
    assert a['loss'] == b['loss']                                              # the same numbers drawn each time
    assert [r['loss'] for r in learn.history] == [r['loss'] for r in plain.history]   # the fit is unchanged


@pytest.mark.parametrize('at', [2, 3, 4])   # mid training pass, at its end, mid the next epoch
def test_a_resumed_phase_row_covers_the_whole_phase_exactly(tmp_path, at):
    from torcheval.metrics import MulticlassAccuracy
    from nntrain.subs.metrics import MetricsS
    rows = lambda learn: [{k: v for k, v in r.items() if k != 'time'} for r in learn.history]
    make = lambda: tiny_classifier(subs=[MetricsS(acc=MulticlassAccuracy())])
    torch.manual_seed(0)
    full = make()
    full.fit(3)

    class SaveStop(Subscriber):
        def after_batch(self, learn):
            if learn.training and learn.global_step == at:
                learn.save(tmp_path / 'mid.pt')
                raise CancelFitException()
    torch.manual_seed(0)
    make().fit(3, subs=[SaveStop()])
    resumed = make().load(tmp_path / 'mid.pt')
    resumed.fit(3, resume=True)
    assert rows(resumed) == rows(full)   # bit for bit: loss and accuracy over every batch of every phase
