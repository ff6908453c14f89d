"Every notebook in nbs/ runs top to bottom as a test case (cells flagged `notest`/`slow` are skipped)."
from pathlib import Path
import pytest
import nbdev.test as nbt            # imported as a module so pytest does not collect `test_nb` itself
from nbdev.config import get_config

ROOT = Path(__file__).resolve().parent.parent
FLAGS = get_config(ROOT).tst_flags.split()
NBS = sorted(p for p in (ROOT / 'nbs').glob('*.ipynb') if not p.name.startswith('_'))

@pytest.mark.parametrize('nb', NBS, ids=[p.name for p in NBS])
def test_notebook(nb):
    ok, _secs = nbt.test_nb(nb, skip_flags=FLAGS, basepath=ROOT)
    assert ok, f'{nb.name} failed; its traceback is printed above'
