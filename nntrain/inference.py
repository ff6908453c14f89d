"""Predictions: `get_preds` (any batch, variable shapes), `infer` (one batch of inputs) and test-time augmentation."""

from __future__ import annotations

__all__ = ['Collect', 'get_preds', 'infer', 'TTAViews', 'tta']

from collections.abc import Mapping
from typing import Callable

import torch

from .batch import cat_items, class_dim, get_input, per_item_loss, set_input
from .core import Order, Subscriber, check_int, check_number
from .run import Run

# %% collecting
class Collect(Subscriber):
    "Gathers (reduced) predictions, targets and per-item losses batch by batch on the CPU, so logits never pile up."
    order, runs = Order.COLLECT, ('predict',)
    def __init__(self, act: Callable | None = None, reduce: str | Callable | None = None, with_loss: bool = False,
                 pad_value: float | None = -100):
        self.act, self.reduce, self.with_loss, self.pad_value = act, reduce, with_loss, pad_value
        self.preds, self.targets, self.losses = [], [], []

    def after_batch(self, learn):
        preds, yb = learn.preds.detach(), learn.yb
        y = yb[0] if len(yb) == 1 else None
        if self.with_loss and yb: self.losses.append(per_item_loss(learn.loss_func, preds, *yb).detach().float().cpu())
        if self.act is not None: preds = self.act(preds)
        if self.reduce == 'argmax':
            dim = class_dim(preds, y) if y is not None else None
            preds = preds.argmax(dim=dim or learn.class_dim or 1)
        elif callable(self.reduce): preds = self.reduce(preds)
        self.preds.append(preds.cpu())
        if yb: self.targets.append(tuple(t.detach().cpu() for t in yb))

    def after_fit(self, learn):
        "Each rank saw a shard: every rank's results, in the loader's order (a collective)."
        if not learn.run.sharded: return
        gather = lambda parts: [learn.run.gather(cat_items(parts, self.pad_value))] if parts else []
        self.preds, self.losses = gather(self.preds), gather(self.losses)
        if self.targets: self.targets = [tuple(gather(list(t))[0] for t in zip(*self.targets))]

    def result(self) -> tuple:
        "`(preds, targets)`, plus per-item losses with `with_loss`; several targets come as a tuple of them."
        cat = lambda xs: cat_items(xs, self.pad_value) if xs else None
        targets = [cat(list(t)) for t in zip(*self.targets)] if self.targets else None
        if targets is not None and len(targets) == 1: targets = targets[0]
        elif targets is not None: targets = tuple(targets)
        res = (cat(self.preds), targets)
        return res + (cat(self.losses),) if self.with_loss else res

def get_preds(learn, dl=None,                       # a loader (default: the validation loader)
              act: Callable | None = None,          # applied to each batch's predictions (e.g. torch.softmax)
              reduce: str | Callable | None = None, # 'argmax' over the class dim, or any function of the predictions
              with_loss: bool = False,              # also return the loss of each item
              pad_value: float | None = -100,       # pads batches whose shapes differ; None: lists of items
              n_inp: int | None = None) -> tuple:   # inputs per batch (default: the learner's)
    "Predictions and targets for `dl` (default: the valid loader) on the CPU; `with_loss`: per-item losses too."
    learn._refuse_nested('a prediction')
    if reduce is not None and reduce != 'argmax' and not callable(reduce):
        raise ValueError(f"reduce must be None, 'argmax' or a callable, got {reduce!r}")
    if act is not None and not callable(act): raise TypeError(f'act must be callable, got {act!r}')
    if with_loss and learn.loss_func is None:
        raise ValueError('with_loss=True needs a loss_func: per-item losses come from loss_func(..., reduction="none"); '
                         'this model computes its own loss')
    collect = Collect(act, reduce, with_loss, pad_value)
    dl = learn.dls.valid if dl is None else dl
    learn.execute(Run('predict', [(dl, False)], n_inp=learn.n_inp if n_inp is None else n_inp,
                      label_names=learn.label_names), [collect])
    return collect.result()

def infer(learn, *inputs) -> torch.Tensor:
    "The model's output for one batch of inputs, through the input subscribers (device, normalization), on the CPU."
    if not inputs: raise TypeError('infer needs inputs: learn.infer(x), learn.infer(x1, x2) or learn.infer(batch_dict)')
    if len(inputs) == 1 and isinstance(inputs[0], Mapping): return get_preds(learn, [inputs[0]])[0]
    return get_preds(learn, [tuple(inputs)], n_inp=len(inputs))[0]

# %% tta
class TTAViews(Subscriber):
    "During a `tta` pass: after each plain prediction, predict augmented views and blend them in."
    order, runs = Order.TTA, ('predict',)

    def __init__(self, views: list, beta: float, act: Callable | None, key: str | None = None):
        self.views, self.beta, self.act, self.key = views, beta, act or (lambda p: p), key

    def after_predict(self, learn):
        run = learn.run
        xb, plain, total = run.xb, self.act(learn.preds), 0.
        try:
            for transform, undo in self.views:
                run.xb = set_input(xb, transform(get_input(xb, self.key)), self.key)
                learn.run_step('predict')   # the predict step, or the subscriber providing it, in its wrappers
                total = total + self.act(learn.preds if undo is None else undo(learn.preds))
        finally: run.xb = xb
        learn.preds = torch.lerp(total / len(self.views), plain, self.beta) if self.views else plain

def _views(transform, undo, n: int) -> list:
    "(transform, undo) pairs: `n` draws of one random transform, or one view per transform of a list."
    if isinstance(transform, (list, tuple)):
        undo = list(undo) if isinstance(undo, (list, tuple)) else [undo] * len(transform)
        if len(undo) != len(transform):
            raise ValueError(f'{len(transform)} transforms but {len(undo)} undo functions: give one per transform')
        return list(zip(transform, undo))
    return [(transform, undo)] * n

def tta(learn, dl=None,                           # a loader (default: the validation loader)
        n: int = 4,                               # augmented views of a random `transform`
        beta: float = 0.25,                       # the weight of the plain prediction
        transform: Callable | list | None = None, # inputs -> augmented inputs (default: the training augmentation's)
        undo: Callable | list | None = None,      # maps an augmented view's predictions back (e.g. flip masks back)
        act: Callable | None = None,              # applied to predictions before blending (e.g. softmax)
        reduce: str | Callable | None = None,     # as in `get_preds`
        key: str | None = None) -> tuple:         # the input to augment, when inputs are a mapping
    "Predictions for `dl` blended over augmented views: `(1 - beta) * mean(views) + beta * plain`."
    check_int('n', n, 0)
    check_number('beta', beta, 0, 1)
    if transform is None:   # the transforms of the subscribers that augment training batches (e.g. AugmentS)
        tfms = [t for s in learn.subs if (t := getattr(s, 'tta_transform', None)) is not None]
        if not tfms: raise ValueError('tta needs a `transform`, or an AugmentS subscriber whose transform it reuses')
        transform = tfms[0] if len(tfms) == 1 else _compose(tfms)
    for f in (transform if isinstance(transform, (list, tuple)) else [transform]):
        if not callable(f): raise TypeError(f'transform must be callable (or a list of them), got {f!r}')
    views = TTAViews(_views(transform, undo, n), beta, act, key)
    learn.add_subs(views)
    try: return get_preds(learn, dl, reduce=reduce)
    finally: learn.remove_subs(views)

def _compose(fs: list) -> Callable:
    def apply(x):
        for f in fs: x = f(x)
        return x
    return apply
