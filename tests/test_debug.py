"Instruments: TraceS (who changed what), SyncAuditS (host syncs by place), DebugS (nntrain.subs.debug)."
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.core import Order, Subscriber
from nntrain.learner import Learner
from nntrain.subs.augment import MixUpS
from nntrain.subs.device import DeviceS
from nntrain.subs.metrics import MetricsS
from nntrain.subs.normalize import NormalizationS
from nntrain.subs.precision import MixedPrecisionS
from nntrain.subs.progress import ProgressS
from nntrain.subs.schedule import SchedulerS
from nntrain.subs.training import TerminateOnNaNS
from nntrain.subs.debug import DebugS, SyncAuditS, TraceS, summarize
from nntrain.testing import failing, synth_learner, tiny_classifier
from tests.contract import check_contract
from tests.registry import REGISTRY, params

TENSOR_METHODS = ('item', 'tolist', 'cpu', 'numpy', 'to', '__bool__', '__float__', '__int__', '__repr__', '__format__',
                  '__getitem__', 'nonzero')


def list_learner(subs=(), n_train=3, n_valid=2):
    "A classifier on lists of batches (not an in-memory TensorLoader): the first-batch label check reads the batch."
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 2, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n_train)]
    torch.manual_seed(0)
    return Learner(nn.Linear(2, 3), (batches, batches[:n_valid]), F.cross_entropy, subs=subs)


class Caller(Subscriber):
    "Remembers which function called its `before_batch`."
    def before_batch(self, learn): self.caller = sys._getframe(1).f_code.co_name


# -- TraceS ----------------------------------------------------------------------------------------------------
def test_trace_attributes_normalization_of_batch0_at_before_batch():
    trace = TraceS()
    mean, std = 0.5, 2.
    learn = tiny_classifier(subs=[NormalizationS(mean, std), trace])
    learn.fit(1)
    changes = trace.find('batch[0]', 'before_batch', 'NormalizationS')
    assert [(c.phase, c.batch) for c in changes] == [('train', 0), ('train', 1), ('valid', 0), ('valid', 1)]
    assert all(c.kind == 'replaced' for c in changes)
    assert trace.find('batch', owner='NormalizationS') == changes   # the targets are left alone
    assert not trace.find('batch', 'before_batch', 'TraceS')
    c = changes[0]
    assert c.before['shape'] == c.after['shape'] == (16, 8) and c.after['dtype'] == 'float32'
    before_mean = float(c.before['value'].split()[1])
    after_mean = float(c.after['value'].split()[1])
    assert after_mean == pytest.approx((before_mean - mean) / std, abs=1e-3)
    assert 'NormalizationS' in trace.timeline() and 'batch[0]: mean' in trace.timeline()
    assert '| before_batch | NormalizationS |' in trace._repr_markdown_()


def test_trace_attributes_mixup_batch_and_loss():
    trace = TraceS(watch=('batch', 'loss', 'loss_func'), n_batches=1)
    learn = tiny_classifier(subs=[MixUpS(seed=0), trace])
    plain = learn.loss_func
    learn.fit(1)
    mixed = trace.find('batch[0]', 'before_batch', 'MixUpS')
    assert [(c.phase, c.batch) for c in mixed] == [('train', 0)]   # validation batches are not mixed
    swaps = trace.find('loss_func', owner='MixUpS')
    assert [c.where for c in swaps] == ['before_fit', 'cleanup_fit']
    assert swaps[0].before['value'] == plain.__qualname__ and 'MixUpS mixing' in swaps[0].after['value']
    losses = trace.find('loss', 'get_loss')
    assert [(c.owner, c.phase) for c in losses] == [('Learner', 'train'), ('Learner', 'valid')]
    assert learn.loss_func is plain


def test_trace_lr_changes_by_scheduler():
    trace = TraceS(watch=('lr',), n_batches=2)
    sched = SchedulerS(partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda i: 0.5 ** i))
    synth_learner(subs=[sched, trace], lr=0.1).fit(1)
    steps = trace.find('lr', 'after_step')
    assert [(c.owner, c.batch) for c in steps] == [('SchedulerS', 0), ('SchedulerS', 1)]   # then it stops tracing
    assert [(c.before['value'], c.after['value']) for c in steps] == [('[0.1]', '[0.05]'), ('[0.05]', '[0.025]')]


def test_trace_sees_in_place_changes():
    class Doubler(Subscriber):
        def before_batch(self, learn): learn.batch[0].mul_(2)
    trace = TraceS(watch=('batch',), n_batches=1)
    synth_learner(subs=[Doubler(), trace]).fit(1)
    c = trace.find('batch[0]', owner='Doubler')[0]
    assert c.kind == 'in place'
    assert float(c.after['value'].split()[1]) == pytest.approx(2 * float(c.before['value'].split()[1]), rel=1e-3)


def test_trace_costs_nothing_when_not_attached_and_short_circuits_after_n_batches(monkeypatch):
    rec = Caller()
    learn = tiny_classifier(subs=[rec])
    learn.fit(1, n_batches=1)
    assert rec.caller == 'publish'           # the learner calls the handler itself: no wrapper
    trace = TraceS(n_batches=1)
    learn.add_subs(trace)
    learn.fit(1, n_batches=1)
    assert rec.caller == 'traced'
    learn.remove_subs(trace)
    learn.fit(1, n_batches=1)
    assert rec.caller == 'publish'
    calls = []
    snapshot = TraceS._snapshot
    monkeypatch.setattr(TraceS, '_snapshot', lambda self, learn: calls.append(learn.iter) or snapshot(self, learn))
    tiny_classifier(subs=[TraceS(n_batches=1), Caller()]).fit(2)
    n_first = len(calls)
    assert calls and set(calls) == {0}       # only the first batch of each phase (and epoch-level events, iter 0)
    calls.clear()
    tiny_classifier(subs=[TraceS(n_batches=0), Caller()]).fit(1)
    assert len(calls) < n_first               # fit- and epoch-level events only


def test_trace_argument_errors():
    with pytest.raises(ValueError, match='watch'): TraceS(watch=('batch', ''))
    with pytest.raises(ValueError, match='n_batches'): TraceS(n_batches=-1)
    with pytest.raises(ValueError, match='runs'): TraceS(runs=('fitt',))


def test_summarize_nested_and_scalars():
    assert summarize(torch.tensor(1.5))['value'] == '1.5'
    assert summarize([0.1, 0.01])['value'] == '[0.1, 0.01]'
    assert summarize(torch.tensor([3, 1, 2]))['value'] == 'min 1 max 3'


# -- SyncAuditS ------------------------------------------------------------------------------------------------
class LossLogger(Subscriber):
    "Reads the loss every batch: one host sync per batch."
    order = Order.LOG
    def __init__(self): self.losses = []
    def after_batch(self, learn): self.losses.append(learn.loss.item())


def test_audit_finds_and_attributes_an_injected_item():
    logger = LossLogger()
    audit = synth_learner(subs=[logger]).audit_syncs(n_epochs=2, n_batches=3)
    syncs = audit.batch_syncs()
    assert {(s.where, s.owner, s.what) for s in syncs} == {('after_batch', 'LossLogger', '.item()')}
    assert len(syncs) == audit.batches['train'] + audit.batches['valid'] == len(logger.losses) == 8   # 2 x (3 + 1)
    assert all(s.site.startswith('tests/test_debug.py:') and 'learn.loss.item()' in s.code for s in syncs)
    (row,) = audit.table()
    assert (audit.per_batch(row, 'train'), audit.per_batch(row, 'valid')) == (1., 1.)
    assert 'LossLogger' in audit.report() and 'LossLogger' in audit._repr_markdown_()


def test_audit_other_sync_kinds_and_learner_steps():
    class Branchy(Subscriber):
        def after_loss(self, learn):
            if learn.loss > 100: pass                   # bool()
            learn.preds[learn.preds > 0]                # mask indexing
            f'{learn.loss:.3f}'                         # format
            learn.batch[1].cpu()                        # .cpu() of the batch, after the device mover
    class Model(nn.Linear):
        def forward(self, x):
            float(x.sum())                              # in the model: attributed to the predict step
            return super().forward(x)
    torch.manual_seed(0)
    learn = synth_learner(subs=[Branchy()])
    learn.model = Model(1, 1)
    audit = learn.audit_syncs(n_batches=2)
    got = {(s.where, s.owner, s.what) for s in audit.batch_syncs()}
    assert got == {('after_loss', 'Branchy', 'bool()'), ('after_loss', 'Branchy', 'mask indexing'),
                   ('after_loss', 'Branchy', 'format'), ('after_loss', 'Branchy', '.cpu()'),
                   ('predict', 'Learner', 'float()')}


def test_audit_host_data_is_not_counted_on_cpu():
    class HostWork(Subscriber):
        def before_batch(self, learn):
            torch.rand(2).tolist()                      # a host draw, as MixUpS makes
            torch.randperm(4).to(learn.batch[0].device).cpu()
    audit = synth_learner(subs=[DeviceS('cpu'), HostWork()]).audit_syncs(n_batches=2)
    assert audit.batch_syncs() == []


# registry entries that go together in one fit (of the two mixers, one)
TOGETHER = ('DeviceS', 'NormalizationS', 'MetricsS', 'CutMixS', 'GradAccumS', 'EMAS', 'ChannelsLastS', 'GradClipS',
            'MixedPrecisionS')


@pytest.mark.parametrize('name', params('nosync'))
def test_registered_subscribers_make_no_per_batch_syncs(name, tmp_path, monkeypatch):
    "SyncAuditS sees no per-batch sync from the registry's entries that do not say why they sync (as the guard does)."
    monkeypatch.chdir(tmp_path)
    e = REGISTRY[name]
    audit = e.learner().audit_syncs(n_epochs=2, n_batches=None, subs=[e.factory()])
    assert audit.batches == {'train': 6, 'valid': 4}
    syncs = [s for s in audit.batch_syncs() if (s.epoch, s.batch) != (0, 0)]   # as the guard: each phase's first
    if e.allow: syncs = [s for s in syncs if s.batch != 0]   # what an entry allows: on the CPU, or once per epoch
    assert syncs == [], audit.report()


def test_standard_subscribers_together_and_the_documented_syncs():
    subs = [REGISTRY[n].factory() for n in TOGETHER] + [TerminateOnNaNS(check_every=2)]
    audit = tiny_classifier(images=True, subs=subs).audit_syncs(n_epochs=2, n_batches=None)
    syncs = audit.batch_syncs()
    assert {(s.where, s.owner, s.what) for s in syncs} == {('after_backward', 'TerminateOnNaNS', 'bool()')}
    assert len(syncs) == 3    # one per checked training batch: 6 batches, every second one checked
    other = [(s.where, s.owner, s.level) for s in audit.syncs if s.level != 'batch']
    assert other == [('(loop: _end_phase)', 'Learner', 'epoch')] * 4   # one read per phase: the loss of its row


def test_fp16_gradient_scaler_syncs_twice_per_step():
    audit = tiny_classifier(subs=[MixedPrecisionS('fp16')]).audit_syncs(n_batches=None)
    syncs = audit.batch_syncs()
    assert {(s.where, s.owner, s.what, s.phase) for s in syncs} == {('step', 'MixedPrecisionS', '.item()', 'train')}
    assert len(syncs) == 2 * audit.batches['train']   # the scaler's inf check, then reading the scale
    assert {s.site.split(':')[0] for s in syncs} == {'nntrain/subs/precision.py'}


def test_progress_reads_the_loss_at_most_once_per_half_second():
    audit = tiny_classifier(subs=[ProgressS()]).audit_syncs(n_epochs=2, n_batches=None)
    syncs = audit.batch_syncs()
    assert {(s.where, s.owner, s.what) for s in syncs} <= {('after_batch', 'ProgressS', '.item()')}
    assert 1 <= len(syncs) < audit.batches['train'] + audit.batches['valid']


def test_first_batch_checks_are_listed_apart():
    audit = list_learner().audit_syncs(n_epochs=2)
    assert audit.batch_syncs() == []
    checks = [s for s in audit.syncs if s.check]
    assert checks and all(s.owner == 'Learner' and s.where.startswith('(loop: ') and s.batch == 0 for s in checks)
    assert {s.phase for s in checks} == {'train', 'valid'}
    assert {s.epoch for s in checks} == {0}      # first batch of each phase of the fit only
    assert 'First-batch checks' in audit.report()


def test_torch_is_left_as_it_was_after_a_fit_and_after_an_error():
    before = {m: torch.Tensor.__dict__.get(m) for m in TENSOR_METHODS}
    audit = SyncAuditS()
    learn = list_learner(subs=[audit])
    learn.fit(1)
    assert torch._C._len_torch_function_stack() == 0
    assert {m: torch.Tensor.__dict__.get(m) for m in TENSOR_METHODS} == before
    n = len(audit.syncs)
    assert learn.loss is None                    # the run, with its batch and loss, is gone
    learn.model(torch.ones(2, 2)).sum().item()
    assert len(audit.syncs) == n                 # no longer counting
    with pytest.raises(RuntimeError, match='injected failure'): learn.fit(1, subs=[failing('after_batch', 1)])
    assert torch._C._len_torch_function_stack() == 0
    assert {m: torch.Tensor.__dict__.get(m) for m in TENSOR_METHODS} == before
    assert audit.batches['train'] == 2           # it audited the failed fit up to the error
    learn.remove_subs(audit)
    learn.get_preds()                             # other kinds of run are not audited
    assert torch._C._len_torch_function_stack() == 0


def test_audit_syncs_keeps_other_subs_and_validates():
    logger = LossLogger()
    audit = synth_learner().audit_syncs(n_batches=1, subs=[logger])
    assert len(logger.losses) == 2 and len(audit.batch_syncs()) == 2
    with pytest.raises(TypeError, match='cuda_debug'): SyncAuditS(cuda_debug='yes')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_audit_on_cuda_counts_device_syncs_and_restores_debug_mode():
    mode = torch.cuda.get_sync_debug_mode()
    learn = tiny_classifier(subs=[DeviceS('cuda'), MetricsS(), LossLogger()])
    with pytest.warns(UserWarning):
        audit = learn.audit_syncs(n_batches=2, cuda_debug=True)
    assert torch.cuda.get_sync_debug_mode() == mode
    assert {(s.where, s.owner) for s in audit.batch_syncs()} == {('after_batch', 'LossLogger')}


# -- DebugS ----------------------------------------------------------------------------------------------------
def test_debug_did_you_mean_and_errors():
    with pytest.raises(ValueError, match="Did you mean 'before_batch'"): DebugS('before_bacth')
    with pytest.raises(ValueError, match='not an event'): DebugS('predict')
    with pytest.raises(TypeError, match='when must be callable'): DebugS('after_loss', f=print, when=1)


def test_debug_calls_f_at_the_event_when_asked():
    seen = []
    dbg = DebugS('after_backward', f=lambda learn: seen.append((learn.epoch, learn.iter)),
                 when=lambda learn: learn.iter % 2 == 0)
    synth_learner(subs=[dbg]).fit(2)
    assert dbg.n_calls == len(seen) == 4 and seen == [(0, 0), (0, 2), (1, 0), (1, 2)]
    every = DebugS('before_epoch', f=lambda learn: None)
    synth_learner(subs=[every]).fit(3, valid=False)
    assert every.n_calls == 3


def test_debug_defaults_to_the_debugger(monkeypatch):
    hits = []
    monkeypatch.setattr(sys, 'breakpointhook', lambda *a, **k: hits.append(1))
    synth_learner(subs=[DebugS('after_fit')]).fit(1)
    assert hits == [1]


def test_trace_and_audit_together_the_trace_reads_are_not_counted():
    trace, audit = TraceS(), SyncAuditS()
    synth_learner(subs=[DeviceS('cpu'), trace, audit]).fit(1, n_batches=2)
    assert trace.find('batch[0]') == [] and trace.find('preds') and audit.batch_syncs() == []


# -- the subscriber contract (tests/test_contract.py runs it for all three) --------------------------------------

def test_audit_leaves_no_torch_function_mode_after_the_contract():
    check_contract(SyncAuditS)
    assert torch._C._len_torch_function_stack() == 0
