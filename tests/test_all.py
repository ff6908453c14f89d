"`from nntrain.all import *`: every module's public names, torch/nn/F and torcheval metrics, and nothing private."
import importlib, pkgutil, re, subprocess, sys, textwrap, warnings
from pathlib import Path

import nntrain

ROOT = Path(__file__).resolve().parent.parent
NOT_IN_ALL = {'nntrain.all', 'nntrain.cli', 'nntrain.__main__', 'nntrain._modidx',   # the command line is not API
              'nntrain.testing'}                                                   # nor are test fixtures


def modules() -> list[str]:
    "Every module of the package (subpackages included), so a module added later is checked without editing this."
    names = [m.name for m in pkgutil.walk_packages(nntrain.__path__, 'nntrain.') if not m.ispkg]
    return sorted(n for n in names if n not in NOT_IN_ALL and not n.rsplit('.', 1)[1].startswith('_'))


def quiet_import(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return importlib.import_module(name)


def test_every_module_is_covered():
    all_ = quiet_import('nntrain.all')
    missing = {}
    for name in modules():
        mod = quiet_import(name)
        assert hasattr(mod, '__all__'), f'{name} has no __all__'
        lost = [n for n in mod.__all__ if n not in all_.__all__ or getattr(all_, n, None) is not getattr(mod, n)]
        if lost: missing[name] = lost
    if missing:
        imports = '\n'.join(f'from {m} import ' + ', '.join(ns) for m, ns in missing.items())
        names = ', '.join(repr(n) for ns in missing.values() for n in ns)
        raise AssertionError(
            f'nntrain.all misses public names of {sorted(missing)}. In nbs/99_all.ipynb add\n'
            f'{textwrap.indent(imports, "    ")}\nto the imports cell and\n    {names}\nto `_all_`, then nbdev-export.')


def test_public_names_only():
    all_ = quiet_import('nntrain.all')
    assert not [n for n in all_.__all__ if n.startswith('_')]
    assert len(set(all_.__all__)) == len(all_.__all__), 'a name is listed twice'
    ns = {}
    exec('from nntrain.all import *', ns)
    assert sorted(n for n in ns if n != '__builtins__') == sorted(all_.__all__)
    import torch
    from torcheval.metrics import MulticlassAccuracy
    assert ns['torch'] is torch and ns['nn'] is torch.nn and ns['F'] is torch.nn.functional
    assert ns['MulticlassAccuracy'] is MulticlassAccuracy
    for n in ('Learner', 'DataLoaders', 'MetricsS', 'DeviceS', 'ProgressS', 'LRFindS', 'MulticlassF1Score',
              'MeanSquaredError', 'BinaryAccuracy'):
        assert n in ns, n


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_no_future_warning_and_narrow_filter():
    "torcheval's `torch.jit.script` FutureWarning is silenced while it is imported, and only then."
    r = run('-W', 'error::FutureWarning', '-c', 'from nntrain.all import *')
    assert r.returncode == 0 and 'Warning' not in r.stderr, r.stderr
    # afterwards the same warning, raised by the user's own code, still shows
    code = ('import warnings, nntrain.all; '
            'warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile`", FutureWarning)')
    r = run('-W', 'error::FutureWarning', '-c', code)
    assert r.returncode == 1 and 'FutureWarning: `torch.jit.script` is deprecated' in r.stderr, r.stderr


def test_import_nntrain_is_light():
    "`import nntrain` imports no submodule, so neither torch.distributed nor torcheval."
    r = run('-X', 'importtime', '-c', 'import nntrain')
    assert r.returncode == 0, r.stderr
    imported = {m.group(1) for m in re.finditer(r'\|\s+(\S+)\s*$', r.stderr, re.M)}
    assert 'nntrain' in imported
    heavy = sorted(m for m in imported if m.split('.')[0] in ('torch', 'torcheval') or m.startswith('nntrain.'))
    assert not heavy, heavy
