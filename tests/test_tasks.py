"""The tasks of nbs/95_beyond_classification.ipynb, each in a second or less: no subscriber reshapes a batch.

Two inputs, a dict batch with a model that computes its own loss, a language model's (B, T, V) scores, variable
lengths, segmentation masks moving under AugmentS and tta's undo, training without targets, multi-label metrics.
"""
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from nntrain.core import Order, Subscriber, set_seed
from nntrain.data import DataLoaders
from nntrain.learner import Learner
from nntrain.losses import cross_entropy_flat
from nntrain.subs.augment import AugmentS
from nntrain.subs.metrics import MetricsS, flat_tokens, on_preds

with warnings.catch_warnings():   # torcheval's import warns about torch.jit.script, which nntrain never uses
    warnings.filterwarnings('ignore', message='.*torch.jit.script.*', category=FutureWarning)
    from torcheval.metrics import MulticlassAccuracy, MultilabelAccuracy


class Spy(Subscriber):
    "What the model and the loss see, batch by batch (after every transform)."
    order = Order.METRICS - 1
    def __init__(self): self.seen = []
    def after_predict(self, learn): self.seen.append((learn.training, learn.xb, learn.yb, learn.preds.detach()))


# ------------------------------------------------------------------------------------------------ two inputs

class TwoInputs(nn.Module):
    "A class from a numeric vector and a category id, as a tabular model with an embedding would."
    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(4, 3), nn.Linear(5, 8), nn.Linear(11, 2)
    def forward(self, nums, cats):
        assert nums.shape[1:] == (5,) and cats.ndim == 1   # called as model(nums, cats): both inputs, in order
        return self.head(torch.cat([F.relu(self.lin(nums)), self.emb(cats)], 1))


def test_two_inputs_train_predict_and_infer():
    set_seed(0)
    nums, cats = torch.randn(160, 5), torch.randint(0, 4, (160,))
    y = (nums[:, 0] + cats - 1.5 > 0).long()                          # needs both inputs
    dls = DataLoaders.from_tensors((nums[:128], cats[:128]), y[:128], (nums[128:], cats[128:]), y[128:],
                                   batch_size=16)
    learn = Learner(TwoInputs(), dls, F.cross_entropy, torch.optim.AdamW, 3e-2, [MetricsS(MulticlassAccuracy())])
    learn.fit(4)
    assert learn.history[-1]['multiclass_accuracy'] > 0.8
    preds, targets = learn.get_preds(reduce='argmax')
    assert preds.shape == targets.shape == (32,) and torch.equal(targets, y[128:])
    assert learn.infer(nums[:3], cats[:3]).shape == (3, 2)


# ------------------------------------------------------------------------------- a dict batch, the model's loss

class TinyEncoder(nn.Module):
    "A Hugging-Face-style classifier: keyword inputs, and an output with `.loss` (given labels) and `.logits`."
    def __init__(self, vocab: int = 12, d: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0., batch_first=True)
        self.enc, self.head = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Linear(d, 2)
        self.got_labels = 0
    def forward(self, input_ids, attention_mask, labels=None):
        h = self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        logits = self.head((h * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True))
        self.got_labels += labels is not None
        return SimpleNamespace(logits=logits, loss=None if labels is None else F.cross_entropy(logits, labels))


def test_dict_batches_and_a_model_that_computes_its_loss():
    set_seed(0)
    ids = torch.randint(1, 12, (96, 8))
    mask = torch.ones_like(ids)
    mask[::3, 5:] = 0                                                  # some padded sequences
    labels = (ids == 3).any(1).long()
    x = lambda s: {'input_ids': ids[s], 'attention_mask': mask[s]}
    dls = DataLoaders.from_tensors(x(slice(64)), labels[:64], x(slice(64, None)), labels[64:], batch_size=16)
    model, spy = TinyEncoder(), Spy()
    learn = Learner(model, dls, None, torch.optim.AdamW, 1e-2, [MetricsS(MulticlassAccuracy()), spy])
    learn.fit(2)
    assert model.got_labels == 2 * 4 + 2 * 1                          # the model got labels in every fit batch
    _, xb, yb, preds = spy.seen[0]
    assert set(xb[0]) == {'input_ids', 'attention_mask'} and yb[0].shape == (16,)   # the labels are the targets
    assert preds.shape == (16, 2)                                      # the predictions are the logits
    row = learn.validate()
    assert {'loss', 'multiclass_accuracy'} <= set(row)
    preds, targets = learn.get_preds()
    assert preds.shape == (32, 2) and torch.equal(targets, labels[64:])
    assert learn.infer(x(slice(0, 3))).shape == (3, 2)


# ------------------------------------------------------------------------------------ a language model (B, T, V)

class CharLM(nn.Module):
    "Next-token scores (B, T, V): an embedding, a causal 1-D convolution (two tokens of context), a head."
    def __init__(self, vocab: int = 10, d: int = 16):
        super().__init__()
        self.emb, self.conv, self.head = nn.Embedding(vocab, d), nn.Conv1d(d, d, 2), nn.Linear(d, vocab)
    def forward(self, x):
        h = self.conv(F.pad(self.emb(x).transpose(1, 2), (1, 0))).transpose(1, 2)
        return self.head(F.relu(h))


def lm_dls(shift: int = 0) -> DataLoaders:
    "Sequences of a repeating pattern: the next token follows from the current one."
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 10, (80, 1), generator=g)
    seq = (start + torch.arange(17)) % 10
    x, y = seq[:, :-1], seq[:, 1:] + shift
    return DataLoaders.from_tensors(x[:64], y[:64], x[64:], y[64:], batch_size=16)


def test_language_model_with_flat_cross_entropy():
    set_seed(0)
    learn = Learner(CharLM(), lm_dls(), cross_entropy_flat, torch.optim.AdamW, 3e-2,
                    [MetricsS(accuracy=(MulticlassAccuracy(), flat_tokens()))])
    learn.fit(3)
    assert learn.class_dim == -1                                       # the first batch's check found the layout
    assert learn.history[-1]['accuracy'] > 0.9
    preds, targets, losses = learn.get_preds(reduce='argmax', with_loss=True)
    assert preds.shape == targets.shape == losses.shape == (16, 16)    # argmax over the vocabulary, not over time
    assert (preds == targets).float().mean() > 0.9


def test_language_model_messages_name_the_last_dim_layout():
    set_seed(0)
    with pytest.raises(ValueError, match=r'labels must be in \[0, 10\).*classes on the last dim'):
        Learner(CharLM(), lm_dls(shift=5), cross_entropy_flat).fit(1)          # labels up to 14, vocabulary 10
    with pytest.raises(RuntimeError) as e:
        Learner(CharLM(), lm_dls(), F.cross_entropy).fit(1)                    # torch's loss: classes on dim 1
    notes = '\n'.join(getattr(e.value, '__notes__', []))
    assert 'classes on the last dim' in notes and 'cross_entropy_flat' in notes


# ----------------------------------------------------------------------------------------- variable lengths

def pad_batch(items):
    "A collate that pads: token ids with 0 (the padding id), labels with -100 (ignored by the loss and metrics)."
    xs, ys = zip(*items)
    return pad_sequence(xs, batch_first=True, padding_value=0), pad_sequence(ys, batch_first=True, padding_value=-100)


def test_variable_lengths_through_metrics_and_get_preds():
    g = torch.Generator().manual_seed(0)
    items = []
    for n in torch.randint(3, 12, (96,), generator=g).tolist():
        x = torch.randint(1, 3, (n,), generator=g)                     # tokens 1 and 2; 0 is padding
        items.append((x, (x == 2).long().cumsum(0) % 2))               # the parity of the 2s so far
    dls = DataLoaders(DataLoader(items[:64], 16, shuffle=True, collate_fn=pad_batch,
                                 generator=torch.Generator().manual_seed(0)),
                      DataLoader(items[64:], 8, collate_fn=pad_batch))
    set_seed(0)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.head = nn.Embedding(3, 8), nn.GRU(8, 16, batch_first=True), nn.Linear(16, 2)
        def forward(self, x): return self.head(self.rnn(self.emb(x))[0])

    spy = Spy()
    learn = Learner(Tagger(), dls, cross_entropy_flat, torch.optim.AdamW, 2e-2,
                    [MetricsS(accuracy=(MulticlassAccuracy(), flat_tokens())), spy])
    learn.fit(2)
    widths = {y.shape[1] for t, _, (y,), _ in spy.seen if not t}
    assert len(widths) > 1                                             # the valid batches differ in length
    valid = [(p, y) for t, _, (y,), p in spy.seen[-4:] if not t]
    correct = sum(((p.argmax(-1) == y) & (y != -100)).sum().item() for p, y in valid)
    total = sum((y != -100).sum().item() for _, y in valid)
    assert learn.history[-1]['accuracy'] == pytest.approx(correct / total)   # padding is not counted
    preds, targets, losses = learn.get_preds(reduce='argmax', with_loss=True)
    assert preds.shape == targets.shape == losses.shape == (32, max(widths))
    lengths = torch.tensor([len(x) for x, _ in items[64:]])
    assert torch.equal((targets != -100).sum(1), lengths)              # padded with -100 past each item's end
    per_item, _ = learn.get_preds(pad_value=None)                      # or a list: one tensor per item
    assert len(per_item) == 32 and per_item[0].shape[-1] == 2


# ------------------------------------------------------------------------------------------------ segmentation

def seg_dls():
    "Images whose first channel is the mask itself: wherever they go, the image and the mask must agree."
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(32, 12, 12, dtype=torch.long)
    for i, (r, c) in enumerate(torch.randint(0, 8, (32, 2), generator=g).tolist()): masks[i, r:r + 4, c:c + 3] = 1
    imgs = torch.stack([masks.float(), torch.rand(32, 12, 12, generator=g)], 1)
    return DataLoaders.from_tensors(imgs[:24], masks[:24], imgs[24:], masks[24:], batch_size=8)


@pytest.mark.parametrize('tfm', [v2.RandomHorizontalFlip(p=1.), v2.RandomCrop(12, padding=3),
                                 v2.Compose([v2.RandomVerticalFlip(), v2.RandomCrop(12, padding=2)])])
def test_masks_move_with_the_image(tfm):
    set_seed(0)
    spy = Spy()
    learn = Learner(nn.Conv2d(2, 2, 3, padding=1), seg_dls(), F.cross_entropy, subs=[AugmentS(tfm, targets=True), spy])
    learn.fit(1)
    for training, (x,), (m,), _ in spy.seen:
        assert m.dtype == torch.long and m.shape == x.shape[:1] + x.shape[2:]
        if training: assert torch.equal(x[:, 0].round().long(), m)     # the image's mask channel is the mask
    moved = [not torch.equal(x[:, 0], x0[:, 0]) for (t, (x,), _, _), (x0, _) in zip(spy.seen, learn.dls.train) if t]
    assert any(moved)


def test_without_targets_the_masks_stay_behind():
    "What `targets=True` is for: a flip of the images alone leaves every mask where it was."
    spy = Spy()
    learn = Learner(nn.Conv2d(2, 2, 3, padding=1), seg_dls(), F.cross_entropy,
                    subs=[AugmentS(v2.RandomHorizontalFlip(p=1.)), spy])
    learn.fit(1, valid=False)
    assert all(torch.equal(x[:, 0].flip(-1).round().long(), m) for _, (x,), (m,), _ in spy.seen)


def test_tta_undoes_the_flip_before_averaging():
    set_seed(0)
    learn = Learner(nn.Conv2d(2, 2, 3, padding=1), seg_dls(), F.cross_entropy)
    plain, _ = learn.get_preds()
    hflip = lambda t: t.flip(-1)
    undone, _ = learn.tta(transform=[hflip], undo=[hflip], beta=0.)
    flipped, _ = learn.get_preds(dl=[(x.flip(-1), m) for x, m in learn.dls.valid])
    torch.testing.assert_close(undone, flipped.flip(-1))              # the flipped view's predictions, flipped back
    assert not torch.allclose(undone, plain)                          # (a 3x3 conv is not flip-invariant)
    mirrored, _ = learn.tta(transform=[hflip], beta=0.)               # without undo: the predictions stay mirrored
    torch.testing.assert_close(mirrored, undone.flip(-1))


# ------------------------------------------------------------------------------------------- without targets

def test_training_without_targets():
    "Batches (x,) are inputs only: the model computes its loss from its inputs, or the loss takes the predictions."
    set_seed(0)
    x = torch.randn(96, 3) @ torch.randn(3, 6)                         # 6 features that 3 numbers explain

    class AutoEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Linear(6, 3), nn.Linear(3, 6)
        def forward(self, x):
            recon = self.dec(self.enc(x))
            return SimpleNamespace(logits=recon, loss=F.mse_loss(recon, x))

    dls = DataLoaders.from_tensors(x[:64], None, x[64:], None, batch_size=16)
    learn = Learner(AutoEncoder(), dls, None, torch.optim.AdamW, 3e-2)
    first = learn.validate()['loss']
    learn.fit(5)
    assert learn.history[-1]['loss'] < first / 4
    recon, targets = learn.get_preds()
    assert targets is None and recon.shape == (32, 6)
    toward_zero = Learner(nn.Linear(6, 2), dls, lambda preds: preds.pow(2).mean(), torch.optim.SGD, 1e-2)
    toward_zero.fit(2)                                                 # loss_func(preds): no targets to pass
    assert toward_zero.history[-1]['loss'] < toward_zero.history[0]['loss']


# ----------------------------------------------------------------------------------------------- multi-label

def test_multi_label_metrics_with_a_transform():
    set_seed(0)
    x = torch.randn(160, 8)
    y = torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0, x[:, 3] < -0.5], 1).float()
    dls = DataLoaders.from_tensors(x[:128], y[:128], x[128:], y[128:], batch_size=16)
    learn = Learner(nn.Linear(8, 3), dls, F.binary_cross_entropy_with_logits, torch.optim.AdamW, 3e-2,
                    [MetricsS(accuracy=(MultilabelAccuracy(criteria='hamming'), on_preds(torch.sigmoid)))])
    learn.fit(4)
    probs, targets = learn.get_preds(act=torch.sigmoid)
    expected = ((probs > 0.5).float() == targets).float().mean().item()
    assert learn.history[-1]['accuracy'] == pytest.approx(expected) and expected > 0.85


def test_regression_shape_mismatch_is_refused_with_the_fix():
    dls = DataLoaders.from_tensors(torch.randn(32, 4), torch.randn(32), torch.randn(16, 4), torch.randn(16),
                                   batch_size=8)
    with pytest.raises(ValueError, match=r'\(8, 1\) and targets \(8,\) differ in shape.*squeeze'):
        Learner(nn.Linear(4, 1), dls, F.mse_loss).fit(1)
