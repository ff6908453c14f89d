"The batch protocol: splits, model calls, the first-batch checks and their layouts, metrics and predictions on any batch."
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nntrain.batch import (call_model, check_targets, class_dim, describe, join_batch, output_loss,
                           output_preds, split_batch)
from nntrain.core import Subscriber
from nntrain.data import DataLoaders, TensorLoader
from nntrain.learner import Learner
from nntrain.subs.augment import AugmentS
from nntrain.subs.metrics import MetricsS, flat_tokens, on_preds
from nntrain.subs.precision import MixedPrecisionS

torch.manual_seed(0)
X1, X2, Y = torch.randn(24, 3), torch.randn(24, 2), torch.randint(0, 2, (24,))


class Encoding(OrderedDict):
    "A mapping subclass, as Hugging Face's BatchEncoding is."


@pytest.mark.parametrize('batch, n_inp, xb, yb', [
    ((1, 2), None, (1,), (2,)),
    ([1, 2, 3], None, (1, 2), (3,)),
    ((1, 2, 3), 1, (1,), (2, 3)),
    ((1,), None, (1,), ()),
    ((1, 2), 2, (1, 2), ()),
])
def test_split_sequences(batch, n_inp, xb, yb):
    assert split_batch(batch, n_inp) == (xb, yb)
    assert join_batch(batch, xb, yb) == batch


def test_split_mappings_keep_their_type_and_join_back():
    batch = Encoding(input_ids=torch.ones(2, 3), labels=torch.zeros(2))
    (inputs,), targets = split_batch(batch)
    assert type(inputs) is Encoding and list(inputs) == ['input_ids'] and len(targets) == 1
    rejoined = join_batch(batch, (inputs,), (targets[0] + 1,))
    assert type(rejoined) is Encoding and torch.equal(rejoined['labels'], torch.ones(2))
    assert split_batch({'x': 1, 'target': 2}, label_names=('target',)) == (({'x': 1},), (2,))
    assert split_batch({'x': 1}) == (({'x': 1},), ())   # no label key: inputs only


def test_split_refuses_n_inp_that_does_not_fit():
    with pytest.raises(ValueError, match=r'n_inp=3 cannot split a batch of 2 items \(\(tensor \(2,\) float32'):
        split_batch((torch.zeros(2), torch.zeros(2)), 3)


def test_model_output_fields():
    out = {'logits': torch.ones(2), 'loss': torch.tensor(3.)}
    assert output_preds(out) is out['logits'] and output_loss(out) is out['loss']
    ns = SimpleNamespace(logits=torch.zeros(1), loss=None)
    assert output_preds(ns) is ns.logits
    with pytest.raises(ValueError, match='has no `loss`'): output_loss(ns)
    t = torch.ones(3)
    assert output_preds(t) is t and output_preds((t, t))[0] is t
    assert call_model(lambda a, b: a + b, (1, 2)) == 3 and call_model(lambda x=0: x, ({'x': 5},)) == 5


@pytest.mark.parametrize('preds, y, dim', [
    ((4, 10), (4,), 1), ((4, 5, 8, 8), (4, 8, 8), 1), ((4, 32, 88), (4, 32), -1), ((4, 7, 7), (4, 7), 1),
    ((4, 3), (4, 3), None), ((4, 5, 6), (4, 2), None)])
def test_class_dim(preds, y, dim):
    assert class_dim(torch.zeros(preds), torch.zeros(y, dtype=torch.long)) == dim


def test_label_checks_name_their_layout():
    with pytest.raises(ValueError, match=r'labels must be in \[0, 88\).*\[90, 90\].*classes on the last dim'):
        check_targets(torch.zeros(2, 32, 88), torch.full((2, 32), 90))
    with pytest.raises(ValueError, match=r'labels must be in \[0, 5\).*classes on dim 1'):
        check_targets(torch.zeros(2, 5, 4, 4), torch.full((2, 4, 4), 5))
    check_targets(torch.zeros(2, 32, 88), torch.full((2, 32), 87))     # the vocabulary, not the sequence length
    check_targets(torch.zeros(2, 32, 88), torch.full((2, 32), -100))   # all ignored
    with pytest.raises(TypeError, match='floats .* shaped like class labels.*integer labels'):
        check_targets(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match='differ in shape; a loss would broadcast'):
        check_targets(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ValueError, match='batch size 4 but targets have 3'):
        check_targets(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))


class TwoInputs(nn.Module):
    def __init__(self): super().__init__(); self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)
    def forward(self, x1, x2): return self.a(x1) + self.b(x2)


def test_two_inputs_train_and_targets_are_the_last_item():
    dls = DataLoaders.from_tensors((X1, X2), Y, (X1, X2), Y, batch_size=8)
    assert dls.n_inp == 2
    learn = Learner(TwoInputs(), dls, lr=0.5, subs=[MetricsS(acc=_Accuracy())])
    learn.fit(3)
    assert learn.history[0]['loss'] > learn.history[-2]['loss']
    assert learn.get_preds()[0].shape == (24, 2) and learn.infer(X1[:2], X2[:2]).shape == (2, 2)
    # a plain tuple loader: all but the last item are inputs, unless the learner says otherwise
    plain = DataLoaders(TensorLoader(X1, X2, Y, batch_size=8), TensorLoader(X1, X2, Y, batch_size=8))
    Learner(TwoInputs(), plain, lr=0.5).fit(1)
    with pytest.raises(TypeError, match='missing 1 required positional argument'):   # n_inp=1: (X1,), (X2, Y)
        Learner(TwoInputs(), plain, lr=0.5, n_inp=1).fit(1)


class _Accuracy:
    "A metric that is not torcheval's: any object with update/compute/reset."
    def __init__(self): self.reset()
    def reset(self): self.right, self.n = 0, 0
    def update(self, preds, y): self.right += (preds.argmax(1) == y).sum(); self.n += len(y)
    def compute(self): return self.right / self.n


class OwnLoss(nn.Module):
    "Keyword inputs, an output with `logits`, and a `loss` when given `labels` (a Hugging Face model's habits)."
    def __init__(self): super().__init__(); self.lin = nn.Linear(3, 2); self.given = []
    def forward(self, features, labels=None):
        self.given.append(labels is not None)
        logits = self.lin(features)
        return SimpleNamespace(logits=logits, loss=None if labels is None else F.cross_entropy(logits, labels))


def test_dict_batches_and_a_model_that_computes_its_loss():
    dls = DataLoaders.from_tensors({'features': X1}, Y, {'features': X1}, Y, batch_size=8)
    model = OwnLoss()
    learn = Learner(model, dls, loss_func=None, lr=0.5, subs=[MetricsS(acc=_Accuracy())])
    learn.fit(2)
    assert all(model.given) and len(learn.history) == 4 and 'acc' in learn.history[-1]
    assert learn.validate()['loss'] == pytest.approx(F.cross_entropy(model.lin(X1), Y).item(), rel=1e-5)
    preds, targets = learn.get_preds()
    assert preds.shape == (24, 2) and torch.equal(targets, Y)
    assert learn.infer({'features': X1[:3]}).shape == (3, 2)
    with pytest.raises(ValueError, match='with_loss=True needs a loss_func'): learn.get_preds(with_loss=True)


def test_a_model_that_forgets_its_loss_is_told():
    dls = DataLoaders.from_tensors({'features': X1}, None, {'features': X1}, None, batch_size=8)
    learn = Learner(OwnLoss(), dls, loss_func=None)
    with pytest.raises(ValueError, match='has no `loss`'): learn.fit(1)
    assert learn.global_step == 0


class LM(nn.Module):
    "(B, T) token ids -> (B, T, V) logits, as a small language model returns them."
    def __init__(self, v=11, d=8): super().__init__(); self.emb, self.out = nn.Embedding(v, d), nn.Linear(d, v)
    def forward(self, x): return self.out(self.emb(x))


def lm_loss(p, y): return F.cross_entropy(p.reshape(-1, p.shape[-1]), y.reshape(-1))


def test_language_model_labels_are_checked_against_the_vocabulary():
    x = torch.randint(0, 11, (16, 12))
    good = DataLoaders.from_tensors(x, x.roll(-1, 1), x, x.roll(-1, 1), batch_size=8)
    learn = Learner(LM(), good, lm_loss, lr=0.1, subs=[MetricsS(acc=(_Accuracy(), flat_tokens()))])
    learn.fit(1)
    assert learn.class_dim == -1 and 'acc' in learn.history[-1]
    assert learn.get_preds(reduce='argmax')[0].shape == (16, 12)   # over the vocabulary, not over time
    bad = DataLoaders.from_tensors(x, x + 5, x, x, batch_size=8)   # labels up to 15 for 11 outputs
    learn = Learner(LM(), bad, lm_loss, lr=0.1)
    with pytest.raises(ValueError, match=r'labels must be in \[0, 11\).*classes on the last dim'): learn.fit(1)
    assert learn.global_step == 0


def test_label_checks_are_skipped_when_the_learner_does_not_compute_the_loss():
    x = torch.randint(0, 11, (16, 12))
    odd = DataLoaders.from_tensors(x, x + 50, x, x + 50, batch_size=8)   # "labels" another loss reads its own way

    class Loss(Subscriber):
        def get_loss(self, learn): learn.loss = learn.preds.mean() * 0 + (learn.yb[0] - 50).float().mean() * 0
    Learner(LM(), odd, lm_loss, subs=[Loss()]).fit(1)


def test_variable_lengths_through_metrics_and_predictions():
    batches = [(torch.randn(2, n, 4), torch.randint(0, 3, (2, n))) for n in (3, 5, 4)]
    updates = []

    class Seen(_Accuracy):
        def update(self, preds, y): updates.append(tuple(y.shape)); super().update(preds, y)
    tagger = Learner(nn.Linear(4, 3), DataLoaders(batches, batches),
                     lambda p, t: F.cross_entropy(p.transpose(1, 2), t), lr=0.1,
                     subs=[MetricsS(acc=(Seen(), flat_tokens(None)))])
    tagger.fit(1)
    assert 'acc' in tagger.history[-1]
    # per phase: the first batch's probe (on a copy), then one update: flattened, lengths 3, 5, 4 concatenate
    assert updates == [(6,), (24,)] * 2
    preds, targets = tagger.get_preds(reduce='argmax')
    assert preds.shape == targets.shape == (6, 5) and (targets[:2, 3:] == -100).all()
    lists, _ = tagger.get_preds(pad_value=None)
    assert [tuple(p.shape) for p in lists] == [(3, 3)] * 2 + [(5, 3)] * 2 + [(4, 3)] * 2


def test_a_metric_that_cannot_take_the_predictions_fails_before_any_step():
    from torcheval.metrics import MulticlassAccuracy
    y = (X1[:, :2] > 0).float()
    dls = DataLoaders.from_tensors(X1, y, X1, y, batch_size=8)
    learn = Learner(nn.Linear(3, 2), dls, F.binary_cross_entropy_with_logits, lr=0.1,
                    subs=[MetricsS(accuracy=MulticlassAccuracy())])
    w = learn.model.weight.detach().clone()
    with pytest.raises(ValueError, match=r"metric 'accuracy' \(MulticlassAccuracy\) cannot take this phase's"):
        learn.fit(1)
    assert learn.global_step == 0 and torch.equal(learn.model.weight, w) and learn.history == []


def test_multilabel_metric_with_a_transform():
    from torcheval.metrics import MultilabelAccuracy
    y = (X1[:, :2] > 0).float()
    learn = Learner(nn.Linear(3, 2), DataLoaders.from_tensors(X1, y, X1, y, batch_size=8),
                    F.binary_cross_entropy_with_logits, lr=1.,
                    subs=[MetricsS(accuracy=(MultilabelAccuracy(), on_preds(torch.sigmoid)))])
    learn.fit(4)
    assert learn.history[-1]['accuracy'] > 0.7


def test_no_targets():
    class AE(nn.Module):
        def __init__(self): super().__init__(); self.e, self.d = nn.Linear(3, 2), nn.Linear(2, 3)
        def forward(self, x): return self.d(self.e(x)) - x
    learn = Learner(AE(), DataLoaders.from_tensors(X1, None, X1, None, batch_size=8), lambda err: err.pow(2).mean(),
                    lr=0.1)
    learn.fit(3)
    assert learn.history[-1]['loss'] < learn.history[1]['loss']
    preds, targets = learn.get_preds()
    assert preds.shape == (24, 3) and targets is None


def test_precision_wraps_a_provided_predict_step():
    dtypes = []

    class Forward(Subscriber):
        "Provides the forward pass itself (e.g. custom batch handling)."
        def predict(self, learn):
            learn.preds = learn.model(learn.xb[0])
            dtypes.append(learn.preds.dtype)
    dls = DataLoaders.from_tensors(X1, Y, X1, Y, batch_size=8)
    learn = Learner(nn.Linear(3, 2), dls, lr=0.1, subs=[Forward(), MixedPrecisionS('bf16')])
    learn.fit(1)
    assert set(dtypes) == {torch.bfloat16}
    assert 'around it: MixedPrecisionS' in repr(learn.show_training_loop())


def test_augment_moves_masks_with_images():
    from torchvision.transforms import v2
    imgs = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    masks = torch.arange(2 * 4 * 4).view(2, 4, 4) % 3
    seen = {}

    class Look(Subscriber):
        order = 0
        def before_batch(self, learn): seen['x'], seen['y'] = learn.xb[0], learn.yb[0]
    dls = DataLoaders([(imgs, masks)], [(imgs, masks)])
    learn = Learner(nn.Conv2d(3, 3, 1), dls, subs=[AugmentS(v2.RandomHorizontalFlip(p=1.), targets=True), Look()])
    learn.fit(1, valid=False)
    assert torch.equal(seen['x'], imgs.flip(-1)) and torch.equal(seen['y'], masks.flip(-1))
    assert type(seen['x']) is torch.Tensor and type(seen['y']) is torch.Tensor
    learn = Learner(nn.Conv2d(3, 3, 1), dls, subs=[AugmentS(v2.RandomHorizontalFlip(p=1.)), Look()])
    learn.fit(1, valid=False)
    assert torch.equal(seen['y'], masks)   # without targets=True the masks stay as they are


def test_row_loss_is_weighted_by_batch_size():
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    model = nn.Linear(3, 1)
    learn = Learner(model, DataLoaders.from_tensors(x, y, x, y, batch_size=4, valid_batch_size=4), F.mse_loss)
    expected = F.mse_loss(model(x), y).item()   # batches of 4, 4 and 2: a mean of batch means would differ
    unweighted = sum(F.mse_loss(model(x[i:i + 4]), y[i:i + 4]).item() for i in (0, 4, 8)) / 3
    assert abs(expected - unweighted) > 1e-3
    assert learn.validate()['loss'] == pytest.approx(expected, rel=1e-6)


def test_describe():
    assert describe({'a': torch.zeros(2, dtype=torch.long)}) == "{'a': tensor (2,) int64}"
    assert describe((torch.zeros(1),)) == '(tensor (1,) float32,)'


def test_fp16_refuses_a_provided_optimizer_step():
    class OwnStep(Subscriber):
        def step(self, learn): learn.opt.step()
    learn = Learner(nn.Linear(3, 2), DataLoaders.from_tensors(X1, Y, X1, Y, batch_size=8), lr=0.1,
                    subs=[OwnStep(), MixedPrecisionS('fp16')])
    w = learn.model.weight.detach().clone()
    with pytest.raises(ValueError, match='a subscriber provides the step itself: use bf16'): learn.fit(1)
    assert torch.equal(learn.model.weight, w) and learn.global_step == 0


def test_hugging_face_columns_as_dict_batches():
    hf = pytest.importorskip('datasets')
    rows = {'input_ids': [[1, 2, 3], [4, 5], [6], [7, 8, 9, 1]], 'labels': [0, 1, 0, 1]}
    dd = hf.DatasetDict(train=hf.Dataset.from_dict(rows), validation=hf.Dataset.from_dict(rows))
    dls = DataLoaders.from_hf_dd(dd, 2, as_dict=True)
    batch = next(iter(dls.valid))
    assert set(batch) == {'input_ids', 'labels'} and batch['input_ids'].shape == (4, 4)
    assert batch['input_ids'][1].tolist() == [4, 5, 0, 0]   # padded at the end

    class Bag(nn.Module):
        def __init__(self): super().__init__(); self.emb, self.out = nn.EmbeddingBag(10, 4), nn.Linear(4, 2)
        def forward(self, input_ids): return self.out(self.emb(input_ids))
    learn = Learner(Bag(), dls, lr=0.1)
    learn.fit(1)
    assert len(learn.history) == 2 and learn.get_preds()[0].shape == (4, 2)
    fast = DataLoaders.from_hf_dd(hf.DatasetDict(train=hf.Dataset.from_dict({'x': [[1., 2.]] * 4, 'labels': [0] * 4}),
                                                 validation=hf.Dataset.from_dict({'x': [[1., 2.]] * 2, 'labels': [1] * 2})),
                                  2, as_dict=True)
    assert isinstance(fast.train, TensorLoader) and set(next(iter(fast.train))) == {'x', 'labels'}
