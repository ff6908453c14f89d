"TensorBoardS: what it writes, read back with TensorBoard's own EventAccumulator."
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torcheval.metrics import MulticlassAccuracy

from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.subs.metrics import MetricsS
from nntrain.subs.normalize import NormalizationS
from nntrain.subs.schedule import ParamSchedulerS, one_cycle_scheds
from nntrain.testing import failing, no_host_sync_in_batches, tiny_classifier
from tests.contract import check_contract

pytest.importorskip('tensorboard')
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from nntrain.subs.tensorboard import TensorBoardS  # noqa: E402


def read(log_dir) -> EventAccumulator:
    "The events of the one run in `log_dir` (each run writes in its own folder, `log_dir/<run id>`)."
    runs = [d for d in Path(log_dir).iterdir() if d.is_dir()]
    assert len(runs) == 1, f'expected one run folder in {log_dir}, found {runs}'
    return EventAccumulator(str(runs[0]), size_guidance={'scalars': 0, 'images': 0, 'histograms': 0}).Reload()


def scalars(ev, tag): return [(e.step, e.value) for e in ev.Scalars(tag)]


def test_history_rows_are_scalars_per_phase_at_the_step(tmp_path):
    learn = tiny_classifier(subs=[MetricsS(accuracy=MulticlassAccuracy())])
    learn.fit(3, subs=[TensorBoardS(tmp_path)])
    ev = read(tmp_path)
    for phase in ('train', 'valid'):
        rows = [r for r in learn.history if r['phase'] == phase]
        for key in ('loss', 'accuracy', 'time'):   # 3 steps per epoch: each row at the step its epoch ended
            assert scalars(ev, f'{key}/{phase}') == [(3 * (r['epoch'] + 1), pytest.approx(r[key])) for r in rows]
    assert not [t for t in ev.Tags()['scalars'] if t.startswith(('epoch', 'phase'))]


def test_lr_and_momentum_per_step_and_param_group(tmp_path):
    torch.manual_seed(0)
    learn = tiny_classifier()
    learn.splitter = lambda m: [m[:2].parameters(), m[2:].parameters()]
    learn.opt_func = torch.optim.AdamW
    sched = ParamSchedulerS(one_cycle_scheds(0.1, moms=(0.95, 0.85, 0.95)))
    learn.fit(2, subs=[sched, TensorBoardS(tmp_path)])
    ev = read(tmp_path)
    steps = list(range(1, learn.global_step + 1))
    for i in (0, 1):
        lrs, moms = scalars(ev, f'lr/group{i}'), scalars(ev, f'momentum/group{i}')
        assert [s for s, _ in lrs] == steps and [s for s, _ in moms] == steps
    # the recorder keeps the last group's values, as applied to each step
    assert [v for _, v in scalars(ev, 'lr/group1')] == pytest.approx(sched.hps['lr'])
    assert [v for _, v in scalars(ev, 'momentum/group1')] == pytest.approx(sched.hps['mom'])
    assert len({v for _, v in scalars(ev, 'lr/group1')}) > 2   # it did change along the cycle


def test_images_with_labels_each_epoch_and_graph_once(tmp_path):
    learn = tiny_classifier(images=True, subs=[MetricsS()])
    learn.fit(2, subs=[TensorBoardS(tmp_path, n_images=4)])
    ev = read(tmp_path)
    assert [e.step for e in ev.Images('valid/predictions')] == [3, 6]   # at the step of each epoch's end
    assert ev.Images('valid/predictions')[0].encoded_image_string.startswith(b'\x89PNG')
    assert ev.Tags()['graph'] and not ev.Tags()['histograms']   # histograms only when asked


def test_no_images_for_inputs_that_are_not_images(tmp_path):
    learn = tiny_classifier(subs=[MetricsS()])
    learn.fit(1, subs=[TensorBoardS(tmp_path)])
    assert read(tmp_path).Tags()['images'] == []


def test_images_are_decoded_and_titled(tmp_path, monkeypatch):
    import nntrain.subs.tensorboard as tbmod
    seen, show_images = {}, tbmod.show_images
    def spy(x, labels, **kwargs):
        seen['x'], seen['labels'] = x, labels
        return show_images(x, labels, **kwargs)
    monkeypatch.setattr(tbmod, 'show_images', spy)
    g = torch.Generator().manual_seed(0)
    x, y = 5 + 2 * torch.rand(32, 1, 4, 4, generator=g), torch.randint(0, 2, (32,), generator=g)
    dls = DataLoaders.from_tensors(x, y, x, y, batch_size=16)
    dls.vocab = ['cat', 'dog']
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    learn = Learner(model, dls, F.cross_entropy, lr=0.1, subs=[NormalizationS(mean=6., std=0.5)])
    learn.fit(1, subs=[TensorBoardS(tmp_path, n_images=3)])
    assert seen['x'].shape == (3, 1, 4, 4) and torch.allclose(seen['x'], x[:3])   # back in the data's own units
    assert all(p in ('cat', 'dog') and t in ('cat', 'dog') for p, t in (s.split(' / ') for s in seen['labels']))
    assert [s.split(' / ')[1] for s in seen['labels']] == [['cat', 'dog'][i] for i in y[:3].tolist()]


def test_histograms_every_n_steps(tmp_path):
    learn = tiny_classifier()
    learn.fit(2, subs=[TensorBoardS(tmp_path, hist_every=2)])   # 6 steps
    ev = read(tmp_path)
    names = [n for n, _ in learn.model.named_parameters()]
    for n in names:
        assert [e.step for e in ev.Histograms(f'weights/{n}')] == [2, 4, 6]
        assert [e.step for e in ev.Histograms(f'grads/{n}')] == [2, 4, 6]
    last = ev.Histograms('weights/0.weight')[-1].histogram_value
    w = learn.model[0].weight.detach()
    assert last.num == w.numel() and last.min == pytest.approx(w.min().item())


def test_untraceable_model_warns_and_logs_the_rest(tmp_path):
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)
        def forward(self, x):
            if torch.jit.is_tracing(): raise RuntimeError('no tracing here')
            return self.lin(x)
    learn = tiny_classifier(subs=[MetricsS()])
    learn.model = Untraceable()
    with pytest.warns(UserWarning, match='could not trace the model graph'):
        learn.fit(1, subs=[TensorBoardS(tmp_path)])
    ev = read(tmp_path)
    assert not ev.Tags()['graph'] and len(scalars(ev, 'loss/valid')) == 1


def test_main_rank_only(tmp_path, monkeypatch):
    learn = tiny_classifier(subs=[MetricsS()])
    monkeypatch.setattr(type(learn), 'is_main', property(lambda self: False))   # as on a process that is not rank 0
    learn.fit(1, subs=[TensorBoardS(tmp_path / 'run')])
    assert not (tmp_path / 'run').exists()


def test_writer_closed_after_an_error(tmp_path):
    tb = TensorBoardS(tmp_path)
    learn = tiny_classifier(subs=[MetricsS()])
    with pytest.raises(RuntimeError, match='injected failure'):
        learn.fit(2, subs=[tb, failing('after_loss', at=1)])
    assert tb.writer is None
    assert [s for s, _ in scalars(read(tmp_path), 'lr/group0')] == [1]   # flushed: the step before the failure


def test_a_second_fit_appends(tmp_path):
    tb = TensorBoardS(tmp_path)
    learn = tiny_classifier(subs=[MetricsS()])
    learn.fit(1, subs=[tb])
    learn.fit(1, subs=[tb])
    ev = read(tmp_path)
    # each fit writes its own file in the run's folder; two made within a second may be read in either order
    assert sorted(s for s, _ in scalars(ev, 'loss/valid')) == [3, 6]
    assert sorted(s for s, _ in scalars(ev, 'lr/group0')) == list(range(1, 7))


def test_contract():
    check_contract(lambda: TensorBoardS(__import__('tempfile').mkdtemp()))


def test_bad_arguments():
    with pytest.raises(ValueError, match='hist_every'): TensorBoardS(hist_every=0)
    with pytest.raises(ValueError, match='n_images'): TensorBoardS(n_images=-1)
    with pytest.raises(TypeError, match='log_dir'): TensorBoardS(log_dir=3)


def test_clear_error_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)   # as if it could not be imported
    learn = tiny_classifier()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with pytest.raises(ImportError, match='pip install tensorboard'):
            learn.fit(1, subs=[TensorBoardS(tmp_path)])
    learn.fit(1)   # nothing left behind


def test_no_host_sync_per_batch(tmp_path):
    "The shared guard (its registry entry runs in tests/test_nosync.py too): only the images, once per epoch, read."
    learn = tiny_classifier(images=True, subs=[MetricsS()])
    with no_host_sync_in_batches(learn, allow=[TensorBoardS._add_images]) as guard:
        learn.fit(2, subs=[TensorBoardS(tmp_path)])
    assert guard.batches == 2 * (3 + 2) - 2 and 'tolist' in guard.reads   # epoch 1's images were let through
    assert len(read(tmp_path).Scalars('lr/group0')) == 6
