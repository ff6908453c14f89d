"""How much disk each of nntrain's direct dependencies brings: one fresh venv per requirement, `pip install`, `du`.

    python tools/env_size.py                                  # the direct dependencies in pyproject.toml
    python tools/env_size.py 'fastprogress<1.1' 'torch==2.14.1'  # or any requirements, one venv each
    python tools/env_size.py --together '-e .' 'fastprogress<1.1'   # one venv for all of them (quote '-e .')

Prints a markdown table: the requirement, what the venv holds beyond an empty venv (MB), and the distributions pip
installed. Each venv is made in a temporary folder and deleted after measuring. Needs a package index (or pip's
find-links) that holds the packages, and several GB of free disk for torch.
"""
from __future__ import annotations

import argparse, os, shlex, subprocess, sys, tempfile, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def du(path: Path) -> int:
    "Bytes under `path` (files only; hard links counted once)."
    seen, total = set(), 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if (st.st_dev, st.st_ino) in seen: continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def venv_size(pip_args: list[str], python: str = sys.executable) -> tuple[int, list[str]]:
    "(bytes added to an empty venv by `pip install *pip_args`, the distributions it installed)."
    with tempfile.TemporaryDirectory(prefix='nntrain-envsize-') as tmp:
        env = Path(tmp) / 'venv'
        subprocess.run([python, '-m', 'venv', str(env)], check=True)
        empty = du(env)
        py = str(env / 'bin' / 'python')
        subprocess.run([py, '-m', 'pip', 'install', '-q', '--no-cache-dir', *pip_args], check=True, cwd=ROOT)
        # the venv's own pip is part of the empty venv; what was installed is everything else
        frozen = subprocess.run([py, '-m', 'pip', 'list', '--format=freeze', '--exclude', 'pip',
                                 '--exclude', 'setuptools'], check=True, capture_output=True, text=True).stdout
        return du(env) - empty, frozen.split()


def direct_dependencies() -> list[str]:
    return tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['dependencies']


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('requirements', nargs='*', help='requirements to measure (default: pyproject dependencies)')
    ap.add_argument('--together', action='store_true', help='one venv for all the arguments (passed to pip install)')
    a = ap.parse_args(argv)
    # a requirement may carry pip options ('torchvision==0.29.1 --no-deps')
    split = [shlex.split(r) for r in a.requirements or direct_dependencies()]
    groups = [[x for r in split for x in r]] if a.together else split
    print('| requirement | MB | installs |\n|---|---:|---|')
    for args in groups:
        size, dists = venv_size(args)
        print(f'| `{" ".join(args)}` | {size / 1e6:,.0f} | {len(dists)}: {", ".join(dists)} |', flush=True)


if __name__ == '__main__':
    main()
