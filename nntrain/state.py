"""A learner's state: `state_dict` / `load_state_dict` (all or nothing), files (`save`, `load`, `load_weights`), resume."""

from __future__ import annotations

__all__ = ['FORMAT', 'plain_module', 'weight_problems', 'read_checkpoint', 'is_weights', 'WEIGHT_KEYS', 'find_weights', 'state_dict', 'state_problems', 'load_state_dict', 'save', 'load', 'load_weights', 'take_resume', 'resume_run']

import copy
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from .core import add_note, atomic_save, rng_state, to_device
from .data import loader_state, set_loader_state
from .run import Position

FORMAT = 2   # the layout of `Learner.state_dict`; raise it when the layout changes (2: phase totals, loader lengths)
_OPT_FLAGS = {'foreach', 'fused', 'differentiable', 'capturable', 'maximize', 'decoupled_weight_decay'}  # vary by torch

# %% helpers
def plain_module(model: nn.Module) -> nn.Module:
    "`model` without `torch.compile`'s wrapper: checkpoints hold the plain module's keys (no `_orig_mod.`)."
    return getattr(model, '_orig_mod', model)

def weight_problems(model: nn.Module, weights: dict) -> list[str]:
    "What stops `weights` from loading into `model`: missing and unexpected keys, different shapes (empty: it loads)."
    mine = model.state_dict()
    missing = [k for k in mine if k not in weights]
    extra = [k for k in weights if k not in mine]
    shapes = [f'{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}' for k, v in mine.items()
              if k in weights and isinstance(weights[k], torch.Tensor) and weights[k].shape != v.shape]
    out = []
    for what, keys in (('missing from the checkpoint', missing), ('not in this model', extra),
                       ('of another shape (checkpoint vs model)', shapes)):
        if keys: out.append(f'weights {what}: {", ".join(keys[:3])}{", ..." if len(keys) > 3 else ""}')
    return out

def read_checkpoint(path) -> dict:
    "Load a checkpoint file with `weights_only=True`; a file that is not one gets an error saying what it is."
    path = Path(path)
    if not path.is_file(): raise FileNotFoundError(f'no checkpoint file at {path}')
    try: return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Unsupported global' not in str(e):
            raise ValueError(f'{path} is not a readable checkpoint (truncated, or another program\'s file)') from e
        raise ValueError(f'{path} holds Python objects other than tensors and containers, so it was not written by '
                         'nntrain and is not loaded (loading it could run code). If you trust its source: '
                         'torch.load(path, weights_only=False), then load what you need yourself.') from e
    except Exception as e:
        raise ValueError(f'{path} is not a readable checkpoint (truncated, or another program\'s file): '
                         f'{type(e).__name__}: {e}') from e

def is_weights(state) -> bool:
    "Is `state` a model's `state_dict` (names to tensors)?"
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())

WEIGHT_KEYS = ('model', 'state_dict', 'model_state_dict')
"Where checkpoints written by other code keep a model's weights (nntrain, Lightning, common scripts)."

def find_weights(state) -> dict | None:
    "The model weights in a checkpoint: the state itself when it is a `state_dict`, else under one of `WEIGHT_KEYS`."
    if is_weights(state): return state
    if isinstance(state, dict):
        return next((state[k] for k in WEIGHT_KEYS if is_weights(state.get(k))), None)
    return None

def _sub_keys(learn) -> list[tuple[str, object]]:
    "A stable key per subscriber: its class name, numbered when a class appears more than once."
    seen, keys = {}, []
    for s in learn.subs:
        name = type(s).__name__
        seen[name] = seen.get(name, 0) + 1
        keys.append((name if seen[name] == 1 else f'{name}#{seen[name]}', s))
    return keys

def _loader_size(dl) -> dict | None:
    "What a mid-epoch resume needs to match: the number of batches and the batch size."
    if dl is None or not hasattr(dl, '__len__'): return None
    return {'n_batches': len(dl), 'batch_size': getattr(dl, 'batch_size', None)}

# %% state_dict
def state_dict(learn) -> dict:
    "Everything needed to continue this run exactly: weights, optimizer, counters, history, RNG, loaders, subscribers."
    run = learn.run if learn.run is not None and learn.run.kind == 'fit' else None
    n_epochs, pos = (run.n_epochs, run.pos) if run is not None else learn._fit_end
    phase = None
    if run is not None and pos.done:   # mid-phase: the phase's loss so far (its row must cover the whole phase)
        phase = {'loss': run.losses.state_dict(), 'time': run.phase_seconds()}
    dls = {'train': learn.dls.train, 'valid': learn.dls.valid}
    return {'format': FORMAT,
            'model': plain_module(learn.model).state_dict(),
            'opt': None if learn.opt is None else learn.opt.state_dict(),
            'opt_type': None if learn.opt is None else type(learn.opt).__name__,
            'counters': {'global_step': learn.global_step, 'n_epochs': n_epochs, 'position': list(pos),
                         'loaders': {n: _loader_size(dl) for n, dl in dls.items()}},
            'phase': phase,
            'history': [dict(row) for row in learn.history],
            'rng': rng_state(),
            'loaders': {n: loader_state(dl) for n, dl in dls.items()},
            'subs': {k: s.state_dict() for k, s in _sub_keys(learn) if callable(getattr(s, 'state_dict', None))}}

# %% checking a state before loading it
def _opt_problems(learn, saved: dict, saved_type: str | None) -> list[str]:
    "What stops a saved optimizer state from loading into this learner's optimizer."
    opt = learn.opt if learn.opt is not None else learn._new_opt(learn.lr)   # a probe, thrown away
    if saved_type is not None and saved_type != type(opt).__name__:
        return [f'the optimizer state is from {saved_type}, but this learner uses {type(opt).__name__}']
    groups = saved.get('param_groups', [])
    if [len(g['params']) for g in groups] != [len(g['params']) for g in opt.param_groups]:
        return [f'the optimizer state has param groups of sizes {[len(g["params"]) for g in groups]}, this optimizer '
                f'{[len(g["params"]) for g in opt.param_groups]}']
    lacking = set(opt.param_groups[0]) - set(groups[0]) - _OPT_FLAGS - {'params'} if groups else set()
    if lacking: return [f'the optimizer state lacks hyper-parameters {sorted(lacking)}: another kind of optimizer']
    return []

def state_problems(learn, state, with_opt: bool) -> list[str]:
    "Everything that differs between `state` and this learner, checked before anything is changed."
    if not isinstance(state, dict) or not {'model', 'counters'} <= set(state):
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        found = find_weights(state)
        advice = ('it holds model weights, which learn.load_weights(path) loads' if found is not None else
                  f'nor does it hold model weights (under {", ".join(map(repr, WEIGHT_KEYS))})')
        return [f'this is not a learner state (it has {keys}); {advice}']
    if state.get('format', 1) > FORMAT:
        return [f'written by a newer nntrain (format {state["format"]}); this one reads format {FORMAT} or older']
    problems = weight_problems(plain_module(learn.model), state['model'])
    if with_opt and state.get('opt') is not None: problems += _opt_problems(learn, state['opt'], state.get('opt_type'))
    keys = dict(_sub_keys(learn))
    missing = [k for k in state.get('subs', {}) if k not in keys]
    if missing:
        names = ', '.join(f'{k.split("#")[0]}(...)' for k in missing)
        problems.append(f'the checkpoint holds the state of subscribers this learner lacks: {missing}; add them '
                        f'({names}) to continue the run exactly')
    return problems

# %% loading
def load_state_dict(learn, state: dict, with_opt: bool = True) -> None:
    "Restore a `state_dict` (all of it or, on any mismatch, nothing); `fit(n_epochs, resume=True)` then continues it."
    if learn.run is not None: raise RuntimeError(f'cannot load a state during a {learn.run.kind}')
    problems = state_problems(learn, state, with_opt)
    if problems:
        hint = (' Nothing was changed. To start from its weights only: learn.load_weights(path); without its '
                'optimizer state: learn.load(path, with_opt=False).')
        raise ValueError('cannot load this checkpoint into this learner: ' + '; '.join(problems) + '.' + hint)
    # a copy to put back if a subscriber refuses its state: on the CPU, not a second model in accelerator memory
    backup = copy.deepcopy(to_device({k: v for k, v in state_dict(learn).items() if k != 'rng'}, 'cpu'))
    opt, resume = learn.opt, learn._resume
    try: _apply(learn, state, with_opt)
    except BaseException as e:   # a subscriber refused its state: put back what was already applied
        learn.opt = opt
        _apply(learn, backup, with_opt=opt is not None)
        learn._resume = resume
        add_note(e, 'nntrain: the load failed part way; the learner was put back as it was')
        raise

def _apply(learn, state: dict, with_opt: bool) -> None:
    plain_module(learn.model).load_state_dict(state['model'])
    if with_opt and state.get('opt') is not None:
        if learn.opt is None: learn.opt = learn._new_opt(learn.lr)
        learn.opt.load_state_dict(state['opt'])
    counters = state['counters']
    learn.global_step = counters['global_step']
    learn._fit_end = (counters['n_epochs'], Position(*counters['position']))
    learn.history = [dict(row) for row in state['history']]
    for name, dl in (('train', learn.dls.train), ('valid', learn.dls.valid)):
        set_loader_state(dl, state['loaders'].get(name))
    keys = dict(_sub_keys(learn))
    for k, sub_state in state['subs'].items(): keys[k].load_state_dict(sub_state)
    learn._resume = None if 'rng' not in state else {
        'n_epochs': counters['n_epochs'], 'start': Position(*counters['position']), 'rng': state['rng'],
        'phase': state.get('phase'), 'loaders': counters.get('loaders', {})}

def save(learn, path) -> Path:
    "Write `state_dict()` to `path` atomically (temporary file, fsync, rename); distributed, call it on every rank."
    state = learn.state_dict()   # on every rank: gathering it may be a collective (each rank's RNG, sharded weights)
    return atomic_save(state, path) if learn.is_main else Path(path)

def load(learn, path, with_opt: bool = True):
    "Load a file written by `save` (no pickled code runs); a bare model `state_dict` file loads as weights."
    state = read_checkpoint(path)
    if is_weights(state): return load_weights(learn, path, state)
    learn.load_state_dict(state, with_opt)
    return learn

def load_weights(learn, path, state: dict | None = None):
    "Load only the model's weights from a checkpoint (nntrain's, or a dict holding a `state_dict`); nothing else changes."
    state = read_checkpoint(path) if state is None else state
    weights = find_weights(state)
    if weights is None:
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f'{path} holds no model weights (it has {keys}; looked for a state_dict, or one under '
                         f'{", ".join(map(repr, WEIGHT_KEYS))})')
    problems = weight_problems(plain_module(learn.model), weights)
    if problems:
        raise ValueError(f'cannot load {path} into this model: ' + '; '.join(problems) + '. Nothing was changed.')
    plain_module(learn.model).load_state_dict(weights)
    return learn

# %% resuming
def take_resume(learn, n_epochs: int, lr, reset_opt: bool) -> dict:
    "The loaded checkpoint's resume point, checked against this fit before anything changes (then it is used up)."
    r = learn._resume
    if r is None: raise ValueError('fit(resume=True) needs a state loaded with learn.load(path) first')
    if n_epochs != r['n_epochs']:
        raise ValueError(f'the checkpoint was taken in a fit of {r["n_epochs"]} epochs; resume it with '
                         f'fit({r["n_epochs"]}, resume=True): schedules depend on the length of the fit')
    if lr is not None or reset_opt: raise ValueError('fit(resume=True) continues the saved optimizer: no lr or reset_opt')
    start = r['start']
    for name, dl in (('train', learn.dls.train), ('valid', learn.dls.valid)):
        saved, now = r['loaders'].get(name), _loader_size(dl)
        if saved is None or now is None or saved == now: continue
        mid = start.done and (start.training == (name == 'train'))
        what = (f'{saved["n_batches"]} batches of {saved["batch_size"]}' if saved['batch_size'] else
                f'{saved["n_batches"]} batches')
        now_what = f'{now["n_batches"]} batches of {now["batch_size"]}' if now['batch_size'] else f'{now["n_batches"]}'
        if mid:
            raise ValueError(f'the checkpoint was taken mid-epoch with a {name} loader of {what}; this one has '
                             f'{now_what}: the resumed epoch would skip other items and take another number of steps. '
                             'Resume with the same data and batch size')
        if name == 'train':
            warnings.warn(f'resuming with a training loader of {now_what} where the checkpoint had {what}: the '
                          'remaining epochs take another number of steps, so schedules and step counts differ from '
                          'the uninterrupted run', RuntimeWarning, stacklevel=3)
    learn._resume = None
    return r

def resume_run(run, r: dict) -> None:
    "Set `run` to continue where the checkpoint stopped: its random state, and the interrupted phase's totals."
    run.resume_rng = r['rng']
    if r.get('phase'):
        run.losses.load_state_dict(r['phase']['loss'])
        run.elapsed = r['phase']['time']
