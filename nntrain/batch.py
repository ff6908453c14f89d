"""The batch protocol: how any batch splits into inputs and targets, how the model is called, what its output holds."""

from __future__ import annotations

__all__ = ['LABEL_NAMES', 'split_batch', 'join_batch', 'describe', 'leaves', 'batch_size', 'get_input', 'set_input', 'call_model', 'output_preds', 'output_loss', 'is_index', 'class_dim', 'layout_name', 'check_inputs', 'check_targets', 'check_loss', 'per_item_loss', 'cat_items']

from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

LABEL_NAMES = ('labels', 'label')
"The entries of a mapping batch that are targets, unless a learner or its loaders name others (Hugging Face's names)."

# %% split
def _remade(mapping: Mapping, items: dict) -> Mapping:
    "`items` as the same kind of mapping as `mapping` (a dict, a Hugging Face `BatchEncoding`), else a dict."
    if type(mapping) is dict: return items
    try: return type(mapping)(items)
    except Exception: return items

def split_batch(batch, n_inp: int | None = None, label_names=LABEL_NAMES) -> tuple[tuple, tuple]:
    "`(inputs, targets)`, both tuples: a sequence split by `n_inp` (default: all but the last), a mapping by `label_names`."
    if isinstance(batch, Mapping):
        keys = [k for k in label_names if k in batch]
        inputs = _remade(batch, {k: v for k, v in batch.items() if k not in keys}) if keys else batch
        return (inputs,), tuple(batch[k] for k in keys)
    if isinstance(batch, (tuple, list)):
        n = (max(len(batch) - 1, 1) if n_inp is None else n_inp)
        if not 0 < n <= len(batch):
            raise ValueError(f'n_inp={n_inp} cannot split a batch of {len(batch)} items ({describe(batch)}): it '
                             f'must be in 1..{len(batch)}')
        return tuple(batch[:n]), tuple(batch[n:])
    return (batch,), ()   # a bare tensor (or any other object): one input, no targets

def join_batch(batch, xb: tuple, yb: tuple, label_names=LABEL_NAMES):
    "The batch made of inputs `xb` and targets `yb` with the structure of `batch` (the inverse of `split_batch`)."
    if isinstance(batch, Mapping):
        keys = [k for k in label_names if k in batch]
        if len(xb) != 1 or not isinstance(xb[0], Mapping) or len(yb) != len(keys):
            raise ValueError(f'a mapping batch has one mapping of inputs and {len(keys)} targets ({keys}); got '
                             f'{len(xb)} inputs and {len(yb)} targets')
        return _remade(batch, {**xb[0], **dict(zip(keys, yb))})
    if isinstance(batch, (tuple, list)): return type(batch)((*xb, *yb)) if type(batch) in (tuple, list) else (*xb, *yb)
    if yb: raise ValueError(f'a batch of inputs only cannot take targets; got {len(yb)}')
    return xb[0] if len(xb) == 1 else tuple(xb)

# %% describing
def describe(o) -> str:
    "A short description of a batch or output for error messages: shapes and dtypes, not values."
    if isinstance(o, torch.Tensor): return f'tensor {tuple(o.shape)} {str(o.dtype).replace("torch.", "")}'
    if isinstance(o, Mapping): return '{' + ', '.join(f'{k!r}: {describe(v)}' for k, v in list(o.items())[:8]) + '}'
    if isinstance(o, (tuple, list)) and len(o) <= 8:
        inner = ', '.join(describe(v) for v in o)
        return f'({inner},)' if isinstance(o, tuple) and len(o) == 1 else f'({inner})' if isinstance(o, tuple) else f'[{inner}]'
    return type(o).__name__

def leaves(o):
    "The tensors in `o` (nested tuples, lists, mappings), in order."
    if isinstance(o, torch.Tensor): yield o
    elif isinstance(o, Mapping):
        for v in o.values(): yield from leaves(v)
    elif isinstance(o, (tuple, list)):
        for v in o: yield from leaves(v)

def batch_size(xb: tuple, yb: tuple = ()) -> int:
    "How many items a batch holds: the length of its first tensor (inputs first, then targets); 1 if it has none."
    t = next((t for t in leaves((xb, yb)) if t.ndim), None)
    return 1 if t is None else len(t)

# %% inputs
def get_input(xb: tuple, key: str | None = None):
    "The main input of a batch's inputs: the first, or entry `key` of a mapping of inputs."
    x = xb[0]
    if isinstance(x, Mapping):
        if key is None: raise ValueError(f'the inputs are a mapping ({describe(x)}): say which entry to use (key=...)')
        if key not in x: raise KeyError(f'the inputs have no entry {key!r}; they have {list(x)}')
        return x[key]
    return x

def set_input(xb: tuple, value, key: str | None = None) -> tuple:
    "`xb` with its main input (as `get_input` finds it) replaced by `value`."
    x = xb[0]
    if isinstance(x, Mapping): return (_remade(x, {**x, key: value}), *xb[1:])
    return (value, *xb[1:])

# %% calling the model
def call_model(model: nn.Module, inputs: tuple):
    "`model(*inputs)`; a single mapping of inputs (a dict batch) is passed as keyword arguments, `model(**inputs[0])`."
    if len(inputs) == 1 and isinstance(inputs[0], Mapping): return model(**inputs[0])
    return model(*inputs)

def _field(out, name: str):
    if isinstance(out, Mapping): return out.get(name)
    return getattr(out, name, None) if not isinstance(out, (torch.Tensor, tuple, list)) else None

def output_preds(out):
    "The predictions in a model's output: its `logits` (key or attribute) when it has them, else the output itself."
    logits = _field(out, 'logits')
    return out if logits is None else logits

def output_loss(out) -> torch.Tensor:
    "The loss a model computed itself: its output's `loss` (key or attribute); an error that says so when there is none."
    loss = _field(out, 'loss')
    if loss is None:
        raise ValueError(f'loss_func=None means the model computes its own loss, but its output ({describe(out)}) has '
                         'no `loss` (a key or an attribute). Give the model the targets and return one, or pass a '
                         'loss_func')
    return loss

# %% layouts
def is_index(y) -> bool:
    "Are `y` integer class indices (not floats, complex numbers or booleans)?"
    return isinstance(y, torch.Tensor) and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)

def class_dim(preds, y) -> int | None:
    "Where `preds` holds class scores for labels `y`: 1 for `(B, C, ...)` with `y` `(B, ...)`, -1 for `(B, ..., C)` with `y` `(B, ...)`; else None."
    if not (isinstance(preds, torch.Tensor) and isinstance(y, torch.Tensor)) or preds.ndim != y.ndim + 1: return None
    if preds.shape[:1] + preds.shape[2:] == y.shape: return 1   # torch's losses: classes on dim 1 (also (B, C))
    if preds.shape[:-1] == y.shape: return -1                     # a language model's (B, T, V) with (B, T)
    return None

def layout_name(dim: int | None, preds=None, y=None) -> str:
    "How a message names the layout it assumed."
    shapes = '' if preds is None else f': scores {tuple(preds.shape)}, labels {tuple(y.shape)}'
    if dim == 1: return f'classes on dim 1 ((B, C, ...) with labels (B, ...){shapes})'
    if dim == -1: return f'classes on the last dim ((B, ..., C) with labels (B, ...){shapes})'
    return f'no class layout{shapes}'

# %% checks
def check_inputs(xb: tuple, yb: tuple, model: nn.Module | None = None) -> None:
    "Raise a clear error if inputs and targets disagree on batch size, or the inputs are on another device than the model."
    x = next((t for t in leaves(xb) if t.ndim), None)
    y = next((t for t in leaves(yb) if t.ndim), None)
    if x is not None and y is not None and len(x) != len(y):
        raise ValueError(f'inputs and targets disagree on batch size: inputs {describe(xb)}, targets {describe(yb)}')
    param = next(model.parameters(), None) if model is not None else None
    if x is not None and param is not None and x.device.type != param.device.type:
        raise RuntimeError(f'inputs are on {x.device} but the model is on {param.device}: add DeviceS() to the '
                           "subscribers, or build the loaders on the model's device")

def check_targets(preds, y, all_targets: torch.Tensor | None = None, ignore_index: int = -100,
                  where: str = 'this batch has') -> int | None:
    "Raise a clear error if labels `y` (or `all_targets`, when known) cannot be targets for `preds`; the class dim found."
    if not (isinstance(preds, torch.Tensor) and isinstance(y, torch.Tensor)) or not preds.is_floating_point(): return None
    if preds.ndim and y.ndim and len(preds) != len(y):
        raise ValueError(f'model output has batch size {len(preds)} but targets have {len(y)}: '
                         f'output {tuple(preds.shape)}, targets {tuple(y.shape)}')
    dim = class_dim(preds, y)
    if is_index(y) and dim is not None:
        labels = y if all_targets is None or all_targets.dtype != y.dtype else all_targets
        n_classes, kept = preds.shape[dim], labels != ignore_index
        lo = torch.where(kept, labels, torch.iinfo(labels.dtype).max).min()
        hi = torch.where(kept, labels, torch.iinfo(labels.dtype).min).max()
        lo, hi = torch.stack([lo, hi]).tolist()   # the one host sync, first batch only
        if lo <= hi and (lo < 0 or hi >= n_classes):   # some label is not ignored, and one is out of range
            where = where if labels is y else 'the targets have'
            raise ValueError(f'labels must be in [0, {n_classes}) for a model with {n_classes} outputs per item, '
                             f'but {where} labels in [{lo}, {hi}] (assumed {layout_name(dim, preds, y)})')
    elif y.is_floating_point() and dim is not None and preds.shape[dim] > 1:
        raise TypeError(f'the targets are floats ({str(y.dtype).replace("torch.", "")}) shaped like class labels '
                        f'for these scores ({layout_name(dim, preds, y)}): a classification loss needs integer '
                        'labels (e.g. y.long()); for regression, the model output should have the targets\' shape')
    elif y.is_floating_point() and preds.shape != y.shape:
        raise ValueError(f'model output {tuple(preds.shape)} and targets {tuple(y.shape)} differ in shape; a loss '
                         'would broadcast them silently. Reshape one (e.g. `preds.squeeze(-1)` or `y.view(-1, 1)`).')
    return dim

def check_loss(loss) -> None:
    "Raise a clear error unless `loss` is one number (a scalar tensor): a loss per item cannot be averaged silently."
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f'the loss must be a tensor, got {describe(loss)}')
    if loss.numel() != 1:
        raise ValueError(f'the loss is {describe(loss)}, not one number: reduce it to its mean '
                         "(e.g. `reduction='mean'`); nntrain weights each batch's mean loss by its size itself")

# %% per-item losses
def per_item_loss(loss_func: Callable, preds: torch.Tensor, *targets) -> torch.Tensor:
    "`loss_func(preds, *targets)` without reduction: one value per item (or per position)."
    if isinstance(loss_func, nn.Module) and hasattr(loss_func, 'reduction'):
        old, loss_func.reduction = loss_func.reduction, 'none'
        try: return loss_func(preds, *targets)
        finally: loss_func.reduction = old
    return loss_func(preds, *targets, reduction='none')

# %% concatenating
def cat_items(parts: list[torch.Tensor], pad_value: float | None = -100):
    "Per-batch tensors as one: concatenated, padded at the end of each dim with `pad_value` where shapes differ (None: a list of per-item tensors)."
    if not parts: return None
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) == 1: return torch.cat(parts)
    if pad_value is None: return [item for p in parts for item in p]
    if len({p.ndim for p in parts}) > 1:
        raise ValueError(f'cannot concatenate batches of different ranks: {sorted({tuple(p.shape) for p in parts})[:4]}')
    size = [max(s) for s in zip(*(p.shape[1:] for p in parts))]
    out = parts[0].new_full((sum(len(p) for p in parts), *size), pad_value)
    i = 0
    for p in parts:
        out[(slice(i, i + len(p)), *(slice(0, n) for n in p.shape[1:]))] = p
        i += len(p)
    return out
