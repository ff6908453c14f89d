"""Every public argument of every shipped subscriber is checked when it is given, with an error naming the argument and
the value; subscribers that cannot work (a folder that cannot be written) refuse at `before_fit`, changing nothing."""
import math

import pytest
import torch
from torcheval.metrics import MulticlassAccuracy

from nntrain.core import set_seed
from nntrain.subs.augment import AugmentS, CutMixS, MixUpS
from nntrain.subs.checkpoint import CheckpointS
from nntrain.subs.device import DeviceS
from nntrain.subs.lr_find import LRFindS
from nntrain.subs.metrics import MetricsS
from nntrain.subs.normalize import NormalizationS
from nntrain.subs.precision import CompileS, MixedPrecisionS
from nntrain.subs.progress import ProgressS
from nntrain.subs.schedule import ParamSchedulerS, SchedulerS, sched_lin
from nntrain.subs.tracking import CSVLoggerS, EarlyStoppingS
from nntrain.subs.training import EMAS, GradAccumS, GradClipS, TerminateOnNaNS
from nntrain.testing import same_state, tiny_classifier
from tests.contract import changed, observe

nan, inf = math.nan, math.inf
lin = sched_lin(0.1, 0.01)
step_lr = lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2)

# (what is built, the argument the error must name, the value it must show)
BAD = [
    (lambda: DeviceS('cdua'), 'device', 'cdua'),
    (lambda: DeviceS(2.5), 'device', '2.5'),
    (lambda: NormalizationS([0., 1.], [1.]), 'same shape', '(2,)'),
    (lambda: NormalizationS([0.], [0.]), 'std', '0.'),
    (lambda: NormalizationS([0.], [-1.]), 'std', '-1.'),
    (lambda: NormalizationS(0.5), 'mean and std', '0.5'),
    (lambda: NormalizationS(std=2.), 'mean and std', '2.0'),
    (lambda: NormalizationS([nan], [1.]), 'mean', 'nan'),
    (lambda: NormalizationS([[0.]], [[1.]]), 'mean', '(1, 1)'),
    (lambda: NormalizationS('a', 'b'), 'mean', "'a'"),
    (lambda: NormalizationS(n_batches=0), 'n_batches', '0'),
    (lambda: MetricsS(loss=MulticlassAccuracy()), 'metric names', "'loss'"),
    (lambda: MetricsS(MulticlassAccuracy), 'multiclass_accuracy', 'MulticlassAccuracy'),
    (lambda: MetricsS(flush_every=0), 'flush_every', '0'),
    (lambda: ParamSchedulerS({}), 'scheds', '{}'),
    (lambda: ParamSchedulerS([lin]), 'scheds', '[sched_lin(0.1, 0.01)]'),
    (lambda: ParamSchedulerS({'lr': 0.1}), "scheds['lr']", '0.1'),
    (lambda: ParamSchedulerS({'lr': [lin, 3]}), "scheds['lr']", '3]'),
    (lambda: SchedulerS(None), 'scheduler_factory', 'None'),
    (lambda: SchedulerS(step_lr, 'batch'), 'interval', "'batch'"),
    (lambda: LRFindS(start_lr=0), 'start_lr', '0'),
    (lambda: LRFindS(end_lr=inf), 'end_lr', 'inf'),
    (lambda: LRFindS(start_lr=1., end_lr=0.1), 'start_lr < end_lr', '1.0'),
    (lambda: LRFindS(num_it=1), 'num_it', '1'),
    (lambda: LRFindS(num_it=2.5), 'num_it', '2.5'),
    (lambda: LRFindS(mode='log'), 'mode', "'log'"),
    (lambda: LRFindS(stop_div='yes'), 'stop_div', "'yes'"),
    (lambda: LRFindS(div_factor=1), 'div_factor', '1'),
    (lambda: LRFindS(beta=1.), 'beta', '1.0'),
    (lambda: AugmentS(None), 'transform', 'None'),
    (lambda: AugmentS(abs, on_train=1), 'on_train', '1'),
    (lambda: MixUpS(alpha=0), 'alpha', '0'),
    (lambda: MixUpS(alpha=nan), 'alpha', 'nan'),
    (lambda: CutMixS(alpha=-1.), 'alpha', '-1.0'),
    (lambda: MixUpS(seed=-1), 'seed', '-1'),
    (lambda: MixUpS(seed=1.5), 'seed', '1.5'),
    (lambda: MixedPrecisionS('fp8'), 'dtype', "'fp8'"),
    (lambda: MixedPrecisionS(verbose='no'), 'verbose', "'no'"),
    (lambda: CompileS(mdoe='max-autotune'), 'torch.compile', 'mdoe'),
    (lambda: GradClipS(max_norm=-1), 'max_norm', '-1'),
    (lambda: GradClipS(max_norm=nan), 'max_norm', 'nan'),
    (lambda: GradClipS(norm_type=0), 'norm_type', '0'),
    (lambda: GradClipS(norm_type='2'), 'norm_type', "'2'"),
    (lambda: GradClipS(mode='nrom'), 'mode', "'nrom'"),
    (lambda: GradAccumS(0), 'n_acc', '0'),
    (lambda: GradAccumS(2.), 'n_acc', '2.0'),
    (lambda: TerminateOnNaNS(check_every=0), 'check_every', '0'),
    (lambda: EMAS(decay=2), 'decay', '2'),
    (lambda: EMAS(decay=-0.1), 'decay', '-0.1'),
    (lambda: EMAS(decay=1.), 'decay', '1.0'),   # the average would never move (issue 18: no silent no-op)
    (lambda: EMAS(decay=0.), 'decay', '0.0'),   # the average would be the weights
    (lambda: CheckpointS(every=0), 'every', '0'),
    (lambda: CheckpointS(every=True), 'every', 'True'),
    (lambda: CheckpointS(every='step'), 'every', "'step'"),
    (lambda: CheckpointS(keep=-1), 'keep', '-1'),
    (lambda: CheckpointS(keep=0), 'keep', '0'),
    (lambda: CheckpointS(mode='mn'), 'mode', "'mn'"),
    (lambda: CheckpointS(None), 'folder', 'None'),
    (lambda: CheckpointS(monitor=3), 'monitor', '3'),
    (lambda: CheckpointS(save_on_interrupt='y'), 'save_on_interrupt', "'y'"),
    (lambda: EarlyStoppingS(patience=0), 'patience', '0'),
    (lambda: EarlyStoppingS(mode='maximum'), 'mode', "'maximum'"),
    (lambda: EarlyStoppingS(phase='valdi'), 'phase', "'valdi'"),
    (lambda: EarlyStoppingS(min_delta=-0.1), 'min_delta', '-0.1'),
    (lambda: EarlyStoppingS(min_delta=nan), 'min_delta', 'nan'),
    (lambda: EarlyStoppingS(monitor=None), 'monitor', 'None'),
    (lambda: EarlyStoppingS(restore_best=1), 'restore_best', '1'),
    (lambda: CSVLoggerS(path=None), 'path', 'None'),
    (lambda: CSVLoggerS(append='yes'), 'append', "'yes'"),
    (lambda: ProgressS(plot='yes'), 'plot', "'yes'"),
    (lambda: ProgressS(plot=1), 'plot', '1'),
    (lambda: ProgressS(notebook='no'), 'notebook', "'no'"),
    (lambda: ProgressS(table='rows'), 'table', "'rows'"),
    (lambda: ProgressS(comment_every=-1), 'comment_every', '-1'),
]


@pytest.mark.parametrize('build, arg, value', BAD, ids=[f'{a}={v}' for _, a, v in BAD])
def test_bad_argument_is_refused_naming_it(build, arg, value):
    with pytest.raises((ValueError, TypeError)) as e: build()
    assert arg in str(e.value) and value in str(e.value), str(e.value)


def test_suggestions_for_misspelt_choices():
    with pytest.raises(ValueError, match="Did you mean 'valid'"): EarlyStoppingS(phase='valdi')
    with pytest.raises(ValueError, match="Did you mean 'min'"): CheckpointS(mode='mn')


def test_good_arguments_still_accepted(tmp_path):
    "The edges of each range, and the documented special values, are kept as given (not refused, not replaced)."
    assert GradClipS(norm_type=inf).norm_type == inf
    assert EMAS(decay=1e-6).decay == 1e-6 and EMAS(decay=1 - 1e-9).decay == 1 - 1e-9   # (0 and 1 are refused)
    ck = CheckpointS(tmp_path, keep=None, monitor=None)
    assert (ck.folder, ck.keep, ck.monitor) == (tmp_path, None, None)
    scalar, channels = NormalizationS(0.5, 2.), NormalizationS([0., 1.], (1., 2.))
    assert same_state((scalar.mean, scalar.std), (torch.tensor(0.5), torch.tensor(2.)))
    assert same_state((channels.mean, channels.std), (torch.tensor([0., 1.]), torch.tensor([1., 2.])))
    measured = NormalizationS(n_batches=None)
    assert measured.n_batches is None and measured.mean is None   # measured on every batch, at the first fit
    assert EarlyStoppingS(min_delta=0.).min_delta == 0.
    assert DeviceS(torch.device('cpu')).device == torch.device('cpu')
    assert MixUpS(seed=0).generator.initial_seed() == 0
    assert CompileS(backend='eager').compile_kwargs == {'backend': 'eager'}
    finder = LRFindS(start_lr=1e-3, end_lr=1e-2, num_it=2, beta=0.)
    assert (finder.num_it, finder.beta) == (2, 0.) and finder.sched(0.) == pytest.approx(1e-3)
    assert finder.sched(1.) == pytest.approx(1e-2)
    shown = ProgressS(plot=True, comment_every=0, table='phase', notebook=None)
    assert (shown.plot, shown.comment_every, shown.table, shown.force_notebook) == (True, 0, 'phase', None)
    assert ProgressS(notebook=False).force_notebook is False


# -- refusals at before_fit: nothing changes -----------------------------------------------------------------

def trained(tmp_path):
    "A learner after one fit (so an optimizer state, a history and a step count exist to be kept)."
    set_seed(0)
    learn = tiny_classifier(subs=[MetricsS()])
    learn.fit(1)
    return learn


def blocked(tmp_path):
    "A path whose parent is a regular file: no folder can be made there."
    (tmp_path / 'blocker').write_text('a file, not a folder')
    return tmp_path / 'blocker' / 'sub'


@pytest.mark.parametrize('make', [lambda p: CheckpointS(p), lambda p: CheckpointS(p, every=1),
                                  lambda p: CSVLoggerS(p / 'log.csv')])
def test_unwritable_folder_is_refused_before_training(make, tmp_path):
    learn, sub = trained(tmp_path), make(blocked(tmp_path))
    before = observe(learn, tmp_path)
    with pytest.raises(OSError, match=f'{type(sub).__name__} cannot write to .*blocker') as e:
        learn.fit(1, subs=[sub])
    after = observe(learn, tmp_path)
    assert not changed(before, after)
    notes = getattr(e.value, '__notes__', [])
    assert not any('while cleaning up' in n for n in notes)   # the cleanup did not fail again
    learn.fit(1)   # still usable


def test_csv_logger_refuses_a_folder_as_its_path(tmp_path):
    learn = trained(tmp_path)
    before = observe(learn, tmp_path)
    with pytest.raises(IsADirectoryError, match='is a folder'): learn.fit(1, subs=[CSVLoggerS(tmp_path)])
    after = observe(learn, tmp_path)
    assert not changed(before, after)


def test_lr_find_bad_arguments_change_nothing(tmp_path):
    learn = trained(tmp_path)
    before = observe(learn, tmp_path)
    for kwargs, arg in [(dict(show_plot='yes'), 'show_plot'), (dict(num_it=1), 'num_it'),
                        (dict(start_lr=-1.), 'start_lr'), (dict(mode='lin'), 'mode')]:
        with pytest.raises((ValueError, TypeError), match=arg): learn.lr_find(**kwargs)
        after = observe(learn, tmp_path)
        assert not changed(before, after), kwargs


def test_missing_monitor_column_is_named_at_the_first_valid_row(tmp_path, monkeypatch):
    "As EarlyStoppingS does (shown in 41_tracking)."
    monkeypatch.chdir(tmp_path)
    learn, sub = trained(tmp_path), CheckpointS('ck', monitor='accuracy')
    n_rows = len(learn.history)
    with pytest.raises(KeyError, match="monitors 'accuracy', but the history rows have") as e:
        learn.fit(1, subs=[sub])
    assert "'loss'" in str(e.value) and len(learn.history) == n_rows + 2   # after this fit's first valid row


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
@pytest.mark.parametrize('device', ['cuda', 'cuda:0'])
def test_device_that_is_not_there_is_refused_before_the_model_moves(device, tmp_path):
    learn = trained(tmp_path)
    before = observe(learn, tmp_path)
    with pytest.raises(RuntimeError, match=f"DeviceS: '{device}' asked for, but CUDA is not available"):
        learn.fit(1, subs=[DeviceS(device)])
    assert not changed(before, observe(learn, tmp_path))
