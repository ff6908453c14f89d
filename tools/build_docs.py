"""Build nntrain's documentation site OFFLINE: one static HTML page per notebook in nbs/, with API entries.

    python tools/build_docs.py [--out _site] [--execute [NAME ...]] [--undocumented]

Each page reads as a library's documentation: the notebook's prose; an API entry where the notebook defines a public
name (signature, parameters with their `docments` descriptions, docstring, source folded); examples with their
outputs; implementation cells folded; a table of contents. Plus an index of the public names and a full-text search
(names, parameters, docstrings, prose) that runs in the browser from `search_index.js`.

No Quarto, no network: markdown is rendered with mistune (which nbconvert brings), code with Pygments, and
API entries (signature, docstring, docments parameters) with `inspect` and `fastcore.docments`. Notebooks are
rendered with whatever outputs they store; `--execute` runs them first with nbclient (all of them, or the
notebooks whose names contain one of the given words). A cell that fails while executing shows its error on its
page, and a notebook that cannot be rendered at all gets a page that says why; the build itself does not stop.
"""
from __future__ import annotations

import argparse, ast, base64, functools, html, importlib, inspect, json, os, re, shutil, sys, traceback, warnings
from dataclasses import dataclass, field
from pathlib import Path

import mistune
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / 'docs'
PKG = 'nntrain'
SKIP_FLAGS = ('notest', 'slow')  # cells that nbdev-test skips are skipped by --execute too (they may download)
ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')
_md = mistune.create_markdown(escape=False, plugins=['strikethrough', 'table', 'url', 'footnotes'])


# ---------------------------------------------------------------- notebooks

def directives(src: str) -> tuple[dict, str]:
    "The nbdev `#| key value` lines at the top of a code cell, and the source without them."
    lines, found = src.splitlines(), {}
    i = 0
    while i < len(lines) and (lines[i].startswith('#|') or not lines[i].strip()):
        if lines[i].startswith('#|'):
            key, _, val = lines[i][2:].strip().partition(' ')
            found[key.rstrip(':')] = val.strip()
        i += 1
    return found, '\n'.join(lines[i:]).strip('\n')


@dataclass
class NbInfo:
    path: Path
    nb: dict
    title: str
    summary: str
    module: str | None
    page: str = ''
    errors: list = field(default_factory=list)


def read_nb(path: Path) -> NbInfo:
    "Load a notebook with its title (first H1), one-line summary (first `>` line) and `default_exp` module."
    nb = json.loads(path.read_text(encoding='utf-8'))
    title, summary, module = path.stem, '', None
    for cell in nb.get('cells', []):
        src = ''.join(cell.get('source', ''))
        if cell.get('cell_type') == 'markdown' and title == path.stem:
            m = re.search(r'^#\s+(.+)$', src, re.M)
            if m: title = m.group(1).strip()
            m = re.search(r'^>\s*(.+)$', src, re.M)
            if m: summary = m.group(1).strip()
        if cell.get('cell_type') == 'code' and module is None:
            module = directives(src)[0].get('default_exp') or None
    return NbInfo(path, nb, title, summary, module, page=path.stem + '.html')


def execute_nb(info: NbInfo, timeout: int = 600) -> None:
    "Run the notebook's code cells in a fresh kernel (cwd: its folder), storing outputs; errors stay in the cells."
    from nbclient import NotebookClient
    import nbformat
    nb = nbformat.reads(json.dumps(info.nb), as_version=4)  # joins list sources into strings
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', allow_errors=True,
                            resources={'metadata': {'path': str(info.path.parent)}})
    # the kernel imports nntrain from this checkout, not from wherever it is installed
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])),
           'MPLBACKEND': 'module://matplotlib_inline.backend_inline'}  # plots inline even where MPLBACKEND=Agg
    try:
        with client.setup_kernel(env=env):
            for i, cell in enumerate(nb.cells):
                if cell.cell_type != 'code': continue
                flags, body = directives(cell.source)
                if not body or any(f in flags for f in SKIP_FLAGS) or flags.get('eval') == 'false': continue
                client.execute_cell(cell, i)
                for o in cell.outputs:
                    if o.output_type == 'error': info.errors.append(f'cell {i} ({cell.get("id")}) raised {o.ename}: '
                                                                    f'{o.evalue}; its traceback is on the page')
    except Exception as e:  # a dead kernel or a timeout: keep what ran, say what happened on the page
        info.errors.append(f'Executing the notebook stopped: {type(e).__name__}: {e}')
    info.nb = json.loads(nbformat.writes(nb))


# ---------------------------------------------------------------- API entries

@dataclass
class Entry:
    name: str        # `Learner.fit`; also the HTML id
    kind: str        # function, class, method, property, constant
    obj: object
    module: str
    children: list = field(default_factory=list)

    @property
    def doc(self) -> str:
        return (inspect.getdoc(self.obj) or '') if self.kind != 'constant' else ''

    @property
    def short(self) -> str:
        return self.doc.strip().split('\n')[0]

    @functools.cached_property
    def params(self) -> list[tuple[str, str, str, str]]:
        "`parameters(self)`, read once: the page's table and the search index both use them."
        return parameters(self)

    @property
    def fn(self):
        "What has the signature: the function, the property's getter, or the class."
        return _unwrap(self.obj)


def _unwrap(v):
    "The function behind a property, classmethod or staticmethod (fastcore's `@patch(cls_method=True)` too)."
    if isinstance(v, property): return v.fget
    if isinstance(v, (classmethod, staticmethod)): return v.__func__
    if type(v).__name__ == '_clsmethod': return v.f
    return v


def _loop_methods() -> set:
    "Names a subscriber implements for the learner to call (events, steps, step wrappers): not API a user calls."
    from nntrain.core import AROUNDS, EVENTS, STEPS
    return set(EVENTS) | set(STEPS) | set(AROUNDS)


def _is_public_member(cls, k, v) -> bool:
    if k.startswith('_'): return False
    fn = _unwrap(v)
    # written in this module (not generated by a base class elsewhere, as matplotlib's `Artist.set` is)
    if not (inspect.isfunction(fn) and getattr(fn, '__module__', None) == cls.__module__
            and fn.__code__.co_filename == inspect.getsourcefile(cls)): return False
    from nntrain.core import Subscriber
    return not (issubclass(cls, Subscriber) and k in _loop_methods())


def module_entries(modname: str, classes_seen: dict, documented: set) -> list[Entry]:
    "API entries for the names in `modname.__all__`; classes carry their public methods and properties."
    with warnings.catch_warnings():  # torcheval (imported by nntrain.cli) warns that torch.jit.script is deprecated
        warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
        mod = importlib.import_module(modname)
    out = []
    for name in getattr(mod, '__all__', []):
        obj = getattr(mod, name)
        # a re-export (nntrain.all: torch, torcheval metrics, names of earlier modules) is documented where defined
        if name in documented or inspect.ismodule(obj): continue
        if (inspect.isclass(obj) or callable(obj)) and not getattr(obj, '__module__', PKG).startswith(PKG): continue
        documented.add(name)
        if inspect.isclass(obj):
            e = Entry(name, 'class', obj, modname)
            for k, v in obj.__dict__.items():
                if _is_public_member(obj, k, v):
                    e.children.append(Entry(f'{name}.{k}', 'property' if isinstance(v, property) else 'method',
                                            v, modname))
            classes_seen[obj] = name
        elif callable(obj): e = Entry(name, 'function', obj, modname)
        else: e = Entry(name, 'constant', obj, modname)
        out.append(e)
    return out


def patched_entries(modname: str, classes_seen: dict) -> list[Entry]:
    "Methods that `modname` adds to classes of other modules with fastcore's `@patch` (`Learner.lr_find`...)."
    out = []
    for cls, cname in classes_seen.items():
        for k, v in cls.__dict__.items():
            if k.startswith('_'): continue
            fn = _unwrap(v)
            if inspect.isfunction(fn) and fn.__module__ == modname and cls.__module__ != modname:
                out.append(Entry(f'{cname}.{k}', 'property' if isinstance(v, property) else 'method', v, modname))
    return out


class _Raw:
    "Shows as its text in `inspect.Signature` (no quotes, no memory addresses)."
    def __init__(self, s): self.s = s
    def __repr__(self): return self.s


def fmt_value(v, limit: int = 60) -> str:
    if inspect.isclass(v) or inspect.isfunction(v) or inspect.isbuiltin(v):
        return getattr(v, '__qualname__', getattr(v, '__name__', repr(v)))
    if isinstance(v, __import__('functools').partial): return f'partial({fmt_value(v.func)}, ...)'
    s = re.sub(r' at 0x[0-9a-f]+', '', repr(v))
    return s if len(s) <= limit else s[:limit - 3] + '...'


def fmt_anno(a) -> str:
    if a is inspect.Parameter.empty: return ''
    if isinstance(a, str): return a
    if inspect.isclass(a): return a.__qualname__
    return re.sub(r'\btyping\.', '', repr(a))


def signature(obj, method: bool = False) -> str:
    "`(a: int = 1, *, b=None) -> str` without addresses or quoted string annotations; '' when there is none."
    try: sig = inspect.signature(obj)
    except (TypeError, ValueError): return ''
    ps = list(sig.parameters.values())
    if method and ps and ps[0].name in ('self', 'cls'): ps = ps[1:]   # `learn.fit(n_epochs)`, as it is called
    params = [p.replace(annotation=_Raw(fmt_anno(p.annotation)) if p.annotation is not p.empty else p.empty,
                        default=_Raw(fmt_value(p.default)) if p.default is not p.empty else p.empty)
              for p in ps]
    ret = sig.return_annotation
    sig = sig.replace(parameters=params, return_annotation=_Raw(fmt_anno(ret)) if ret is not sig.empty else sig.empty)
    return str(sig)


def _own_init(cls) -> bool:
    "Does the class (or a base of it inside nntrain) define `__init__`? Else its parameters are another library's."
    for c in cls.__mro__:
        if '__init__' in c.__dict__: return c.__module__.startswith(PKG)
    return False


def parameters(e: Entry) -> list[tuple[str, str, str, str]]:
    "(name, type, default, description) of each parameter, the description from `fastcore.docments` comments."
    from fastcore.docments import docments
    if e.kind not in ('function', 'method', 'class') or (e.kind == 'class' and not _own_init(e.obj)): return []
    try: sig = inspect.signature(e.fn)
    except (TypeError, ValueError): return []
    try: notes = {k: (v or {}).get("docment") for k, v in docments(e.fn, full=True, args_kwargs=True).items()}
    except Exception: notes = {}
    stars = {inspect.Parameter.VAR_POSITIONAL: '*', inspect.Parameter.VAR_KEYWORD: '**'}
    return [(stars.get(p.kind, '') + k, fmt_anno(p.annotation), '' if p.default is p.empty else fmt_value(p.default),
             notes.get(k) or '') for k, p in sig.parameters.items() if k not in ('self', 'cls')]


def source_of(e: Entry) -> str:
    try: return inspect.getsource(e.fn) if e.kind != 'constant' else ''
    except (OSError, TypeError): return ''


# ---------------------------------------------------------------- HTML rendering

def text_of(h: str) -> str:
    "The visible text of an HTML fragment, whitespace collapsed."
    return re.sub(r'\s+', ' ', html.unescape(re.sub(r'<[^>]+>', ' ', h))).strip()


@dataclass
class PageParts:
    "What rendering one notebook collects besides its HTML: its table of contents and its searchable sections."
    toc: list = field(default_factory=list)        # (level, id, title); level 3 = an API entry under a section
    sections: list = field(default_factory=list)   # [id, title, prose text]
    seen_ids: set = field(default_factory=set)


class Site:
    "Everything one build knows: pages, API entries (name -> page) and the images it writes."

    def __init__(self, out: Path, nbs: list[NbInfo]):
        self.out, self.nbs = out, nbs
        self.pages = {'index.html', 'names.html'} | {i.page for i in nbs}
        self.entries: dict[str, list[Entry]] = {}   # page -> entries
        self.where: dict[str, str] = {}             # api name -> page
        self.undocumented: list[str] = []           # `module: Name(param)` without a description
        self.n_img = 0
        self.fmt = HtmlFormatter(nowrap=True)

    # -- links
    def link_for(self, name: str) -> str | None:
        name = name.strip().removesuffix('()')
        stem = Path(name).name.removesuffix('.ipynb')
        if f'{stem}.html' in self.pages and (name.endswith('.ipynb') or re.fullmatch(r'\d\d_\w+', name)):
            return f'{stem}.html'
        if name.startswith(PKG + '.'): name = name.split('.')[-1] if name.count('.') > 1 else name
        page = self.where.get(name)
        return f'{page}#{name}' if page else None

    def fix_href(self, href: str, warn) -> str | None:
        "Map a markdown link to a site page: `x.ipynb` -> `x.html`; None for a relative file the site lacks."
        if re.match(r'^[a-z][a-z0-9+.-]*:', href, re.I) or href.startswith('#'): return href
        path, _, frag = href.partition('#')
        name = Path(path).name
        if name.endswith('.ipynb'): name = name[:-6] + '.html'
        if name.lower() == 'readme.md': name = 'index.html'
        if name in self.pages: return name + (f'#{frag}' if frag else '')
        warn(f'link to {href!r} has no page on the site; shown as text')
        return None

    def autolink(self, h: str) -> str:
        "Link inline `Name` code spans that name an API entry (as nbdev does), outside existing links and <pre>."
        parts = re.split(r'(<a\b.*?</a>|<pre\b.*?</pre>|<h[1-6]\b.*?</h[1-6]>)', h, flags=re.S)
        def sub(m):
            url = self.link_for(html.unescape(m.group(1)))
            return f'<a href="{url}">{m.group(0)}</a>' if url else m.group(0)
        return ''.join(p if i % 2 else re.sub(r'<code>([\w/.]+(?:\(\))?)</code>', sub, p)
                       for i, p in enumerate(parts))

    # -- markdown
    def markdown(self, src: str, warn=lambda msg: None, seen: set | None = None) -> str:
        maths = []
        def keep(m):
            maths.append((m.group(0).startswith('$$'), m.group(1) or m.group(2)))
            return f'NNTRAINMATH{len(maths) - 1}X'
        # protect LaTeX (no MathJax offline: it is shown as text) but never inside code
        parts = re.split(r'(```.*?```|`[^`\n]*`)', src, flags=re.S)
        math = r'\$\$(.+?)\$\$|(?<![\w$])\$([^\s$][^$\n]*?)\$(?![\w$])'  # $$block$$ or $inline$, not `$HOME`
        src = ''.join(p if i % 2 else re.sub(math, keep, p, flags=re.S) for i, p in enumerate(parts))
        h = _md(src)
        for i, (block, tex) in enumerate(maths):
            tag = 'div' if block else 'span'
            h = h.replace(f'NNTRAINMATH{i}X', f'<{tag} class="math">{html.escape(tex.strip())}</{tag}>')
        def href(m):
            url = self.fix_href(html.unescape(m.group(2)), warn)
            pre = m.group(1) or ' '
            return f'<a{pre}href="{html.escape(url)}"' if url else f'<a{pre}data-missing="1"'
        h = re.sub(r'<a(\s[^>]*?)?href="([^"]*)"', href, h)
        h = re.sub(r'<a[^>]*data-missing="1"[^>]*>(.*?)</a>', r'<span>\1</span>', h, flags=re.S)
        hl = lambda m: f'<pre class="hl"><code>{self.code(html.unescape(m.group(1)))}</code></pre>'
        h = re.sub(r'<pre><code class="language-(?:python|py)">(.*?)</code></pre>', hl, h, flags=re.S)
        h = self.heading_ids(h, set() if seen is None else seen)
        return self.autolink(h)

    def inline(self, src: str) -> str:
        "One line of markdown without its paragraph tags."
        return re.sub(r'^<p>(.*)</p>$', r'\1', self.markdown(src).strip(), flags=re.S)

    @staticmethod
    def heading_ids(h: str, seen: set) -> str:
        "Give each heading an id from its text, unique among `seen` (the ids already on the page)."
        def sub(m):
            text = html.unescape(re.sub(r'<[^>]+>', '', m.group(3))).lower()
            slug = re.sub(r'[^\w]+', '-', text).strip('-') or 'section'
            base, n = slug, 1
            while slug in seen: n += 1; slug = f'{base}-{n}'
            seen.add(slug)
            return f'<h{m.group(1)}{m.group(2)} id="{slug}">{m.group(3)}</h{m.group(1)}>'
        return re.sub(r'<h([1-6])((?:\s(?!id=)[^>]*)?)>(.*?)</h\1>', sub, h, flags=re.S)

    # -- code and outputs
    def code(self, src: str) -> str:
        return highlight(src, PythonLexer(), self.fmt)

    def image(self, data: str, ext: str, stem: str) -> str:
        self.n_img += 1
        name = f'img/{stem}-{self.n_img}.{ext}'
        (self.out / 'img').mkdir(exist_ok=True)
        (self.out / name).write_bytes(base64.b64decode(data))
        return f'<img src="{name}" alt="output {self.n_img}">'

    def output(self, out: dict, stem: str) -> str:
        kind = out.get('output_type')
        if kind == 'stream':
            text = ANSI.sub('', ''.join(out.get('text', '')))
            return f'<pre class="stream {html.escape(out.get("name", ""))}">{html.escape(text)}</pre>'
        if kind == 'error':
            tb = ANSI.sub('', '\n'.join(out.get('traceback', [])) or f'{out.get("ename")}: {out.get("evalue")}')
            return f'<pre class="error">{html.escape(tb)}</pre>'
        data = out.get('data', {})
        def text(k): v = data[k]; return ''.join(v) if isinstance(v, list) else v
        if 'image/png' in data: return self.image(text('image/png'), 'png', stem)
        if 'image/jpeg' in data: return self.image(text('image/jpeg'), 'jpg', stem)
        if 'image/svg+xml' in data: return f'<div class="svg">{text("image/svg+xml")}</div>'
        if 'text/html' in data: return f'<div class="html">{text("text/html")}</div>'
        if 'text/markdown' in data: return f'<div class="markdown">{self.markdown(text("text/markdown"))}</div>'
        if 'text/latex' in data: return f'<div class="math">{html.escape(text("text/latex"))}</div>'
        if 'text/plain' in data: return f'<pre class="plain">{html.escape(ANSI.sub("", text("text/plain")))}</pre>'
        return ''

    # -- API entries
    def params_table(self, e: Entry) -> str:
        rows = e.params
        if not rows: return ''
        for name, *_, desc in rows:
            if not desc: self.undocumented.append(f'{e.module}: {e.name}({name})')
        cell = lambda v, cls: f'<td class="{cls}">{v}</td>'
        body = ''.join('<tr>' + cell(f'<code>{html.escape(n)}</code>', 'p-name')
                       + cell(f'<code>{html.escape(t)}</code>' if t else '', 'p-type')
                       + cell(f'<code>{html.escape(d)}</code>' if d else '', 'p-default')
                       + cell(self.inline(desc) if desc else '<span class="missing">no description</span>', 'p-desc')
                       + '</tr>' for n, t, d, desc in rows)
        return ('<table class="params"><thead><tr><th>Parameter</th><th>Type</th><th>Default</th><th>Description</th>'
                f'</tr></thead><tbody>{body}</tbody></table>')

    def api_entry(self, e: Entry, level: int = 0) -> str:
        anchor = html.escape(e.name)
        if e.kind == 'constant': sig = f' = {html.escape(fmt_value(e.obj, 100))}'
        elif e.kind == 'property': sig = ''
        else: sig = html.escape(signature(e.fn, method=e.kind == 'method'))
        doc = e.doc
        src = source_of(e)
        source = (f'<details class="source"><summary>Source</summary><pre class="hl"><code>{self.code(src)}</code>'
                  f'</pre></details>' if src else '')
        where = f'<span class="module">{html.escape(e.module)}</span>' if level == 0 else ''
        kids = ''.join(self.api_entry(c, level + 1) for c in e.children)
        return (f'<div class="api" id="{anchor}"><h4 class="api-sig"><code><span class="kind">{e.kind}</span>'
                f'<span class="name">{anchor}</span>{sig}</code><a class="anchor" href="#{anchor}">¶</a>{where}</h4>'
                f'<div class="doc">{self.markdown(doc) if doc else ""}</div>{self.params_table(e)}{source}{kids}</div>')

    # -- notebook page
    def cell_code(self, body: str) -> str:
        return f'<div class="input"><pre class="hl"><code>{self.code(body)}</code></pre></div>'

    def nb_body(self, info: NbInfo) -> tuple[str, PageParts]:
        "The page: prose, API entries where the notebook defines them, examples with their outputs."
        entries = {e.name: e for e in self.entries.get(info.page, [])}
        shown, parts, pp = set(), [], PageParts()
        pp.sections.append([None, info.title, ''])
        warn = info.errors.append
        for cell in info.nb.get('cells', []):
            src = ''.join(cell.get('source', ''))
            if cell.get('cell_type') == 'markdown':
                h = self.markdown(src, warn, pp.seen_ids)
                self._collect(h, pp)
                parts.append(f'<div class="cell md">{h}</div>')
                continue
            if cell.get('cell_type') != 'code': continue
            flags, body = directives(src)
            if 'hide' in flags or not body: continue
            outs = ''.join(self.output(o, info.path.stem) for o in cell.get('outputs', []))
            outs = f'<div class="outputs">{outs}</div>' if outs else ''
            if any(k in flags for k in ('export', 'exports', 'exporti')):
                parts.append(self.exported_cell(body, entries, shown, pp) + outs)
            elif only_imports(body) and not outs: continue   # the notebook's own imports: nothing to show a reader
            elif 'hide_input' in flags or flags.get('echo') == 'false':
                parts.append(f'<div class="cell code">{outs}</div>')
            # a module's page folds code without output (checks, setup); a tutorial is read for its code
            elif outs or not info.module:
                parts.append(f'<div class="cell code example">{self.cell_code(body)}{outs}</div>')
            else:
                lines = body.splitlines()
                more = f' <span class="more">+{len(lines) - 1} lines</span>' if len(lines) > 1 else ''
                parts.append(f'<details class="cell code quiet"><summary><code>{html.escape(lines[0][:100])}</code>'
                             f'{more} <span class="hint">(no output)</span></summary>{self.cell_code(body)}</details>')
        rest = [e for e in self.entries.get(info.page, []) if e.name not in shown]
        if rest:
            parts.append('<h2 id="more-api">More API</h2>')
            pp.toc.append((2, 'more-api', 'More API'))
            pp.seen_ids.add('more-api')
            for e in rest:
                parts.append(self.api_entry(e)); pp.toc.append((3, e.name, e.name))
        return ''.join(parts), pp

    def exported_cell(self, body: str, entries: dict, shown: set, pp: PageParts) -> str:
        "An exported cell: an API entry for each public name it defines; its other code only on demand."
        names = defined_names(body)
        out = []
        for name in names:
            if name in entries and name not in shown:
                out.append(self.api_entry(entries[name])); shown.add(name); pp.toc.append((3, name, name))
        private = [n for n in names if n not in entries]
        if private and not only_imports(body):
            listed = ', '.join(f'<code>{html.escape(n)}</code>' for n in private[:6]) + (', ...' if len(private) > 6
                                                                                     else '')
            out.append(f'<details class="impl"><summary>Implementation: {listed}</summary>'
                       f'{self.cell_code(body)}</details>')
        elif not names and not only_imports(body):
            out.append(f'<details class="impl"><summary>Implementation</summary>{self.cell_code(body)}</details>')
        return ''.join(out)

    @staticmethod
    def _collect(h: str, pp: PageParts) -> None:
        "Headings into the table of contents, prose into the search section under the last heading."
        pieces = re.split(r'(<h[23][^>]* id="[^"]+"[^>]*>.*?</h[23]>)', h, flags=re.S)
        for i, piece in enumerate(pieces):
            m = re.match(r'<h([23])[^>]* id="([^"]+)"[^>]*>(.*?)</h[23]>', piece, flags=re.S) if i % 2 else None
            if m:
                title = text_of(m.group(3))
                pp.toc.append((int(m.group(1)) - 1, m.group(2), title))
                pp.sections.append([m.group(2), title, ''])
            else:
                pp.sections[-1][2] += ' ' + text_of(re.sub(r'<h1\b.*?</h1>', '', piece, flags=re.S))


def only_imports(src: str) -> bool:
    "Is the code nothing but imports (and `_all_`-style bookkeeping)?"
    try: tree = ast.parse(src)
    except SyntaxError: return False
    return all(isinstance(n, (ast.Import, ast.ImportFrom)) or (isinstance(n, ast.Assign) and all(
        isinstance(t, ast.Name) and t.id.startswith('_') for t in n.targets)) for n in tree.body) and bool(tree.body)


def defined_names(src: str) -> list[str]:
    "Top-level names a cell defines; `@patch def f(self: C)` gives `C.f`."
    try: tree = ast.parse(src)
    except SyntaxError: return []
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            decos = [ast.unparse(d) for d in getattr(node, 'decorator_list', [])]
            args = getattr(node, 'args', None)
            if any(d.startswith('patch') for d in decos) and args and args.args and args.args[0].annotation is not None:
                names.append(f'{ast.unparse(args.args[0].annotation).strip(chr(39) + chr(34))}.{node.name}')
            else: names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names += [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]
    return names


def toc_html(items: list) -> str:
    "On this page: the notebook's sections, each with the API entries it defines."
    if not items: return ''
    out, open_sub = [], False
    for level, anchor, title in items:
        if level == 3 and not open_sub: out.append('<ul>'); open_sub = True
        if level < 3 and open_sub: out.append('</ul></li>'); open_sub = False
        elif level < 3 and out: out.append('</li>')
        label = f'<code>{html.escape(title)}</code>' if level == 3 else html.escape(title)
        cls = ' class="api-link"' if level == 3 else ''
        out.append(f'<li><a href="#{html.escape(anchor)}"{cls}>{label}</a>' + ('</li>' if level == 3 else ''))
    out.append('</ul></li>' if open_sub else '</li>')
    return (f'<nav class="toc" aria-label="On this page"><h2 class="toc-title">On this page</h2><ul>{"".join(out)}'
            '</ul></nav>')


# ---------------------------------------------------------------- page shell

def page(title: str, body: str, site: Site, current: str, prev_next=('', ''), toc: bool = False) -> str:
    nav = ''.join(
        f'<li><a href="{i.page}"{" class=current" if i.page == current else ""}>'
        f'<span class="num">{html.escape(i.path.stem.split("_")[0])}</span>{html.escape(i.title)}</a></li>'
        for i in site.nbs)
    prev, nxt = prev_next
    home = ' class=current' if current == 'index.html' else ''
    pager = (f'<div class="pager"><span>{prev}</span><span>{nxt}</span></div>' if prev or nxt else '')
    return f'''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} – {PKG}</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="style.css"><link rel="stylesheet" href="pygments.css">
<script src="search_index.js"></script><script src="search.js"></script></head>
<body><header class="top"><a class="brand" href="index.html">{PKG}</a>
<span class="links"><a href="index.html">Home</a><a href="names.html">Index of names</a></span>
<div class="search"><input id="search-box" type="search" placeholder="Search the docs…" autocomplete="off"
aria-label="Search"><ul id="search-results" hidden></ul></div></header>
<div class="layout{" with-toc" if toc else ""}"><nav class="side"><ul><li><a href="index.html"{home}>
Home</a></li><li><a href="names.html"{" class=current" if current == "names.html" else ""}>Index of names</a></li>
</ul><h3>Notebooks</h3><ul>{nav}</ul></nav>
<main>{body}{pager}</main></div></body></html>
'''


def _header(body: str) -> tuple[str, str]:
    "Split the page's first heading and its summary off the body: (header, rest)."
    m = re.match(r'(<div class="cell md">\s*<h1\b.*?</h1>\s*(?:<blockquote>.*?</blockquote>)?)(.*)', body, flags=re.S)
    return (m.group(1) + '</div>', '<div class="cell md">' + m.group(2)) if m else ('', body)


def build(out: Path | str = '_site', nbs_dir: Path | str | None = None, execute: list[str] | None = None,
          readme: Path | str | None = None, verbose: bool = True) -> dict:
    "Build the site into `out`; return a summary (pages, entries, problems found while building)."
    out, nbs_dir = Path(out), Path(nbs_dir or ROOT / 'nbs')
    readme = Path(readme or ROOT / 'README.md')
    log = print if verbose else (lambda *a, **k: None)
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in ASSETS.iterdir():
        if f.is_file(): shutil.copy(f, out / f.name)
    (out / 'pygments.css').write_text(HtmlFormatter().get_style_defs('pre.hl code'), encoding='utf-8')

    infos = []
    for p in sorted(nbs_dir.glob('*.ipynb')):
        if p.name.startswith('_'): continue
        try: infos.append(read_nb(p))
        except Exception as e:
            info = NbInfo(p, {'cells': []}, p.stem, '', None, page=p.stem + '.html')
            info.errors.append(f'Could not read the notebook: {type(e).__name__}: {e}')
            infos.append(info)
    site = Site(out, infos)

    if execute is not None:
        for info in infos:
            if not execute or any(w in info.path.stem for w in execute):
                log(f'executing {info.path.name}'); execute_nb(info)

    # API entries: import every module first so methods @patch-ed in later modules are found on their classes
    classes_seen, mod_err, documented = {}, {}, set()
    for info in infos:
        if not info.module: continue
        modname = f'{PKG}.{info.module}'
        try: site.entries[info.page] = module_entries(modname, classes_seen, documented)
        except Exception as e:
            mod_err[info.page] = f'Could not import {modname}: {type(e).__name__}: {e}'
            site.entries[info.page] = []
    for info in infos:
        if info.module and info.page not in mod_err:
            site.entries[info.page] += patched_entries(f'{PKG}.{info.module}', classes_seen)
    for pg, entries in site.entries.items():
        for e in entries:
            for x in [e, *e.children]: site.where.setdefault(x.name, pg)
    for pg, msg in mod_err.items(): next(i for i in infos if i.page == pg).errors.append(msg)

    search = []
    for n, info in enumerate(infos):
        pp = PageParts()
        try: body, pp = site.nb_body(info)
        except Exception:
            body = ''
            info.errors.append('The page could not be rendered:\n' + traceback.format_exc())
        errs = ''.join(f'<pre class="build-error">{html.escape(m)}</pre>' for m in info.errors)
        head, body = _header(body)
        toc = toc_html(pp.toc)
        prev = f'← <a href="{infos[n - 1].page}">{html.escape(infos[n - 1].title)}</a>' if n else ''
        nxt = f'<a href="{infos[n + 1].page}">{html.escape(infos[n + 1].title)}</a> →' if n + 1 < len(infos) else ''
        (out / info.page).write_text(page(info.title, head + toc + errs + body, site, info.page, (prev, nxt),
                                          bool(toc)), encoding='utf-8')
        search.append({'n': info.title, 'u': info.page, 'k': 'page', 'd': info.summary,
                       't': pp.sections[0][2] if pp.sections else ''})
        for anchor, title, text in pp.sections[1:]:
            search.append({'n': f'{info.title} › {title}', 'u': f'{info.page}#{anchor}', 'k': 'section',
                           'd': text[:150], 't': text})
        for e in site.entries.get(info.page, []):
            for x in [e, *e.children]:
                ps = x.params
                search.append({'n': x.name, 'u': f'{info.page}#{x.name}', 'k': x.kind, 'd': x.short,
                               'p': [[p.lstrip('*'), d] for p, _, _, d in ps], 't': x.doc})
        for m in info.errors: log(f'{info.path.name}: {m.splitlines()[0]}')

    # index: README, then the notebooks with their summaries
    rows = ''.join(f'<tr><td><a href="{i.page}">{html.escape(i.title)}</a></td><td>{html.escape(i.summary)}</td></tr>'
                   for i in infos)
    readme_parts = PageParts(sections=[[None, PKG, '']])
    intro = (site.markdown(readme.read_text(encoding='utf-8'), seen=readme_parts.seen_ids) if readme.exists()
             else f'<h1>{PKG}</h1>')
    site._collect(intro, readme_parts)
    for src in re.findall(r'<img[^>]* src="([^":]+)"', intro):   # the README's own images (a relative path)
        if (readme.parent / src).is_file():
            (out / src).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(readme.parent / src, out / src)
    readme_parts.toc.append((2, 'notebooks', 'Notebooks'))
    head, intro = _header(f'<div class="cell md">{intro}</div>')
    index = (f'{head}{toc_html(readme_parts.toc)}{intro}<h2 id="notebooks">Notebooks</h2>'
             f'<table class="nb-list">{rows}</table>')
    (out / 'index.html').write_text(page(PKG, index, site, 'index.html', toc=True), encoding='utf-8')
    for anchor, title, text in readme_parts.sections[1:]:
        search.append({'n': f'{PKG} › {title}', 'u': f'index.html#{anchor}', 'k': 'section', 'd': text[:150],
                       't': text})

    # index of names, A-Z: the public API (a subscriber's events are the learner's to call, not listed)
    api = [x for x in search if x['k'] not in ('page', 'section')]
    names = sorted(((x['n'], x['u'], x['k']) for x in api), key=lambda t: t[0].lower())
    groups = {}
    for n, u, k in names: groups.setdefault(n[0].upper(), []).append(
        f'<li><a href="{html.escape(u)}"><code>{html.escape(n)}</code></a> <small>{k}</small></li>')
    body = '<h1>Index of names</h1>' + ''.join(f'<h2 id="letter-{k}">{k}</h2><ul>{"".join(v)}</ul>'
                                               for k, v in groups.items())
    (out / 'names.html').write_text(page('Index of names', f'<div class="names-index">{body}</div>', site,
                                         'names.html'), encoding='utf-8')
    (out / 'search_index.js').write_text('window.NNTRAIN_SEARCH = ' + json.dumps(search, separators=(',', ':'))
                                         + ';\n', encoding='utf-8')
    problems = {i.path.name: i.errors for i in infos if i.errors}
    log(f'built {len(infos) + 2} pages, {len(names)} API entries, {site.n_img} images into {out}; '
        f'{len(site.undocumented)} parameters without a description'
        + (f'; problems in {", ".join(problems)}' if problems else ''))
    return {'out': out, 'pages': [i.page for i in infos], 'entries': len(names), 'images': site.n_img,
            'problems': problems, 'undocumented': site.undocumented}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default='_site', help='folder to write the site to (replaced)')
    ap.add_argument('--nbs', default=None, help='notebook folder (default: nbs/ of this checkout)')
    ap.add_argument('--execute', nargs='*', default=None, metavar='NAME',
                    help='run notebooks with nbclient first (all, or those whose file name contains a NAME)')
    ap.add_argument('--undocumented', action='store_true', help='list the parameters that have no description')
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    info = build(a.out, a.nbs, a.execute)
    if a.undocumented: print('\n'.join(info['undocumented']))


if __name__ == '__main__':
    main()
