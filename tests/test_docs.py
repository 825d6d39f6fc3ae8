"""The README and the pages under docs/ cannot drift from the code.

- Every ```python and ```bash block runs, page by page, in one shared folder: README.md first,
  then the pages in name order. A page's blocks run in order in one Python process (its python
  blocks share one namespace; its bash blocks run with `bash -euo pipefail`, the environment's
  `frmap` and `python` first on PATH). A bash block identical to one that already ran is not
  run again: its files are already in the folder.
- A block that cannot run here (a GPU, a cluster, a service that keeps running) carries a
  visible marker on the line before it: `<!-- not run: the reason -->`.
- Every fence names its language; text, json and toml blocks are not code and do not run.
- Every table between `<!-- table: ... -->` markers equals what docs/render.py renders from
  docs/results/, and every JSON file there feeds a table.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```\s*$", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>[^>]*\S)\s*-->\s*$")
RUNS = ("python", "bash")
NOT_CODE = ("text", "json", "toml")


def _render():
    spec = importlib.util.spec_from_file_location("docs_render", ROOT / "docs" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render()
PAGES = render.pages()


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(page: Path) -> list[dict]:
    """Each fenced block of `page`: language, code, line, and the reason it does not run
    (None where it runs)."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rpartition("\n")[2]
        marker = NOT_RUN.search(before)
        out.append({"lang": m["lang"], "code": m["code"], "line": text.count("\n", 0, m.start())
                    + 1, "not_run": marker["reason"] if marker else None})
    return out


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_fence_names_its_language(page):
    bad = [b["line"] for b in blocks(page) if b["lang"] not in RUNS + NOT_CODE]
    assert not bad, f"{_name(page)}: fences at lines {bad} name no language of {RUNS + NOT_CODE}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_not_run_markers_stand_before_code(page):
    text = page.read_text()
    markers = len(re.findall(r"^<!-- not run", text, re.M))
    marked = sum(b["not_run"] is not None and b["lang"] in RUNS for b in blocks(page))
    assert markers == marked, (f"{_name(page)}: {markers} `<!-- not run: reason -->` markers, "
                               f"{marked} of them on the line before a python or bash block")


# One Python process per page: python blocks share a namespace, bash blocks run in a shell.
_DRIVER = r"""
import json, subprocess, sys, traceback
namespace = {"__name__": "__main__"}
for i, block in enumerate(json.load(sys.stdin)):
    where = f"{block['page']}, block at line {block['line']}"
    if block["lang"] == "python":
        try:
            exec(compile(block["code"], where, "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            sys.exit(f"FAILED: {where}")
    else:
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]])
        if run.returncode:
            sys.exit(f"FAILED ({run.returncode}): {where}")
"""


@pytest.fixture(scope="module")
def docs_folder(tmp_path_factory):
    """The folder every page's blocks run in, and the bash blocks that already ran there."""
    return tmp_path_factory.mktemp("docs"), set()


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_code_blocks_run(page, docs_folder):
    folder, done = docs_folder
    todo = []
    for b in blocks(page):
        if b["lang"] not in RUNS or b["not_run"] is not None:
            continue
        key = hashlib.sha256(b["code"].encode()).hexdigest()
        if b["lang"] == "bash":
            if key in done:
                continue
            done.add(key)
        todo.append({**b, "page": _name(page)})
    if not todo:
        pytest.skip("no block to run")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(todo), text=True,
                         cwd=folder, env=env, capture_output=True, timeout=300)
    print(f"{_name(page)}: {len(todo)} blocks in {time.perf_counter() - start:.1f} s")
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_tables_match_their_json(page):
    text = page.read_text()
    assert render.render(text) == text, (f"{_name(page)}: a table differs from docs/results/; "
                                         "run `make docs-tables` and commit")


def test_every_result_file_feeds_a_table():
    used = {m["name"] for page in PAGES for m in render.markers(page.read_text())}
    files = {p.stem for p in render.RESULTS.glob("*.json")}
    assert files <= used, f"docs/results/ files no page shows: {sorted(files - used)}"


def test_min_adversarials_matches_the_metrics():
    from frmap.engine.evaluation.metrics import MIN_ADVERSARIALS

    assert render.MIN_ADVERSARIALS == MIN_ADVERSARIALS


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the site holds the rest"
    head = "\n".join(lines[:60])
    assert "make demo" in head and "make test" in head
