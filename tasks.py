#!/usr/bin/env python3
"""The book's two commands, and a few helpers for writing notebooks.

    python3 tasks.py book      build the site into _build/html (open _build/html/index.html)
    python3 tasks.py test      run every test: companion's unit tests, every notebook under nbval,
                               the book built with warnings as errors, and its pages in Chromium

Each command first makes the virtual environment .venv (once) and installs what it needs:
torch (the CPU build 2.13.0 where there is no GPU; an already installed torch, as on Colab, is
kept), requirements.txt and companion itself (editable). ``test`` also installs Debian's
Chromium and MathJax (npm) for the page checks when they are missing.

Helpers:
    python3 tasks.py execute notebooks/<slug>.ipynb [...]   run notebooks at ci scale, store outputs
    python3 tasks.py pages                                   regenerate _toc.yml, the catalogue and
                                                             the reproductions page (and ci figures)
    python3 tasks.py full notebooks/<slug>.ipynb [...]      run notebooks at full scale (GPU) and keep
                                                             their figures for the reproductions page
    python3 tasks.py bench [name]                            run the benchmarks in benchmarks/
    python3 tasks.py lock                                    re-resolve requirements.lock from
                                                             requirements.txt (a universal lock)
    python3 tasks.py corpus                                  rebuild companion/corpus/ from this
                                                             interpreter's standard library
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
CACHE = ROOT / ".cache"
MATHJAX_DIR = CACHE / "mathjax"
CPU_TORCH = "torch==2.13.0"
LOCK = ROOT / "requirements.lock"
# Packages that belong to a torch build (its CUDA runtime): never pinned by the lock, so that a
# machine's own torch (Colab, a GPU machine) keeps the ones it came with.
TORCH_OWNED = ("torch", "triton", "nvidia-", "cuda-")
# The numerical path the notebook tests run on. Outputs are stored (`tasks.py execute`) with the
# CPU's fastest ATen kernels (AVX-512 or AVX2); the tests re-run them with the portable kernels,
# so every test run compares two different code paths, as a reader's machine would.
TEST_PATH_ENV = {"ATEN_CPU_CAPABILITY": "default"}


def log(msg: str) -> None:
    print(f"[tasks] {msg}", flush=True)


def run(cmd, **kw) -> None:
    log(" ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def ensure_env() -> None:
    """Create .venv and install torch, requirements.txt and companion; re-run inside it.
    With COMPANION_USE_CURRENT_PYTHON=1 the current interpreter is used as it is (a machine that
    already has what a command needs, and no network)."""
    if os.environ.get("COMPANION_USE_CURRENT_PYTHON") == "1":
        return
    if not in_venv():
        if not venv_python().exists():
            log(f"creating the virtual environment {VENV}")
            run([sys.executable, "-m", "venv", VENV])
        os.execv(str(venv_python()), [str(venv_python()), str(ROOT / "tasks.py"), *sys.argv[1:]])
    stamp = VENV / ".companion-installed"
    digest = hashlib.sha256(
        (ROOT / "requirements.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes()
        + (LOCK.read_bytes() if LOCK.exists() else b"")
    ).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    try:
        import torch  # noqa: F401

        log(f"torch {torch.__version__} is already installed; keeping it")
    except ImportError:
        run(pip + (["torch"] if has_gpu() else [CPU_TORCH]))
    # exact versions from the lock (a constraints file: it pins, requirements.txt chooses)
    run(pip + ["-r", ROOT / "requirements.txt"] + (["-c", LOCK] if LOCK.exists() else []))
    run(pip + ["--no-deps", "-e", ROOT])
    stamp.write_text(digest)


def _cjk_font_installed() -> bool:
    if not shutil.which("fc-list"):
        return False
    out = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout
    return bool(out.strip())


def ensure_browser() -> None:
    """Debian's Chromium + chromedriver, a CJK font (the pages show Chinese titles) and MathJax 3
    (npm) for the page checks."""
    apt_ok = shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0
    missing = []
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        missing += ["chromium", "chromium-driver"]
    if not _cjk_font_installed():
        missing += ["fonts-noto-cjk", "fontconfig"]
    if missing:
        if apt_ok:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            run(["apt-get", "update", "-qq"], env=env)
            run(["apt-get", "install", "-y", "-qq", *missing], env=env)
        else:
            log(f"{' '.join(missing)} missing and cannot be installed here (needs apt-get as "
                "root): the page checks will fail")
    if not (MATHJAX_DIR / "node_modules" / "mathjax" / "es5" / "tex-chtml.js").exists():
        if not shutil.which("npm") and apt_ok:
            run(["apt-get", "install", "-y", "-qq", "npm"],
                env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        MATHJAX_DIR.mkdir(parents=True, exist_ok=True)
        run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", MATHJAX_DIR,
             "mathjax@3"])


def build_book(out: Path | None = None, warnings_as_errors: bool = True) -> Path:
    """jupyter-book build of the repository root (notebooks are not executed: they carry outputs)."""
    cmd = [Path(sys.executable).parent / "jupyter-book", "build", ROOT, "--all"]
    if warnings_as_errors:
        cmd += ["--warningiserror", "--keep-going"]
    if out is not None:
        cmd += ["--path-output", out]
    run(cmd)
    html = (out or ROOT) / "_build" / "html"
    log(f"the site is at {html / 'index.html'}")
    return html


def cmd_book(args) -> int:
    t0 = time.time()
    build_book(warnings_as_errors=True)
    log(f"book built in {time.time() - t0:.0f} s")
    return 0


def test_env() -> dict:
    env = dict(os.environ)
    env.setdefault("COMPANION_SCALE", "ci")
    env.setdefault("COMPANION_NUM_THREADS", "1")
    env["COMPANION_MATHJAX"] = str(MATHJAX_DIR / "node_modules" / "mathjax" / "es5")
    return env


def cmd_test(args) -> int:
    ensure_browser()
    t0 = time.time()
    workers = os.environ.get("COMPANION_TEST_WORKERS", "2")
    paths = [p for p in ("tests", "notebooks") if (ROOT / p).is_dir()]
    cmd = [sys.executable, "-m", "pytest", *paths, "--nbval", "-p", "tests.nbval_numeric",
           "--nbval-current-env", "--nbval-sanitize-with", ROOT / "tests" / "sanitize.cfg",
           "--nbval-cell-timeout", "600", "-n", workers, "--dist", "loadscope", "-q", *args]
    env = dict(test_env(), **TEST_PATH_ENV)
    log("notebooks are re-run on the test path " +
        " ".join(f"{k}={v}" for k, v in TEST_PATH_ENV.items()) +
        " and compared with outputs stored on the fastest path (tasks.py execute)")
    code = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env).returncode
    log(f"tests finished in {time.time() - t0:.0f} s with exit code {code}")
    return code


def tidy_streams(nb) -> None:
    """Merge each cell's consecutive stream outputs and keep only the final state of lines that a
    progress bar redrew with carriage returns, as a terminal would show them (nbval compares the
    same normalised text, so this changes what a reader sees, not what the tests check)."""
    import re

    redraw = re.compile(r"^.*\r(?=[^\n])", re.MULTILINE)
    for cell in nb.cells:
        merged = []
        for out in cell.get("outputs", []):
            if (out.get("output_type") == "stream" and merged
                    and merged[-1].get("output_type") == "stream" and merged[-1]["name"] == out["name"]):
                merged[-1]["text"] += out["text"]
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = redraw.sub("", out["text"])
        if "outputs" in cell:
            cell["outputs"] = merged


def cmd_execute(args) -> int:
    """Execute notebooks at ci scale on the CPU and store their outputs in place."""
    import nbformat
    from nbclient import NotebookClient

    if not args:
        log("usage: python3 tasks.py execute notebooks/<slug>.ipynb [...]")
        return 2
    env = test_env()
    os.environ.update({k: env[k] for k in ("COMPANION_SCALE", "COMPANION_NUM_THREADS")})
    for path in args:
        nb = nbformat.read(path, as_version=4)
        t0 = time.time()
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
        tidy_streams(nb)
        nbformat.write(nb, path)
        log(f"{path}: executed in {time.time() - t0:.1f} s")
    return 0


def cmd_lock(args) -> int:
    """Re-resolve requirements.lock: exact versions of everything requirements.txt needs, one
    universal lock valid on every Python the README names (3.11 and newer) and every platform,
    with torch resolved as the CPU pin but left out (and with it its CUDA runtime packages)."""
    import re
    import tempfile

    run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "uv"])
    uv = Path(sys.executable).parent / "uv"
    with tempfile.TemporaryDirectory() as tmp:
        torch_pin = Path(tmp) / "torch.txt"
        torch_pin.write_text(CPU_TORCH + "\n")
        raw = Path(tmp) / "lock.txt"
        if LOCK.exists():  # uv keeps the versions already pinned unless a requirement moved
            raw.write_text(LOCK.read_text())
        run([uv, "pip", "compile", ROOT / "requirements.txt", "--universal", "--python-version",
             "3.11", "--fork-strategy", "fewest", "-c", torch_pin, "--no-emit-package", "torch",
             "--no-header", "--no-annotate", "-q", "-o", raw])
        keep = [ln for ln in raw.read_text().splitlines()
                if ln.strip() and not re.match(r"(%s)" % "|".join(map(re.escape, TORCH_OWNED)), ln)]
    header = ["# Generated by `python3 tasks.py lock` from requirements.txt: exact versions for",
              "# Python 3.11 and newer on every platform (one universal resolution). Used as a",
              "# constraints file by tasks.py; torch and its CUDA runtime are left to the machine",
              f"# (tasks.py installs {CPU_TORCH} where there is no GPU)."]
    LOCK.write_text("\n".join(header + keep) + "\n")
    log(f"wrote {LOCK.name}: {len(keep)} pinned packages")
    return 0


# The language-model notebooks' text corpus (companion.data.stdlib_text) is frozen: these
# modules' docstrings and sources as CPython 3.11.7 ships them. `corpus` rebuilds the files from
# the running interpreter; on another Python the checksums change, and companion/data.py's
# _CORPUS_SHA256 must then be updated with the ones it prints.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "heapq", "hmac", "imaplib", "inspect", "ipaddress", "locale", "logging/__init__",
    "mailbox", "mimetypes", "numbers", "opcode", "operator", "optparse", "pathlib", "pickle",
    "pprint", "queue", "random", "reprlib", "sched", "secrets", "selectors", "shlex",
    "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing",
    "uuid", "warnings", "weakref", "zipfile",
)


def live_stdlib_text(kind: str) -> str:
    """The corpus as read from the running interpreter's standard library."""
    import ast

    root = Path(os.__file__).resolve().parent
    parts: list[str] = []
    for name in STDLIB_MODULES:
        path = next(p for p in (root / f"{name}.py", root / name / "__init__.py") if p.is_file())
        src = path.read_text(encoding="utf-8", errors="replace")
        if kind == "source":
            parts.append(src)
            continue
        tree = ast.parse(src)
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
            n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        parts += [ast.get_docstring(n).strip() for n in nodes if ast.get_docstring(n)]
    return "\n\n".join(parts)


def cmd_corpus(args) -> int:
    import gzip

    for kind in ("docstrings", "source"):
        raw = live_stdlib_text(kind).encode("utf-8")
        path = ROOT / "companion" / "corpus" / f"stdlib_{kind}.txt.gz"
        path.write_bytes(gzip.compress(raw, 9, mtime=0))
        log(f"{path.name}: {len(raw.decode('utf-8')):,} characters, "
            f"sha256 {hashlib.sha256(raw).hexdigest()}")
    return 0


def cmd_bench(args) -> int:
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        if args and not any(a in script.name for a in args):
            continue
        run([sys.executable, script], cwd=ROOT)
    return 0


# --------------------------------------------------------------------------------------------
# Generated pages: the table of contents, the catalogue and the reproductions page are written
# from book/articles.csv, book/reproductions.csv and the notebooks and figures that exist, so that
# they never list a notebook that is not there (tests/test_structure.py checks they are current).
# --------------------------------------------------------------------------------------------
PART_TITLES = {
    "losses": "Losses", "lm": "Language models", "heads": "Task heads",
    "peft": "Parameter-efficient tuning", "attention": "Attention", "position": "Position encodings",
    "init": "Initialisation and scaling", "rnn": "Recurrence", "optim": "Optimizers",
    "memory": "Memory", "diffusion": "Diffusion models", "vae": "Variational autoencoders",
    "quantize": "Quantisation", "gan": "GANs", "ssl": "Self-supervised learning",
    "geometry": "High-dimensional geometry", "numbers": "Number puzzles",
    "variational": "Calculus of variations",
}
FIGURES = ROOT / "book" / "figures"


def articles() -> list[dict]:
    import csv

    with open(ROOT / "book" / "articles.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def has_notebook(slug: str) -> bool:
    return (ROOT / "notebooks" / f"{slug}.ipynb").exists()


def render_toc() -> str:
    lines = ["# Generated by `python3 tasks.py pages` from book/articles.csv: only notebooks that exist.",
             "format: jb-book", "root: book/intro", "parts:", "  - caption: About this book",
             "    chapters:", "      - file: book/how-to-run", "      - file: book/catalogue",
             "      - file: book/reproductions"]
    for part, title in PART_TITLES.items():
        slugs = [a["slug"] for a in articles() if a["part"] == part and has_notebook(a["slug"])]
        if slugs:
            lines += [f"  - caption: {title}", "    chapters:"]
            lines += [f"      - file: notebooks/{s}" for s in slugs]
    lines += ["  - caption: API reference", "    chapters:", "      - file: book/api/index",
              "        sections:"]
    lines += [f"          - file: book/api/{m}" for m in api_modules()]
    lines += ["  - caption: Back matter", "    chapters:", "      - file: book/references"]
    return "\n".join(lines) + "\n"


def api_modules() -> list[str]:
    """The companion modules with a public API (each gets a reference page)."""
    return ["core"] + sorted(p.stem for p in (ROOT / "companion").glob("*.py")
                             if not p.stem.startswith("_"))


def render_api_page(module: str) -> str:
    name, path = (("companion", "companion/__init__.py") if module == "core"
                  else (f"companion.{module}", f"companion/{module}.py"))
    return "\n".join([
        f"# `{name}`", "",
        f"Generated from the docstrings of `{path}` (`python3 tasks.py pages`). "
        "Each entry gives the signature, the docstring as written (shapes, dtypes and the "
        "equation it implements) and the notebooks that use it.", "",
        "```{eval-rst}", f".. automodule:: {name}", "   :members:", "```", ""])


def render_api_index() -> str:
    out = ["# API reference", "",
           "`companion` is the package the notebooks call. Each module below can be copied into a "
           "project alone (it needs torch, and numpy/scipy where it says so, plus the small "
           "`companion/_validate.py`). One page per module, generated from the docstrings; each "
           "entry links to the notebooks that use it, and each notebook's last cell links back.",
           ""]
    for m in api_modules():
        out.append(f"- [`{'companion' if m == 'core' else 'companion.' + m}`]({m}.md)")
    return "\n".join(out) + "\n"


def kexue_link(a: dict) -> str:
    return f"[kexue.fm/archives/{a['archive']}](https://kexue.fm/archives/{a['archive']})" \
        if a["archive"] else "kexue.fm"


def render_catalogue() -> str:
    rows = articles()
    done = sum(has_notebook(a["slug"]) for a in rows)
    technical = sum(1 for a in rows if a["part"])
    out = ["# Catalogue", "",
           f"The book follows {len(rows)} articles by 苏剑林 (Su Jianlin) from his blog "
           f"[科学空间 (kexue.fm)](https://kexue.fm): {technical} technical ones, each of which gets a "
           f"notebook, and one personal piece that is listed here only. **{done} of {technical} "
           "notebooks are written**; the others are planned.", "",
           "This page is generated from `book/articles.csv` by `python3 tasks.py pages`.", "",
           "| # | Article | Original title | Date | Part | Status |",
           "|---|---|---|---|---|---|"]
    for a in rows:
        if not a["part"]:
            status = "not technical: no notebook"
            part = "personal / history"
        elif has_notebook(a["slug"]):
            status = f"[notebook](../notebooks/{a['slug']}.ipynb)"
            part = PART_TITLES[a["part"]]
        else:
            status = "planned"
            part = PART_TITLES[a["part"]]
        out.append(f"| {a['num']} | {a['title_en']} | {a['title_zh']} ({kexue_link(a)}) | "
                   f"{a['date']} | {part} | {status} |")
    out += ["", "## The non-technical entry", "",
            "*[追溯]封装界传奇人物* (2014) is a repost with a short foreword by the author: a list of "
            "well-known people of the Chinese GhostXP scene of the 2000s, where hobbyists built and "
            "shared pre-packaged Windows XP images. The foreword says that this hobby taught him most "
            "of his early computing, and that some of its groups later made Linux distributions "
            "(deepin; ylmf, later StartOS). It has no mathematics and no code, so it has no notebook.", ""]
    return "\n".join(out)


GLUE_MIME = "application/papermill.record/text/plain"
VERDICTS = ("reproduced", "direction only", "not reproduced at this scale", "contradicted",
            "not run yet")


def glued_values(nb_path: Path) -> dict[str, str]:
    """What a notebook's stored outputs glued with ``companion.glue`` (name -> text)."""
    values = {}
    for cell in _notebook_cells(nb_path):
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            text = out.get("data", {}).get(GLUE_MIME)
            if name and text is not None:
                values[name] = "".join(text) if isinstance(text, list) else text
    return values


def full_runs() -> dict[str, dict]:
    import csv

    if not (FIGURES / "full-runs.csv").exists():
        return {}
    with open(FIGURES / "full-runs.csv", encoding="utf-8") as f:
        return {r["slug"]: r for r in csv.DictReader(f)}


def render_reproductions() -> str:
    import csv

    with open(ROOT / "book" / "reproductions.csv", encoding="utf-8") as f:
        claims = {r["slug"]: r for r in csv.DictReader(f)}
    runs = full_runs()
    slugs = [a for a in articles() if has_notebook(a["slug"])]
    out = ["# Reproductions", "",
           "Each notebook reproduces one headline claim. For each: the claim, what the paper (or "
           "the article) reports, **our number at ci scale** (a CPU run of seconds: the outputs "
           "stored in the notebook, pasted here from them and re-checked by the tests), **our "
           "number at full scale** (a GPU run of minutes, recorded by `python3 tasks.py full` with "
           "the device named), a verdict, and the figures. The verdicts read: *reproduced* (the "
           "effect and its size agree), *direction only* (the effect is there, smaller or on a "
           "different measure, or only part of the claim holds), *not reproduced at this scale* "
           "(no effect at our scale; the notebook says what it would take), *contradicted* (a "
           "fair measurement disagrees with the claim). Papers' figures are described and cited, "
           "not copied.", "",
           "This page is generated by `python3 tasks.py pages` from `book/reproductions.csv`, "
           "the notebooks' stored outputs and `book/figures/full-runs.csv`.", "",
           "| Article | Verdict | Full scale |", "|---|---|---|"]
    for a in slugs:
        slug = a["slug"]
        r = runs.get(slug)
        full = f"{r['device']}, {r['date']}" if r else "not run yet"
        out.append(f"| [{a['title_en']}](#{slug}) | "
                   f"**{claims.get(slug, {}).get('verdict', '') or 'not judged'}** | {full} |")
    for a in slugs:
        slug = a["slug"]
        c = claims.get(slug, {})
        nb = f"../notebooks/{slug}.ipynb"
        ci = (f"{{glue:text}}`{nb}::headline:s`"
              if "headline" in glued_values(ROOT / "notebooks" / f"{slug}.ipynb")
              else "not recorded")
        r = runs.get(slug)
        if r and r.get("headline"):
            full = f"{r['headline']} ({r['device']}, {r['minutes']} min, {r['date']})"
        elif r:
            full = f"figure only ({r['device']}, {r['minutes']} min, {r['date']})"
        else:
            full = "not run yet"
        verdict = c.get("verdict", "") or "not judged"
        out += ["", f"({slug})=", f"## {a['title_en']}", "",
                f"[The notebook]({nb}).", "",
                f"- **Claim.** {c.get('claim', '')}",
                f"- **The paper or article.** {c.get('paper_figure', '')}",
                f"- **Ours, ci scale (CPU).** {ci}",
                f"- **Ours, full scale.** {full}",
                f"- **Verdict: {verdict}.** {c.get('verdict_note', '')}", ""]
        for tag, label in (("ci", "ci scale, CPU (the run stored in the notebook)"),
                           ("full", "full scale")):
            path = FIGURES / f"{slug}-{tag}.png"
            if path.exists() and (tag == "ci" or slug in runs):
                if tag == "full":
                    label = f"full scale, {r['device']}, {r['minutes']} min ({r['date']})"
                out += [f"*Ours at {label}:*", "",
                        f"![{slug} at {tag} scale]({path.relative_to(ROOT / 'book').as_posix()})",
                        ""]
    return "\n".join(out) + "\n"


API_CELL_TAG = "companion-api"


def companion_names_used(nb_path: Path) -> list[tuple[str, str, bool]]:
    """(module, name, is_class) of every public companion name a notebook's code uses."""
    import importlib
    import inspect
    import re

    code = "\n".join(_source(c) for c in _notebook_cells(nb_path) if c["cell_type"] == "code")
    words = set()  # names imported from companion, or used as companion[.module].name
    for block in re.findall(r"from\s+companion(?:\.\w+)?\s+import\s+(\([^)]*\)|[^\n]+)", code):
        words |= set(re.findall(r"[A-Za-z_]\w*", block))
    words |= set(re.findall(r"companion(?:\.\w+)?\.([A-Za-z_]\w*)", code))
    found = []
    for m in api_modules():
        module = importlib.import_module("companion" if m == "core" else f"companion.{m}")
        for name in module.__all__:
            obj = getattr(module, name)
            if name in words and callable(obj):
                found.append((module.__name__, name, inspect.isclass(obj)))
    return found


def _source(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def render_api_cell(nb_path: Path) -> str:
    refs = [f"{{py:{'class' if is_class else 'func'}}}`{module}.{name}`"
            for module, name, is_class in companion_names_used(nb_path)]
    return ("## The companion code used here\n\n"
            "Each name links to its entry in the API reference (signature, shapes, the equation "
            "it implements): " + ", ".join(refs) + ".")


def add_api_backlinks(nb_path: Path) -> None:
    """Write (or refresh) the notebook's last cell: links to the API entries it uses."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    text = render_api_cell(nb_path)
    cells = [c for c in nb.cells if API_CELL_TAG not in c.get("metadata", {}).get("tags", [])]
    cell = nbformat.v4.new_markdown_cell(text, metadata={"tags": [API_CELL_TAG]})
    cell["id"] = API_CELL_TAG
    if len(cells) + 1 == len(nb.cells) and _source(nb.cells[-1]) == text:
        return
    nb.cells = cells + [cell]
    nbformat.write(nb, nb_path)


def write_pages() -> None:
    (ROOT / "_toc.yml").write_text(render_toc(), encoding="utf-8")
    api = ROOT / "book" / "api"
    api.mkdir(exist_ok=True)
    (api / "index.md").write_text(render_api_index(), encoding="utf-8")
    for m in api_modules():
        (api / f"{m}.md").write_text(render_api_page(m), encoding="utf-8")
    (ROOT / "book" / "catalogue.md").write_text(render_catalogue(), encoding="utf-8")
    (ROOT / "book" / "reproductions.md").write_text(render_reproductions(), encoding="utf-8")


def last_figure(nb_path: Path) -> bytes | None:
    """The PNG of the cell tagged ``headline``, else the last PNG output of the notebook."""
    import base64

    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    tagged, last = None, None
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                last = png
                if "headline" in cell.get("metadata", {}).get("tags", []):
                    tagged = png
    chosen = tagged or last
    return base64.b64decode(chosen) if chosen else None


def cmd_pages(args) -> int:
    """Extract each notebook's headline figure (ci scale) and regenerate the generated pages."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    for a in articles():
        nb = ROOT / "notebooks" / f"{a['slug']}.ipynb"
        if nb.exists():
            add_api_backlinks(nb)
            png = last_figure(nb)
            if png:
                (FIGURES / f"{a['slug']}-ci.png").write_bytes(png)
    write_pages()
    log("wrote _toc.yml, book/catalogue.md, book/reproductions.md and book/figures/*-ci.png")
    return 0


def _notebook_cells(path: Path) -> list[dict]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def run_notebook_as_script(path: Path, log_file: Path) -> tuple[bytes | None, float]:
    """Run a notebook's code cells in order in one namespace, without Jupyter (for a GPU machine
    that has torch but no Jupyter stack). IPython magics (%pip, !cmd) are skipped: companion is
    importable there. Figures shown with plt.show() are kept; returns the headline figure (the
    cell tagged ``headline``, else the last one shown) and the run time in seconds."""
    import contextlib
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown: list[tuple[bool, bytes]] = []
    current = {"headline": False}

    def show(*_, **__):
        buf = io.BytesIO()
        plt.gcf().savefig(buf, format="png", dpi=100, bbox_inches="tight")
        shown.append((current["headline"], buf.getvalue()))
        plt.close("all")

    plt.show = show
    namespace = {"__name__": "__main__"}
    t0 = time.time()
    with open(log_file, "w", encoding="utf-8") as log_out, contextlib.redirect_stdout(log_out), \
            contextlib.redirect_stderr(log_out):
        for cell in _notebook_cells(path):
            if cell["cell_type"] != "code":
                continue
            src = "".join(cell["source"])
            lines = [ln for ln in src.splitlines() if not ln.lstrip().startswith(("%", "!"))]
            current["headline"] = "headline" in cell.get("metadata", {}).get("tags", [])
            exec(compile("\n".join(lines) + "\n", f"{path.name}", "exec"), namespace)
            print(flush=True)
    seconds = time.time() - t0
    tagged = [png for is_headline, png in shown if is_headline]
    figure = tagged[-1] if tagged else (shown[-1][1] if shown else None)
    return figure, seconds


def cmd_full(args) -> int:
    """Run notebooks at full scale (on a GPU), keep their headline figures in
    book/figures/<slug>-full.png and their printed output in book/figures/<slug>-full.log, and
    record the device, the time and the glued headline in book/figures/full-runs.csv. The
    notebooks' stored (ci-scale) outputs are not touched. COMPANION_FULL_OUT=<dir> writes all of
    it there instead (to run several notebooks at once, each into its own folder, and merge)."""
    import datetime

    import torch

    import companion

    os.environ["COMPANION_SCALE"] = "full"
    os.environ.setdefault("MPLBACKEND", "Agg")
    out = Path(os.environ.get("COMPANION_FULL_OUT") or FIGURES)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    code = 0
    for path in map(Path, args):
        slug = path.stem
        companion._GLUED.clear()
        try:
            png, seconds = run_notebook_as_script(path, out / f"{slug}-full.log")
        except Exception as e:  # keep going: one failing notebook must not hide the others
            log(f"{path}: FAILED at full scale: {type(e).__name__}: {e}")
            code = 1
            continue
        if png:
            (out / f"{slug}-full.png").write_bytes(png)
        record_full_run(out / "full-runs.csv", {
            "slug": slug, "device": device, "minutes": f"{seconds / 60:.1f}",
            "date": datetime.date.today().isoformat(),
            "headline": companion.glued().get("headline", "")})
        log(f"{path}: full scale on {device} in {seconds / 60:.1f} min")
    return code


FULL_RUN_FIELDS = ["slug", "device", "minutes", "date", "headline"]


def record_full_run(runs_path: Path, row: dict) -> None:
    """Add or replace one notebook's row of a full-runs.csv."""
    import csv

    runs = {}
    if runs_path.exists():
        with open(runs_path, encoding="utf-8") as f:
            runs = {r["slug"]: r for r in csv.DictReader(f)}
    runs[row["slug"]] = {k: row.get(k, "") for k in FULL_RUN_FIELDS}
    with open(runs_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FULL_RUN_FIELDS)
        w.writeheader()
        w.writerows(sorted(runs.values(), key=lambda r: r["slug"]))


def cmd_merge_full(args) -> int:
    """Merge full-scale runs made elsewhere (benchmarks/gpu_session.sh): each <dir>/full/<slug>/
    holds <slug>-full.png, <slug>-full.log and a one-row full-runs.csv."""
    import csv

    if len(args) != 1:
        log("usage: python3 tasks.py merge-full <folder unpacked from gpu.tar.gz>")
        return 2
    merged = 0
    for folder in sorted((Path(args[0]) / "full").iterdir()):
        runs = folder / "full-runs.csv"
        if not runs.exists():
            log(f"{folder.name}: no record (failed or timed out); see {folder / 'run.txt'}")
            continue
        for name in (f"{folder.name}-full.png", f"{folder.name}-full.log"):
            if (folder / name).exists():
                shutil.copyfile(folder / name, FIGURES / name)
        with open(runs, encoding="utf-8") as f:
            for row in csv.DictReader(f):
                record_full_run(FIGURES / "full-runs.csv", row)
                merged += 1
    log(f"merged {merged} full-scale runs into {FIGURES / 'full-runs.csv'}")
    return 0


COMMANDS = {"merge-full": cmd_merge_full, "book": cmd_book, "test": cmd_test, "execute": cmd_execute, "bench": cmd_bench,
            "pages": cmd_pages, "full": cmd_full, "lock": cmd_lock,
            "corpus": cmd_corpus}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        return 2
    if sys.version_info < (3, 11):
        log(f"Python 3.11 or newer is needed (requirements.lock is resolved for 3.11+); this is "
            f"{sys.version.split()[0]}")
        return 2
    ensure_env()
    return COMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
