"""Execute the notebooks in fresh Jupyter kernels and store their outputs, or check that stored outputs are current.

    python tools/run_notebooks.py                     # execute every notebook in nbs/, write the outputs back
    python tools/run_notebooks.py nbs/03_learner.ipynb nbs/90_ablation.ipynb
    python tools/run_notebooks.py --check             # CI: every notebook holds outputs of its current code

Each executed notebook records, in its metadata (`nntrain`, kept by nbdev-clean through `allowed_metadata_keys`),
a hash of its code cells, of the library (`nntrain/**/*.py`) and of its outputs. `--check` fails when a notebook
has no such record, when its code or the library changed since it was executed, or when its outputs were removed
or edited by hand. So after a change to the library, run them all again (a few minutes on two cores). Cells marked
`#| eval: false` are not run (their outputs stay empty).
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'
KEY = 'nntrain'


def notebooks(paths=()) -> list[Path]:
    "The notebooks to work on: those given, else every notebook in nbs/ whose name does not start with `_`."
    if paths: return [Path(p).resolve() for p in paths]
    return sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith('_'))


def _skipped(cell) -> bool:
    return any(line.strip().replace(' ', '') == '#|eval:false' for line in cell.source.splitlines()[:5])


def code_hash(nb) -> str:
    "A hash of the notebook's code cells, in order: what the outputs were made from."
    h = hashlib.sha256()
    for c in nb.cells:
        if c.cell_type == 'code': h.update(c.source.encode() + b'\0')
    return h.hexdigest()


def library_hash() -> str:
    "A hash of the library (nntrain/**/*.py): outputs made by older library code are stale too."
    h = hashlib.sha256()
    for p in sorted((ROOT / 'nntrain').rglob('*.py')):
        if p.name != '_modidx.py': h.update(str(p.relative_to(ROOT)).encode() + b'\0' + p.read_bytes() + b'\0')
    return h.hexdigest()


def outputs_hash(nb) -> str:
    "A hash of every code cell's outputs, as stored (after nbdev-clean)."
    outs = [c.get('outputs', []) for c in nb.cells if c.cell_type == 'code']
    return hashlib.sha256(json.dumps(outs, sort_keys=True).encode()).hexdigest()


def _clean(path: Path) -> None:
    "Apply nbdev-clean (as configured in pyproject.toml), so the stored outputs are exactly what CI will see."
    from nbdev.clean import nbdev_clean
    nbdev_clean(fname=str(path))


def execute(path: Path, timeout: int = 900) -> float:
    "Run `path` top to bottom in a fresh kernel (working directory: nbs/), store outputs and the hashes."
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    start = time.time()
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(NBS)}})
    # plots inline, as in Jupyter, even where the environment sets MPLBACKEND=Agg
    env = {**os.environ, 'MPLBACKEND': 'module://matplotlib_inline.backend_inline'}
    with client.setup_kernel(env=env):
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != 'code': continue
            if _skipped(cell): cell.outputs = []; continue
            client.execute_cell(cell, i)
    nbformat.write(nb, path)
    _clean(path)
    nb = nbformat.read(path, as_version=4)
    nb.metadata[KEY] = {'code_sha256': code_hash(nb), 'library_sha256': library_hash(),
                        'outputs_sha256': outputs_hash(nb)}
    nbformat.write(nb, path)
    _clean(path)
    return time.time() - start


def check(path: Path, library: str) -> str | None:
    "Why `path`'s stored outputs are not current, or None when they are."
    nb = nbformat.read(path, as_version=4)
    rec = nb.metadata.get(KEY)
    if not rec: return 'never executed with tools/run_notebooks.py (no outputs record)'
    if rec.get('code_sha256') != code_hash(nb): return 'its code changed since it was executed'
    if rec.get('library_sha256') != library: return 'the library (nntrain/) changed since it was executed'
    if rec.get('outputs_sha256') != outputs_hash(nb): return 'its outputs were removed or edited since it was executed'
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('notebooks', nargs='*', help='notebooks to run (default: all of nbs/)')
    p.add_argument('--check', action='store_true', help='only check that stored outputs are current')
    args = p.parse_args(argv)
    paths = notebooks(args.notebooks)
    if args.check:
        library = library_hash()
        stale = [(p, why) for p in paths if (why := check(p, library))]
        for p, why in stale:
            print(f'{p.relative_to(ROOT)}: {why}; run: python tools/run_notebooks.py {p.relative_to(ROOT)}')
        print(f'{len(paths) - len(stale)} of {len(paths)} notebooks hold outputs of their current code')
        return 1 if stale else 0
    failed = []
    for p in paths:
        print(f'{p.relative_to(ROOT)}: ', end='', flush=True)
        try: print(f'{execute(p):.1f} s')
        except Exception as e:   # the others still run; the notebook keeps its old outputs and fails --check
            failed.append(p.name)
            print(f'FAILED: {type(e).__name__}: {str(e)[-2000:]}')
    if failed: print(f'{len(failed)} notebook(s) failed: {", ".join(failed)}')
    return 1 if failed else 0


if __name__ == '__main__': sys.exit(main())
