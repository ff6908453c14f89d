"""Rewrite nbs/99_all.ipynb's import cells from every module's `__all__` (after adding a module; then nbdev-export).

    python tools/gen_all.py

`tests/test_all.py` fails when `nntrain.all` misses a public name, so a forgotten run is noticed.
"""
import importlib
import pkgutil
import sys
import textwrap
from pathlib import Path

from fastcore.nbio import Notebook

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SKIP = {'nntrain.all', 'nntrain.cli', 'nntrain.__main__', 'nntrain.testing', 'nntrain._modidx'}
EXTRA = ['torch', 'nn', 'F']   # and the torcheval metrics of the cell above, read from it
IMPORTS_CELL, ALL_CELL, METRICS_CELL = 'f416363f', 'c3ecd775', 'd0c98673'


def modules() -> list[str]:
    import nntrain
    names = [m.name for m in pkgutil.walk_packages(nntrain.__path__, 'nntrain.')]
    return sorted(n for n in names if n not in SKIP and not n.split('.')[-1].startswith('_'))


def main() -> None:
    seen, lines = set(), []
    for name in modules():
        mod = importlib.import_module(name)
        public = [n for n in getattr(mod, '__all__', []) if n not in seen and not n.startswith('_')]
        if not public: continue
        seen.update(public)
        body = ', '.join(public)
        line = f'from {name} import {body}'
        if len(line) <= 120: lines.append(line)
        else: lines.append(f'from {name} import (\n' + textwrap.fill(body, 116, initial_indent='    ',
                                                                     subsequent_indent='    ') + ')')
    nb = Notebook.open(ROOT / 'nbs/99_all.ipynb')
    metrics_src = nb[METRICS_CELL].source
    metrics = metrics_src[metrics_src.index('import (') + 8:metrics_src.rindex(')')].replace('\n', ' ').split(',')
    metrics = [m.strip() for m in metrics if m.strip()]
    nb[IMPORTS_CELL].source = '#| export\n' + '\n'.join(lines)
    names = EXTRA + metrics + [n for n in sum(([n] for n in _ordered(lines)), [])]
    nb[ALL_CELL].source = '#| export\n_all_ = [' + textwrap.fill(', '.join(repr(n) for n in names), 110,
                                                                  subsequent_indent='         ') + ']'
    nb.save()
    print(f'{len(names)} names from {len(lines)} modules')


def _ordered(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        body = line.split(' import ', 1)[1].strip('()\n ')
        out += [n.strip() for n in body.replace('\n', ' ').split(',') if n.strip()]
    return out


if __name__ == '__main__': main()
