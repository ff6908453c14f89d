"""Every mistake a user can make with the Learner gets a clear error before anything changes (issue 13).

Each test makes the mistake, checks the message names the problem, and then compares the learner with what it was
before (weights, optimizer state, counters, history, files on disk) bitwise.
"""
import copy
import importlib
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.core import Subscriber
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.testing import same_state, state_diffs, synth_dls, synth_learner, tiny_classifier


def state_of(learn: Learner) -> dict:
    "Everything a refusal must leave alone, copied."
    return {'weights': {k: v.clone() for k, v in learn.model.state_dict().items()},
            'opt': None if learn.opt is None else copy.deepcopy(learn.opt.state_dict()),
            'counters': (learn.global_step, learn.n_epochs, learn.epoch, learn.run_kind, learn.lr),
            'history': copy.deepcopy(learn.history), 'subs': list(learn.subs)}


def assert_same(a: dict, b: dict) -> None:
    assert same_state(a, b), state_diffs(a, b)   # weights, optimizer state, counters, history, subscribers


def trained(opt_func=torch.optim.Adam, model=None, subs=()) -> Learner:
    torch.manual_seed(0)
    learn = Learner(model or nn.Linear(1, 1), synth_dls(), F.mse_loss, opt_func, lr=0.05, subs=subs)
    learn.fit(1)
    learn.history.append({'epoch': 0, 'phase': 'valid', 'loss': 1.0})
    return learn


class Counter(Subscriber):
    "A subscriber with state worth saving."
    def __init__(self): self.n = 0
    def after_batch(self, learn): self.n += 1
    def state_dict(self): return {'n': self.n}
    def load_state_dict(self, state):
        if 'n' not in state: raise KeyError('n')
        self.n = state['n']


# -- loading ------------------------------------------------------------------------------------------------------
def test_load_of_another_architecture_changes_nothing(tmp_path):
    path = trained(model=nn.Sequential(nn.Linear(1, 4), nn.Linear(4, 1))).save(tmp_path / 'big.pt')
    learn = trained(model=nn.Sequential(nn.Linear(1, 3), nn.Linear(3, 1)))
    before = state_of(learn)
    with pytest.raises(ValueError, match=r'of another shape.*0.weight \(4, 1\) vs \(3, 1\).*Nothing was changed'):
        learn.load(path)
    assert_same(before, state_of(learn))


def test_load_with_state_for_a_missing_subscriber_changes_nothing(tmp_path):
    path = trained(subs=[Counter()]).save(tmp_path / 'with_counter.pt')
    learn = trained()
    before = state_of(learn)
    with pytest.raises(ValueError, match=r"subscribers this learner lacks: \['Counter'\]"): learn.load(path)
    assert_same(before, state_of(learn))


def test_load_of_another_optimizer_is_refused_and_weights_only_works(tmp_path):
    source = trained(torch.optim.Adam)
    path = source.save(tmp_path / 'adam.pt')
    learn = trained(torch.optim.SGD)
    before = state_of(learn)
    with pytest.raises(ValueError, match='optimizer state is from Adam, but this learner uses SGD'): learn.load(path)
    assert_same(before, state_of(learn))
    learn.load(path, with_opt=False)
    assert torch.equal(learn.model.weight, source.model.weight) and isinstance(learn.opt, torch.optim.SGD)
    learn.fit(1)   # the SGD optimizer still works: no KeyError('momentum')


def test_load_from_a_newer_format_is_refused(tmp_path):
    learn = trained()
    state = learn.state_dict()
    state['format'] = 99
    before = state_of(learn)
    with pytest.raises(ValueError, match='newer nntrain'): learn.load_state_dict(state)
    assert_same(before, state_of(learn))


def test_a_subscriber_refusing_its_state_rolls_everything_back(tmp_path):
    counter = Counter()
    learn = trained(subs=[counter])
    state = learn.state_dict()
    state['subs']['Counter'] = {'wrong': 1}
    for k in state['model']: state['model'][k] = state['model'][k] + 1   # would change the weights
    state['counters']['global_step'] = 1234
    before, n = state_of(learn), counter.n
    with pytest.raises(KeyError) as e: learn.load_state_dict(state)
    assert any('put back as it was' in n for n in e.value.__notes__)
    assert_same(before, state_of(learn))
    assert counter.n == n


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path):
    learn = trained()
    good = learn.save(tmp_path / 'good.pt')
    (tmp_path / 'truncated.pt').write_bytes(good.read_bytes()[:200])
    (tmp_path / 'text.pt').write_text('hello')
    torch.save(nn.Linear(1, 1), tmp_path / 'module.pt')   # a pickled module, not a state
    before = state_of(learn)
    for name in ('truncated.pt', 'text.pt'):
        with pytest.raises(ValueError, match='is not a readable checkpoint'): learn.load(tmp_path / name)
    with pytest.raises(ValueError, match='holds Python objects other than tensors'): learn.load(tmp_path / 'module.pt')
    with pytest.raises(FileNotFoundError, match='no checkpoint file'): learn.load(tmp_path / 'missing.pt')
    assert_same(before, state_of(learn))
    torch.save({'weight': torch.ones(1, 1), 'bias': torch.zeros(1)}, tmp_path / 'weights.pt')
    learn.load(tmp_path / 'weights.pt')   # a bare state_dict loads as weights
    assert learn.model.weight.item() == 1. and learn.global_step == before['counters'][0]


# -- arguments ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kwargs, message', [
    (dict(lr=float('nan')), 'lr must be a finite number in (0, inf), got nan'),
    (dict(lr=-1e-3), 'got -0.001'),
    (dict(lr=slice(1e-3, float('inf'))), 'must be a finite number'),
    (dict(loss_func=nn.CrossEntropyLoss), 'pass an instance, CrossEntropyLoss()'),
    (dict(loss_func='mse'), 'loss_func must be callable'),
    (dict(opt_func=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)), 'pass its class instead'),
    (dict(subs=[Counter]), 'subs[0] is the class Counter, not a subscriber: pass an instance, Counter()'),
    (dict(subs=Counter()), 'subs must be a list of subscribers'),
    (dict(model='linear'), 'model must be a torch.nn.Module'),
    (dict(dls=[1, 2, 3]), 'dls must be DataLoaders or a (train, valid) pair'),
])
def test_learner_arguments_are_checked(kwargs, message):
    args = dict(model=nn.Linear(1, 1), dls=synth_dls(), loss_func=F.mse_loss, opt_func=torch.optim.SGD, lr=0.1)
    with pytest.raises((TypeError, ValueError)) as e: Learner(**{**args, **kwargs})
    assert message in str(e.value)


@pytest.mark.parametrize('kwargs, message', [
    (dict(lr=-0.1), 'got -0.1'), (dict(lr=float('inf')), 'got inf'), (dict(n_epochs=0), 'n_epochs must be an int >= 1'),
    (dict(n_epochs=1.5), 'got 1.5'), (dict(train=False, valid=False), 'nothing to do'),
    (dict(train='yes'), 'train must be'),
    (dict(n_batches=0), 'n_batches'), (dict(subs=[Counter]), 'pass an instance'), (dict(resume=True), 'loaded with learn.load(path) first'),
])
def test_fit_arguments_are_checked_before_anything_changes(kwargs, message):
    learn = trained(torch.optim.SGD)
    before = state_of(learn)
    lrs = [g['lr'] for g in learn.opt.param_groups]
    with pytest.raises((TypeError, ValueError)) as e: learn.fit(**{'n_epochs': 1, **kwargs})
    assert message in str(e.value)
    assert_same(before, state_of(learn))
    assert [g['lr'] for g in learn.opt.param_groups] == lrs


# -- re-entrancy --------------------------------------------------------------------------------------------------
def test_a_fit_inside_a_fit_is_refused_and_the_learner_stays_usable():
    class Nested(Subscriber):
        def after_step(self, learn): learn.fit(1)
    learn = synth_learner()
    with pytest.raises(RuntimeError, match='cannot start a fit during a fit'): learn.fit(2, subs=[Nested()])
    assert learn.run_kind is None and learn.subs == [] and learn.global_step == 1
    class Search(Subscriber):
        def after_epoch(self, learn): learn.lr_find(num_it=3)
    importlib.import_module("nntrain.subs.lr_find")   # patches lr_find onto Learner
    with pytest.raises(RuntimeError, match='cannot start a learning-rate search during a fit'):
        learn.fit(1, subs=[Search()])
    learn.fit(1)
    assert learn.global_step == 1 + 4 + 4


@pytest.mark.parametrize('call', ['validate', 'get_preds', 'infer', 'tta', 'lr_find'])
def test_any_run_started_inside_a_fit_is_refused_and_leaves_the_fit_usable(call):
    "Subscribers keep per-run state (EMA parameters, a compiled model, metric buffers): runs do not nest."
    importlib.import_module('nntrain.subs.lr_find')   # patches lr_find onto Learner
    calls = {'validate': lambda l: l.validate(), 'get_preds': lambda l: l.get_preds(),
             'infer': lambda l: l.infer(torch.zeros(2, 1)), 'tta': lambda l: l.tta(transform=lambda x: x),
             'lr_find': lambda l: l.lr_find(num_it=3)}
    class Inside(Subscriber):
        def after_step(self, learn): calls[call](learn)
    learn, handler = synth_learner(), signal.getsignal(signal.SIGINT)
    before = state_of(learn)
    with pytest.raises(RuntimeError, match='cannot start a .* during a fit'): learn.fit(1, subs=[Inside()])
    assert learn.run_kind is None and learn.subs == [] and signal.getsignal(signal.SIGINT) is handler
    assert learn.global_step == 1 and before['counters'][0] == 0
    learn.fit(1)
    assert learn.global_step == 5


# -- first-batch checks -------------------------------------------------------------------------------------------
def test_bad_validation_labels_are_found_before_the_first_step():
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    for valid in (DataLoaders.from_tensors(x, y, x, y + 1, batch_size=8).valid,   # in memory: all labels checked
                  [(x[:8], y[:8] + 5)]):                                           # any loader: its first batch
        learn = Learner(nn.Linear(4, 3), (DataLoaders.from_tensors(x, y, x, y, batch_size=8).train, valid), lr=0.1)
        before = state_of(learn)
        with pytest.raises(ValueError, match='labels must be in \\[0, 3\\).*labels in'): learn.fit(1)
        assert_same(before, state_of(learn))


def test_a_loss_per_item_is_refused_in_both_phases():
    per_item = lambda p, t: F.cross_entropy(p, t, reduction='none')
    learn = tiny_classifier()
    learn.loss_func = per_item
    before = state_of(learn)
    with pytest.raises(ValueError, match='not one number'): learn.validate()
    with pytest.raises(ValueError, match='not one number'): learn.fit(1)
    assert_same(before, state_of(learn))


def test_a_missing_validation_loader_is_named():
    learn = Learner(nn.Linear(1, 1), (synth_dls().train, None), F.mse_loss)
    with pytest.raises(ValueError, match='no validation loader'): learn.fit(1)
    learn.fit(1, valid=False)



def test_a_refused_fit_leaves_learning_rates_and_a_loaded_resume_as_they_were(tmp_path):
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    learn = Learner(nn.Linear(4, 3), DataLoaders.from_tensors(x, y, x, y, batch_size=8), lr=0.1)
    learn.fit(1)
    path = learn.save(tmp_path / 'run.pt')
    learn.dls = DataLoaders.from_tensors(x, y + 5, x, y, batch_size=8)   # labels the model cannot predict
    with pytest.raises(ValueError, match='labels must be in'): learn.fit(1, lr=0.5)
    assert learn.lr == 0.1 and [g['lr'] for g in learn.opt.param_groups] == [0.1]
    learn.dls = DataLoaders.from_tensors(x, y, x, y, batch_size=8)
    learn.load(path)
    with pytest.raises(TypeError, match='pass an instance'): learn.fit(1, resume=True, subs=[Counter])
    with pytest.raises(ValueError, match='resume it with fit\\(1, resume=True\\)'): learn.fit(3, resume=True)
    learn.fit(1, resume=True)   # the loaded state was kept through both refusals
    assert learn.global_step == 4
    learn.fit(2)                # and a plain fit afterwards starts at epoch 0
    assert learn.global_step == 4 + 8


def test_checkpoints_of_a_compiled_model_have_plain_keys_and_load(tmp_path):
    from nntrain.subs.precision import CompileS
    learn = tiny_classifier(subs=[CompileS(backend='eager')])
    learn.fit(1)
    path = learn.save(tmp_path / 'c.pt')
    assert not any(k.startswith('_orig_mod') for k in torch.load(path, weights_only=True)['model'])
    tiny_classifier(subs=[CompileS(backend='eager')]).load(path)
    tiny_classifier().load(path)


def test_measuring_normalization_statistics_does_not_change_the_training_order():
    "NormalizationS reads training batches in any kind of run: a validate() before the fit must not shift its data."
    from nntrain.subs.normalize import NormalizationS
    def run(validate_first):
        torch.manual_seed(0)
        learn = tiny_classifier(subs=[NormalizationS()])
        if validate_first: learn.validate()
        learn.fit(1)
        return learn.model[0].weight.detach().clone()
    assert torch.equal(run(False), run(True))


def test_a_refused_fit_leaves_an_old_csv_log_and_a_resumed_log_holds_every_row(tmp_path):
    from nntrain.subs.metrics import MetricsS
    from nntrain.subs.tracking import CSVLoggerS
    log = tmp_path / 'log.csv'
    log.write_text('epoch,phase,loss\n0,valid,1.0\n')   # another run's log (issue 18: never replaced, only appended to)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    bad = Learner(nn.Linear(4, 3), DataLoaders.from_tensors(x, y + 5, x, y, batch_size=8), lr=0.1,
                  subs=[MetricsS(), CSVLoggerS(log, append=True)])
    with pytest.raises(ValueError, match='labels must be in'): bad.fit(1)
    assert log.read_text() == 'epoch,phase,loss\n0,valid,1.0\n'
    fresh = Learner(nn.Linear(4, 3), DataLoaders.from_tensors(x, y, x, y, batch_size=8), lr=0.1,
                    subs=[MetricsS(), CSVLoggerS(log)])
    with pytest.raises(FileExistsError, match='pass append=True'): fresh.fit(1)
    assert log.read_text() == 'epoch,phase,loss\n0,valid,1.0\n'
    learn = Learner(nn.Linear(4, 3), DataLoaders.from_tensors(x, y, x, y, batch_size=8), lr=0.1,
                    subs=[MetricsS(), CSVLoggerS(log, append=True)])
    learn.fit(1)
    path = learn.save(tmp_path / 'ck.pt')
    resumed = Learner(nn.Linear(4, 3), DataLoaders.from_tensors(x, y, x, y, batch_size=8), lr=0.1,
                      subs=[MetricsS(), CSVLoggerS(log, append=True)])
    resumed.load(path)
    resumed.fit(2)
    lines = log.read_text().splitlines()   # header, the other run's row, then every row of this run: none lost or twice
    assert len(lines) == 1 + 1 + 6 and lines[1].startswith(',0,valid,1.0')


def test_early_stopping_with_restore_best_resumes_to_the_same_weights(tmp_path):
    from nntrain.subs.metrics import MetricsS
    from nntrain.subs.tracking import EarlyStoppingS
    class Worse(Subscriber):   # makes the valid loss worse after epoch 0, so the best weights stay those of epoch 0
        order = 81
        def after_epoch(self, learn):
            if not learn.training and learn.epoch > 0: learn.history[-1]['loss'] += 10
    def make():
        torch.manual_seed(0)
        return tiny_classifier(subs=[MetricsS(), Worse(), EarlyStoppingS(patience=5, restore_best=True)])
    straight = make()
    straight.fit(3)
    first = make()
    with pytest.raises(RuntimeError, match='crash'): first.fit(3, subs=[_StopAfterEpoch(1)])
    path = first.save(tmp_path / 'mid.pt')
    resumed = make()
    resumed.load(path)
    resumed.fit(3, resume=True)
    assert torch.equal(resumed.model[0].weight, straight.model[0].weight)


class _StopAfterEpoch(Subscriber):
    "Interrupt a fit once epoch `n` is over (as a crash would, leaving a checkpoint-able state)."
    order = 99
    def __init__(self, n): self.n = n
    def after_epoch(self, learn):
        if not learn.training and learn.epoch == self.n: raise RuntimeError('crash')


def test_fit_one_cycle_resumes_exactly(tmp_path):
    importlib.import_module('nntrain.subs.schedule')   # patches fit_one_cycle onto Learner
    def make():
        torch.manual_seed(0)
        return tiny_classifier()
    straight = make()
    straight.fit_one_cycle(3, 0.1)
    first = make()
    with pytest.raises(RuntimeError, match='crash'): first.fit_one_cycle(3, 0.1, subs=[_StopAfterEpoch(0)])
    path = first.save(tmp_path / 'mid.pt')
    resumed = make()
    resumed.load(path)
    resumed.fit_one_cycle(3, 0.1, resume=True)
    pairs = zip(resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_fit_one_cycle_auto_resumes_exactly(tmp_path):
    "`fit_one_cycle(resume='auto')` after a crash between step checkpoints ends with the uninterrupted fit's weights."
    from nntrain.subs.checkpoint import CheckpointS
    importlib.import_module('nntrain.subs.schedule')
    def make(folder, seed=0):
        torch.manual_seed(seed)
        learn = tiny_classifier()
        learn.add_subs(CheckpointS(folder, every=3))
        return learn
    straight = make(tmp_path / 'straight')
    straight.fit_one_cycle(3, 0.1)
    first = make(tmp_path / 'crashed')
    with pytest.raises(RuntimeError, match='crash'): first.fit_one_cycle(3, 0.1, subs=[_StopAfterEpoch(1)])
    resumed = make(tmp_path / 'crashed', seed=1)   # other weights and RNG: only the checkpoint makes it agree
    with pytest.warns(RuntimeWarning, match='_StopAfterEpoch'):   # the crash's subscriber is not in the resumed fit
        resumed.fit_one_cycle(3, 0.1, resume='auto')
    assert resumed.run_id == first.run_id and resumed.global_step == straight.global_step
    pairs = zip(resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
