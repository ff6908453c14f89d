"The Learner's contract: event order, cancellation, cleanup after errors, input checks, optimizer lifetime."
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.core import (EVENTS, CancelBatchException, CancelEpochException, CancelFitException,
                          CancelStepException, Subscriber)
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.subs.metrics import MetricsS
from nntrain.testing import Recorder, synth_dls, synth_learner, tiny_classifier


def raiser(event, exc, when=lambda learn: True, order=-1):
    "A subscriber raising `exc` at `event` whenever `when(learn)`."
    def handler(self, learn):
        if when(learn): raise exc()
    return type(f'Raise_{event}', (Subscriber,), {'order': order, event: handler})()


def two_by_two(*subs):
    "A regression learner with exactly 2 train and 2 valid batches."
    return synth_learner(subs, n_train=8, n_valid=16, batch_size=4)   # valid batches are twice as large


TRAIN = ['before_batch', 'after_predict', 'after_loss', 'after_backward', 'after_step', 'after_batch', 'cleanup_batch']
VALID = ['before_batch', 'after_predict', 'after_loss', 'after_batch', 'cleanup_batch']
epoch = lambda batches: ['before_epoch', *batches, 'after_epoch', 'cleanup_epoch']


def test_full_event_sequence():
    rec = Recorder()
    two_by_two(rec).fit(1)
    assert rec.seen == ['before_fit', *epoch(TRAIN * 2), *epoch(VALID * 2), 'after_fit', 'cleanup_fit']


def test_train_only_and_valid_only():
    rec = Recorder()
    learn = two_by_two(rec)
    learn.fit(1, valid=False)
    assert rec.seen == ['before_fit', *epoch(TRAIN * 2), 'after_fit', 'cleanup_fit']
    rec.seen.clear()
    learn.fit(1, train=False)
    assert rec.seen == ['before_fit', *epoch(VALID * 2), 'after_fit', 'cleanup_fit']


@pytest.mark.parametrize('exc, event, skipped, expected_steps', [
    (CancelFitException, 'after_step', 'after_fit', 1),
    (CancelEpochException, 'after_step', None, 2),      # each train pass stops after its first step
    (CancelBatchException, 'after_predict', 'after_batch', 0),
])
def test_cancel_skips_after_but_runs_cleanup(exc, event, skipped, expected_steps):
    rec = Recorder()
    learn = two_by_two(raiser(event, exc), rec)
    learn.fit(2)
    if skipped: assert skipped not in rec.seen
    assert rec.seen[-1] == 'cleanup_fit'
    assert learn.global_step == expected_steps
    if exc is CancelFitException: assert rec.seen.count('cleanup_epoch') == 1 and rec.seen.count('cleanup_batch') == 1
    if exc is CancelEpochException:   # train passes are cut short; validation passes (no steps) complete
        assert rec.seen.count('cleanup_epoch') == 4 and rec.seen.count('after_epoch') == 2 and 'after_fit' in rec.seen


def test_cancel_step_keeps_gradients_and_runs_after_batch():
    rec = Recorder()
    learn = two_by_two(raiser('after_backward', CancelStepException), rec)
    w = learn.model.weight.detach().clone()
    learn.fit(1, valid=False)
    assert torch.equal(learn.model.weight, w) and learn.global_step == 0
    assert rec.seen.count('after_batch') == 2 and 'after_step' not in rec.seen
    assert learn.model.weight.grad is not None and learn.model.weight.grad.abs().sum() > 0   # accumulated, not zeroed


EVENTS_TO_FAIL = [e for e in EVENTS if not e.startswith('cleanup')] + ['cleanup_batch', 'cleanup_epoch']


@pytest.mark.parametrize('event', EVENTS_TO_FAIL)
def test_error_in_any_event_runs_every_cleanup_and_restores_state(event):
    rec = Recorder()
    learn = two_by_two(raiser(event, lambda: RuntimeError(f'at {event}')), rec)
    learn.model.eval()
    with pytest.raises(RuntimeError, match=f'at {event}') as info:
        learn.fit(1)
    assert f'nntrain: raised in Raise_{event}.{event}' in info.value.__notes__
    assert rec.seen[-1] == 'cleanup_fit' and 'after_fit' not in rec.seen
    if event not in ('before_fit', 'after_fit', 'cleanup_epoch'):
        assert 'cleanup_batch' in rec.seen or event == 'before_epoch'
    assert learn.model.training is False and torch.is_grad_enabled()
    assert learn.preds is None and learn.loss is None
    learn.remove_subs(*[s for s in learn.subs if type(s).__name__.startswith('Raise_')])
    learn.fit(1)   # usable again


def test_cleanup_failures_are_isolated_and_noted():
    class BadCleanup(Subscriber):
        order = -5
        def cleanup_fit(self, learn): raise ValueError('cleanup broke')
    rec = Recorder()
    learn = two_by_two(BadCleanup(), raiser('after_loss', lambda: RuntimeError('original')), rec)
    with pytest.raises(RuntimeError, match='original') as info:
        learn.fit(1)
    assert rec.seen[-1] == 'cleanup_fit'                     # the recorder's cleanup still ran
    assert any('cleanup broke' in n for n in info.value.__notes__)


def test_keyboard_interrupt_is_a_clean_stop():
    press = lambda: KeyboardInterrupt('pressed in batch 1')
    learn = two_by_two(raiser('after_loss', press, when=lambda l: l.iter == 1))
    with pytest.raises(KeyboardInterrupt, match='pressed in batch 1'):
        learn.fit(1)
    assert learn.batch is None and learn.preds is None and learn.loss is None
    assert all(p.grad is None for p in learn.model.parameters())   # no half-made gradients leak into the next step
    learn.remove_subs(*learn.subs)
    learn.fit(1)
    assert learn.global_step == 1 + 2


def test_temporary_subs_are_removed_even_after_errors():
    learn = two_by_two()
    rec = Recorder()
    learn.fit(1, subs=[rec])
    assert learn.subs == [] and rec.seen
    with pytest.raises(RuntimeError, match='raised in before_fit'):
        learn.fit(1, subs=[raiser('before_fit', lambda: RuntimeError('raised in before_fit'))])
    assert learn.subs == []


def test_subscriber_order_and_duplicates():
    calls = []
    make = lambda name, order: type(name, (Subscriber,), {'order': order,
                                                          'before_fit': lambda self, learn: calls.append(name)})()
    learn = two_by_two(make('late', 10), make('early', -10), make('mid', 0))
    learn.fit(1)
    assert calls == ['early', 'mid', 'late']
    with pytest.raises(ValueError, match='already subscribed'):
        learn.add_subs(learn.subs[0])


def test_unknown_event_like_method_is_rejected_with_suggestion():
    class Typo(Subscriber):
        def before_epcoh(self, learn): pass
    with pytest.raises(ValueError, match="Did you mean 'before_epoch'"):
        two_by_two(Typo())
    with pytest.raises(ValueError, match='unknown event'):
        two_by_two().publish('after_everything')


def test_two_step_providers_conflict():
    class A(Subscriber):
        def backward(self, learn): learn.loss.backward()
    class B(Subscriber):
        def backward(self, learn): learn.loss.backward()
    with pytest.raises(ValueError, match='both A and B provide'):
        two_by_two(A(), B())


def test_step_provider_replaces_learner_step():
    class Half(Subscriber):
        def backward(self, learn): (learn.loss * 0.5).backward()
    learn = two_by_two(Half())
    loop = learn.show_training_loop()
    assert 'backward()      Half' in repr(loop).splitlines() and '| `backward()` | Half |' in loop._repr_markdown_()
    learn.fit(1)
    assert learn.global_step == 2


def test_loss_goes_down_and_counters():
    torch.manual_seed(0)
    learn = Learner(nn.Linear(1, 1), synth_dls(n_train=64, batch_size=16), F.mse_loss, torch.optim.SGD, lr=0.1)
    pcts = []
    end = {}
    learn.add_subs(type('P', (Subscriber,), {'runs': ('fit',),
        'before_batch': lambda s, l: l.training and pcts.append(l.pct_train),
        'after_fit': lambda s, l: end.update(pct=l.pct_train, epoch=l.epoch)})())
    start = learn.validate()['loss']
    learn.fit(3)
    assert learn.validate()['loss'] < start / 20     # validate() leaves the fit's counters alone
    assert pcts == pytest.approx([i / 12 for i in range(12)])
    assert end == {'pct': 1.0, 'epoch': 2} and learn.global_step == 12
    assert learn.run is None and learn.pct_train is None and learn.epoch is None   # the run is over


def test_optimizer_kept_across_fits_and_lr_override():
    learn = two_by_two()
    learn.opt_func = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)
    learn.fit(1)
    opt = learn.opt
    buf = opt.state[learn.model.weight]['momentum_buffer'].clone()
    learn.fit(1, lr=0.01)
    assert learn.opt is opt and opt.param_groups[0]['lr'] == 0.01 and learn.lr == 0.01
    assert not torch.equal(opt.state[learn.model.weight]['momentum_buffer'], buf)   # momentum carried over
    learn.fit(1, reset_opt=True)
    assert learn.opt is not opt


def test_validation_is_no_grad_and_eval():
    seen = []
    class Spy(Subscriber):
        def after_predict(self, learn): seen.append((learn.training, learn.model.training, torch.is_grad_enabled()))
    two_by_two(Spy()).fit(1)
    assert seen == [(True, True, True)] * 2 + [(False, False, False)] * 2


# -- input checks: each raises before any weight changes ------------------------------------------------------

def classifier(x, y, n_out=3):
    return Learner(nn.Linear(x.shape[1], n_out), DataLoaders.from_tensors(x, y, x, y, batch_size=4), lr=0.1)


@pytest.mark.parametrize('y, match', [
    (torch.tensor([0, 1, 2, 3] * 2), r'labels must be in \[0, 3\)'),
    (torch.tensor([0, 1, -1, 2] * 2), r'labels must be in \[0, 3\)'),
])
def test_label_range_is_checked_before_training(y, match):
    learn = classifier(torch.randn(8, 2), y)
    w = learn.model.weight.detach().clone()
    with pytest.raises(ValueError, match=match):
        learn.fit(1)
    assert torch.equal(learn.model.weight, w) and learn.global_step == 0


def test_broadcasting_shape_mismatch_is_an_error():
    x, y = torch.randn(8, 2), torch.randn(8)
    learn = Learner(nn.Linear(2, 1), DataLoaders.from_tensors(x, y, x, y, batch_size=4), F.mse_loss, lr=0.1)
    with pytest.raises(ValueError, match='differ in shape'):
        learn.fit(1)


def test_empty_loader_and_loader_without_len():
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    learn = Learner(nn.Linear(2, 3), DataLoaders([], [(x, y)]), lr=0.1)
    with pytest.raises(ValueError, match='training loader is empty'):
        learn.fit(1)
    learn = Learner(nn.Linear(2, 3), DataLoaders(iter([(x, y)]), [(x, y)]), lr=0.1)
    with pytest.raises(TypeError, match='no len'):
        learn.fit(1)


def test_batch_must_be_a_pair():
    x = torch.randn(8, 2)
    learn = Learner(nn.Linear(2, 3), DataLoaders([(x,)], [(x,)]), lr=0.1)
    with pytest.raises(TypeError, match='missing 1 required positional argument') as info:   # cross_entropy(preds)
        learn.fit(1)
    assert any('this batch has no targets' in n for n in info.value.__notes__)
    learn = Learner(nn.Linear(2, 3), DataLoaders([(x, torch.zeros(7, dtype=torch.long))], [(x, x)]), lr=0.1)
    with pytest.raises(ValueError, match='disagree on batch size'):
        learn.fit(1)


def test_get_preds_reductions_and_mode_restored():
    learn = tiny_classifier()
    learn.model.train()
    preds, targets = learn.get_preds()
    assert learn.model.training
    labels, _, losses = learn.get_preds(reduce='argmax', with_loss=True)
    assert torch.equal(labels, preds.argmax(1))
    assert losses.shape == targets.shape
    assert torch.allclose(losses.mean(), F.cross_entropy(preds, targets), atol=1e-6)
    assert learn.infer(torch.randn(5, 8)).shape == (5, 3)
    assert learn.global_step == 0


def test_first_batch_failures_say_what_went_in():
    x8 = torch.randint(0, 256, (8, 2), dtype=torch.uint8)
    learn = Learner(nn.Linear(2, 3), DataLoaders.from_tensors(x8, torch.zeros(8, dtype=torch.long), x8,
                                                               torch.zeros(8, dtype=torch.long), batch_size=4), lr=0.1)
    with pytest.raises(RuntimeError, match='dtype') as info:   # torch's own message: uint8 inputs, float weights
        learn.fit(1)
    assert any('the model failed on the first training batch' in n and 'tensor (4, 2) uint8' in n
               for n in info.value.__notes__)
    x = torch.randn(8, 2)
    learn = Learner(nn.Linear(2, 3), DataLoaders.from_tensors(x, torch.zeros(8, 3), x, torch.zeros(8, 3), batch_size=4),
                    lambda p, t: F.nll_loss(p, t), lr=0.1)   # nll_loss wants class indices, not (N, 3) floats
    with pytest.raises(RuntimeError, match='target') as info:   # torch's own message: class indices expected
        learn.fit(1)
    assert any('the loss failed' in n and 'targets: (tensor (4, 3) float32,)' in n for n in info.value.__notes__)


# -- each row's loss is the mean over items, not over batches -------------------------------------------------------

def uneven(subs=()):
    "Train batches of 16, 16 and 8 items, valid batches of 16 and 4: a mean over batches is not one over items."
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=g) * 3, torch.randint(0, 3, (60,), generator=g)
    dls = DataLoaders.from_tensors(x[:40], y[:40], x[40:], y[40:], batch_size=16, valid_batch_size=16, shuffle=False)
    torch.manual_seed(0)
    return Learner(nn.Linear(8, 3), dls, F.cross_entropy, lr=0.5, subs=subs)


class BatchLosses(Subscriber):
    "Each batch's mean loss and size, per phase."
    def __init__(self): self.seen = {True: [], False: []}
    def after_loss(self, learn): self.seen[learn.training].append((learn.loss.item(), len(learn.yb[0])))


def test_row_loss_weights_each_batch_by_its_size():
    "A per-batch weight of 1, or of the loader's batch size, gives other numbers (asserted apart below)."
    learn, spy = uneven(subs=[MetricsS()]), BatchLosses()
    learn.fit(1, subs=[spy])
    train, valid = learn.history
    losses = spy.seen[True]
    assert [n for _, n in losses] == [16, 16, 8] and [n for _, n in spy.seen[False]] == [16, 4]
    weighted = sum(l * n for l, n in losses) / 40
    assert train['loss'] == pytest.approx(weighted, rel=1e-6)
    for wrong in (sum(l for l, _ in losses) / 3, sum(l * 16 for l, _ in losses) / 48):   # weights 1, and 16 each
        assert abs(wrong - weighted) > 1e-3 * weighted
    x, y = learn.dls.valid.tensors
    with torch.no_grad(): whole = F.cross_entropy(learn.model(x), y).item()   # the model is as it was while validating
    assert valid['loss'] == pytest.approx(whole, rel=1e-6)
    assert abs(sum(l for l, _ in spy.seen[False]) / 2 - whole) > 1e-3 * whole


def test_validate_row_is_the_mean_over_every_item():
    learn = uneven()
    learn.fit(1)
    x, y = learn.dls.valid.tensors
    with torch.no_grad(): whole = F.cross_entropy(learn.model(x), y).item()
    row = learn.validate()
    assert row['phase'] == 'valid' and row['loss'] == pytest.approx(whole, rel=1e-6)
    with torch.no_grad(): per_batch = [F.cross_entropy(learn.model(x[i:i + 16]), y[i:i + 16]).item() for i in (0, 16)]
    assert abs(sum(per_batch) / 2 - whole) > 1e-3 * whole   # a mean over the 2 batches would be caught


@pytest.mark.parametrize('as_dict', [False, True])
def test_validation_labels_checked_from_a_loaders_first_batch(as_dict):
    "A validation loader that is not in memory: its first batch's labels are checked before the first step."
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.arange(16) % 3   # every batch has labels 0, 1 and 2
    class Model(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(4, 3)
        def forward(self, x): return self.lin(x)
    def batches(labels):
        return [{'x': x[i:i + 8], 'labels': labels[i:i + 8]} if as_dict else (x[i:i + 8], labels[i:i + 8])
                for i in (0, 8)]
    learn = Learner(Model(), (batches(y), batches(y + 2)), F.cross_entropy, lr=0.1)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=r'the validation set has labels in \[2, 4\]'): learn.fit(1)
    assert learn.global_step == 0 and learn.history == []
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())
    Learner(Model(), (batches(y), batches(y)), F.cross_entropy, lr=0.1).fit(1)   # in range: it trains
