"""Render the result and benchmark tables of README.md and docs/ from docs/results/*.json.

A table lives in a page between two markers:

    <!-- table: NAME [VIEW] -->
    ...generated, never edited by hand...
    <!-- end table -->

NAME names `docs/results/NAME.json`, which holds what a command wrote, in an envelope:

    {"kind": "bench-entropy",                  # which renderer below
     "command": "frmap bench entropy --json F", # what produced "output"
     "machine": {...},                          # optional: else output["machine"]
     "note": "...",                             # optional: a sentence printed under the table
     "output": ...}                             # the command's JSON, as it wrote it

plus options some kinds read (named in their renderer). VIEW picks another table of the same
JSON (`RENDERERS[(kind, view)]`). Every table ends with the machine it was measured on.

    python docs/render.py          rewrite the tables in place
    python docs/render.py --check  exit 1, naming the files, where a page differs from its JSON

Only the standard library: the check runs in the docs build and the tests without torch.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
FENCED = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)  # a marker shown in a code block is text
MARKER = re.compile(r"(<!-- table: (?P<name>[\w-]+)(?: (?P<view>[\w-]+))? -->\n)(?P<body>.*?)"
                    r"(<!-- end table -->)", re.S)
# A row of a detection table rests on at least this many adversarials; as
# frmap.engine.evaluation.metrics.MIN_ADVERSARIALS (tests/test_docs.py holds them equal).
MIN_ADVERSARIALS = 10

Lines = list[str]


def pages() -> list[Path]:
    """README.md and every page of the site."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head: list[str], rows: list[list[object]]) -> Lines:
    return [_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows)]


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def machine_line(machine: dict) -> str:
    """The machine record of frmap.bench.machine.describe() as one sentence. A record converted
    from older prose may hold the load as a range ("3 to 5") and leave the CPU model out."""
    load = machine.get("load_average_1min")
    load = f"{load:.1f}" if isinstance(load, (int, float)) else load
    cpu = f"{machine.get('cores', '?')} cores of {machine.get('cpu') or 'a CPU not recorded'}"
    if "cpu_flags" in machine:
        cpu += f" ({', '.join(machine['cpu_flags']) or 'none of the bf16/AVX-512 flags'})"
    parts = [cpu]
    if machine.get("torch_threads"):
        parts.append(f"{machine['torch_threads']} torch threads")
    if load is not None:
        parts.append(f"load average {load}")
    if machine.get("cuda"):
        parts.append(f"CUDA {machine['cuda']}")
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    return "; ".join(parts)


# --- the renderers: (output, envelope) -> the table's lines -------------------------------------

def attacks(output: list[dict], env: dict) -> Lines:
    """`attacks.json` of `frmap demo` / `frmap evaluate` (AttackStats rows). Options: "labels"
    (attack -> its name in the table), "columns" (title -> attack -> cell) for more columns."""
    labels, extra = env.get("labels", {}), env.get("columns", {})
    return _table(
        ["attack", "attacked", "success rate", "true-class conf. after", "new-class conf.",
         *extra],
        [[labels.get(r["attack"], r["attack"]), r["attacked"], _f(r["success_rate"]),
          _f(r["true_confidence"]), _f(r["adv_confidence"]),
          *(cells.get(r["attack"], "") for cells in extra.values())] for r in output])


def _measured(r: dict) -> bool:
    return r["n_adversarial"] >= MIN_ADVERSARIALS


def detection(output: list[dict], env: dict) -> Lines:
    """`results.json` of `frmap demo` / `frmap evaluate` (AttackEvaluation rows) for one
    detector (option "detector", default "entropy"); "labels" as for `attacks`."""
    labels = env.get("labels", {})
    rows = []
    for r in (r for r in output if r["detector"] == env.get("detector", "entropy")):
        dr = r["detection_rate"]
        measured = _measured(r)
        rows.append([labels.get(r["attack"], r["attack"]), r["n_adversarial"],
                     _f(r["auc"]) if measured else f"({_f(r['auc'])}, too few)",
                     _f(dr["1%"]), _f(dr["5%"]), _f(dr["10%"]),
                     f"{_f(r['precision'])} / {_f(r['recall'])}" if measured else "-"])
    return _table(["attack", "adversarials", "AUC", "DR @ FPR 1%", "5%", "10%",
                   "precision / recall @ 5%"], rows)


def comparison(output: list[dict], env: dict) -> Lines:
    """`comparison.json` of `frmap evaluate --detectors ...`: AUC / detection rate at FPR 5% per
    detector and attack. Options: "detectors" and "attacks" (the rows and columns to show,
    default all, in the file's order), "mean" (a last column, the mean over the measured attacks
    shown; default true)."""
    shown = env.get("attacks") or list(dict.fromkeys(r["attack"] for r in output))
    cells = {(r["detector"], r["attack"]): r for r in output}
    count = {a: next(r["n_adversarial"] for r in output if r["attack"] == a) for a in shown}
    head = ["detector", *(f"{a} ({count[a]})" for a in shown)]
    if env.get("mean", True):
        head.append("mean (measured)")
    rows = []
    for detector in env.get("detectors") or dict.fromkeys(r["detector"] for r in output):
        row: list[object] = [detector]
        for a in shown:
            r = cells.get((detector, a))
            row.append("" if r is None else f"too few ({r['n_adversarial']})"
                       if not _measured(r) else
                       f"{_f(r['auc'])} / {_f(r['detection_rate']['5%'])}")
        if env.get("mean", True):
            measured = [cells[(detector, a)] for a in shown
                        if (detector, a) in cells and _measured(cells[(detector, a)])]
            row.append(f"{_f(sum(r['auc'] for r in measured) / len(measured))} / "
                       f"{_f(sum(r['detection_rate']['5%'] for r in measured) / len(measured))}")
        rows.append(row)
    return _table(head, rows)


def evolution_probe(output: list[dict], env: dict) -> Lines:
    """`evolution-probe.json` of `frmap probe-evolution` (ProbeRow rows): each variant's LSTM
    and MLP, mean test AUC +- the spread over the seeds, and their validation AUC."""
    rows: dict[str, dict] = {}
    for r in output:
        rows.setdefault(r["variant"], {})[r["network"]] = r
    out = []
    for variant, nets in rows.items():
        if "" in nets:  # the kNN reference row
            out.append([f"{variant} (reference)", _f(nets[""]["auc"]), "", ""])
            continue
        lstm, mlp = nets["lstm"], nets["mlp"]
        out.append([variant, f"{_f(lstm['auc'])} +- {_f(lstm['spread'])}",
                    f"{_f(mlp['auc'])} +- {_f(mlp['spread'])}",
                    f"{_f(lstm['validation_auc'], 2)} / {_f(mlp['validation_auc'], 2)}"])
    return _table(["variant", "LSTM", "MLP", "validation AUC (LSTM / MLP)"], out)


def _targets(targets: list[dict]) -> Lines:
    if not targets:
        return []
    lines = [""]
    for t in targets:
        goal = t["goal"] if isinstance(t["goal"], str) else f"{t['goal']:.2f}"
        model = f"{t['model']}: " if t.get("model") else ""
        lines.append(f"- {'met' if t['ok'] else 'missed'}: {model}{t['target']}: "
                     f"{t['value']:.2f} (goal {goal})")
    return lines


def bench_entropy(output: dict, env: dict) -> Lines:
    """`frmap bench entropy --json F`: scikit-image against the C++ kernel on one thread (best
    of the repeats, ratio in the same run), then the targets."""
    groups: dict[tuple, dict] = {}
    for r in output["rows"]:
        key = (tuple(r["shape"]), r["image"], r["footprint"])
        groups.setdefault(key, {})[(r["backend"], r["threads"])] = r
    rows = []
    for (shape, image, footprint), runs in groups.items():
        ref, cpu = runs.get(("skimage", 1)), runs.get(("cpu", 1))
        rows.append([f"{'x'.join(map(str, shape))} {image}, {footprint}",
                     f"{ref['seconds'] * 1e3:.1f} ms", f"{cpu['seconds'] * 1e3:.2f} ms",
                     f"{cpu['vs_skimage']:.1f}x"])
    return _table(["case", "scikit-image", "C++, 1 thread", "ratio"], rows) + \
        _targets(output.get("targets", []))


def pytest_benchmark(output: dict, env: dict) -> Lines:
    """`pytest bench/... --benchmark-only --benchmark-json F`: each call's median, per group."""
    rows = [[b["group"], b["extra_info"].get("call", b["name"]),
             f"{b['stats']['median'] * 1e6:.1f} us"] for b in output["benchmarks"]]
    return _table(["case", "call", "median"], rows)


_METHODS = {"reverse_walk": "reverse walk", "reverse_walk_bf16": "reverse walk, bf16",
            "autograd": "autograd", "captum": "Captum GuidedBackprop"}


def bench_responses(output: dict, env: dict) -> Lines:
    """`frmap bench responses --json F`: images/s and x Captum per batch, peak memory beyond the
    weights at the largest batch; then the share of the time outside the convolutions."""
    batches = sorted({r["batch"] for r in output["rows"]})
    big = batches[-1]
    head = ["path", *(f"batch {b} img/s | x Captum" for b in batches),
            f"peak memory beyond the weights, batch {big}"]
    head = [h for c in head for h in c.split(" | ")]
    rows = []
    for method in dict.fromkeys(r["method"] for r in output["rows"]):
        mine = {r["batch"]: r for r in output["rows"] if r["method"] == method}
        peak = mine[big].get("peak_mib")
        rows.append([_METHODS.get(method, method),
                     *(c for b in batches for c in (f"{mine[b]['images_per_s']:.2f}",
                                                     f"{mine[b]['speed_vs_captum']:.2f}")),
                     "-" if peak is None else
                     f"{peak:.0f} MiB ({mine[big]['memory_vs_captum']:.2f}x)"])
    lines = _table(head, rows)
    shares = [s for s in output.get("conv_share", []) if s["method"] == "reverse_walk"]
    if shares:
        lines += ["", "Share of the score time (responses + fused score) outside the model's "
                  "convolutions: " + ", ".join(f"batch {s['batch']} {s['outside_share']:.1%}"
                                                 for s in shares) + "."]
    return lines + _targets(output.get("targets", []))


_SCREEN_MODELS = {"vgg19-224": "VGG19 224", "digits": "digits"}


def _screen_columns(output: dict) -> list[tuple[str, int]]:
    """(model, batch) of every column: the best batch of each model, then batch 1."""
    pairs = list(dict.fromkeys((r["model"], r["batch"]) for r in output["rows"]))
    return sorted(pairs, key=lambda p: (p[1] == 1, p[0] != "vgg19-224"))


def _screen_cell(output: dict, model: str, batch: int, detectors: str, precision: str,
                 compiled: bool = False) -> dict | None:
    return next((r for r in output["rows"]
                 if (r["model"], r["batch"], r["detectors"], r["precision"],
                     r.get("compiled", False)) == (model, batch, detectors, precision, compiled)),
                None)


def bench_screen_precisions(output: dict, env: dict) -> Lines:
    """`frmap bench screen --json F`: the entropy screen in each precision, as a multiple of
    the forward pass."""
    precisions = list(dict.fromkeys(r["precision"] for r in output["rows"]
                                    if r["detectors"] == "entropy"))
    rows = []
    for model, batch in _screen_columns(output):
        rows.append([f"{_SCREEN_MODELS.get(model, model)}, batch {batch}",
                     *(f"{_screen_cell(output, model, batch, 'entropy', p)['forward_passes']:.2f}x"
                       for p in precisions)])
    return _table(["entropy screen", *precisions], rows)


def _screen_costs(before: dict | None, after: dict, sets: dict[str, list]) -> Lines:
    """Each set's screen (label -> [detectors, precision] or [detectors, precision, compiled])
    as a multiple of the forward pass, per model and batch, "baseline -> frmap" where a baseline
    run is given."""
    columns = _screen_columns(after)
    runs = (before, after) if before else (after,)
    head = ["screen (x the forward pass)", *(f"{_SCREEN_MODELS.get(m, m)}, batch {b}"
                                             for m, b in columns)]
    forward = ["forward pass alone, ms per image" + (" (baseline / frmap)" if before else "")]
    for m, b in columns:
        forward.append(" / ".join(f"{c['ms_per_image']:.3g}" for c in
                                  (_screen_cell(x, m, b, "forward", "float32") for x in runs) if c))
    rows = [forward]
    for label, key in sets.items():
        row = [label]
        for m, b in columns:
            cells = [_screen_cell(x, m, b, *key) for x in runs]
            row.append(" -> ".join(f"{c['forward_passes']:.2f}x" for c in cells if c) or "-")
        rows.append(row)
    return _table(head, rows)


def bench_screen(output: dict, env: dict) -> Lines:
    """`frmap bench screen --json F`: each detector set's screen (float32, and the entropy
    detector's other precisions) as a multiple of the forward pass."""
    sets = {", ".join([d] + [p] * (p != "float32") + ["compiled"] * c): [d, p, c]
            for d, p, c in dict.fromkeys((r["detectors"], r["precision"], r.get("compiled", False))
                                         for r in output["rows"]) if d != "forward"}
    return _screen_costs(None, output, sets)


def bench_screen_change(output: dict, env: dict) -> Lines:
    """Two `frmap bench screen --json F` runs, {"before": a baseline, "after": frmap}: each
    detector set's screen as a multiple of the forward pass, baseline -> frmap, and the forward
    pass itself. Option "sets": the rows, label -> [detectors, precision], in order."""
    return _screen_costs(output["before"], output["after"], env["sets"])


def bench_scale(output: dict, env: dict) -> Lines:
    """`frmap bench scale --json F`: one process against Ray with 1 and 2 workers."""
    rows = []
    for r in output["rows"]:
        first = True
        for name, run in [("one process", r["single"]),
                          *((f"Ray, {w['workers']} worker{'s' * (w['workers'] > 1)}", w)
                            for w in r["ray"])]:
            single = "ratio" not in run
            rows.append([f"{r['model']}, {r['images']}" if first else "", name,
                         f"{run['end_to_end_images_per_s']:.2f}",
                         f"{run['steady_images_per_s']:.2f}",
                         "1" if single else f"{run['ratio']:.2f}",
                         "" if single else f"{run['overhead_ms_per_image']:.1f}",
                         f"{run['startup_s']:.1f}"])
            first = False
    return _table(["model, images", "run", "images/s end to end", "steady state, images/s",
                   "steady ratio", "Ray overhead, ms/image", "start-up, s"], rows)


def _load(c: dict) -> str:
    rate = c["images_per_s"]
    return f"{rate:.2f}" if rate < 10 else f"{rate:.1f}"


def bench_serve(output: dict, env: dict) -> Lines:
    """`frmap bench serve --json F`: per model and ingress mode, p50 / p99 at 1 client beside the
    library's batch-1 latency taking turns with it and what the service adds to its own screen
    (p50 of each request's latency less its `Server-Timing` screen time), images/s at
    saturation (1 and 16 images per request), p99 / p50 at half load and the ports beyond
    loopback; then the targets."""
    lines: Lines = []
    for r in output["rows"]:
        lib, rows = r["library"], []
        for m in r["modes"]:
            if "error" in m:
                rows.append([m["mode"], "did not start", "", "", "", "", "", ""])
                continue
            one, half = m["one_client"], m["half_load"]
            added = one.get("added_p50_ms")
            rows.append([m["mode"], f"{m['library_batch1_ms']:.1f}",
                         f"{one['p50_ms']:.1f} / {one['p99_ms']:.1f}",
                         "-" if added is None else f"{added:.2f}",
                         _load({"images_per_s": m["saturation_images_per_s"]}),
                         _load(m["multipart"]), f"{half['p99_ms'] / half['p50_ms']:.2f}",
                         f"{len(m['exposed'])} of {m['listening']}"])
        lines += [f"{r['model']}: the library {lib['best_images_per_s']:.1f} images/s at its "
                  f"best batch, {lib['best_batch']}, the service's `--max-batch`; its latency "
                  "at batch 1 taking turns with the service's 1-client requests.", "",
                  *_table(["mode", "library batch 1, ms", "1 client p50 / p99 ms",
                           "added to its own screen, ms", "images/s, 1 / request",
                           "images/s, 16 / request", "p99 / p50 at half load",
                           "ports beyond loopback"], rows), ""]
    return lines + _targets(output.get("targets", []))


def bench_detectors(output: dict, env: dict) -> Lines:
    """`frmap bench detectors --json F`: images/s of the shared forward pass and of each
    detector's scoring on top of it."""
    return _table(["what", "images", "images/s"],
                  [[r["detector"], r["images"], f"{r['images_per_s']:.0f}"]
                   for r in output["rows"]])


Renderer = Callable[[object, dict], Lines]
RENDERERS: dict[tuple[str, str], Renderer] = {
    ("attacks", ""): attacks,
    ("detection", ""): detection,
    ("comparison", ""): comparison,
    ("evolution-probe", ""): evolution_probe,
    ("bench-entropy", ""): bench_entropy,
    ("pytest-benchmark", ""): pytest_benchmark,
    ("bench-responses", ""): bench_responses,
    ("bench-screen", ""): bench_screen,
    ("bench-screen", "precisions"): bench_screen_precisions,
    ("bench-screen-change", ""): bench_screen_change,
    ("bench-screen-change", "precisions"): lambda out, env: bench_screen_precisions(
        out["after"], env),
    ("bench-scale", ""): bench_scale,
    ("bench-serve", ""): bench_serve,
    ("bench-detectors", ""): bench_detectors,
}


def render_table(name: str, view: str = "") -> str:
    """The markdown between the markers of table NAME (VIEW): the table, the note, the
    machine and the command."""
    path = RESULTS / f"{name}.json"
    env = json.loads(path.read_text())
    key = (env["kind"], view)
    if key not in RENDERERS:
        raise KeyError(f"{path.name}: no renderer for kind {env['kind']!r}, view {view!r}")
    lines = RENDERERS[key](env["output"], env)
    if env.get("note"):
        lines += ["", env["note"]]
    machine = env.get("machine") or (env["output"].get("machine")
                                     if isinstance(env["output"], dict) else None)
    source = f"`{env['command']}`" + (f"; {machine_line(machine)}" if machine else "")
    lines += ["", f"<small>Generated from `docs/results/{name}.json` ({source}).</small>"]
    return "\n".join(lines) + "\n"


def _prose(text: str) -> list[tuple[bool, str]]:
    """`text` in pieces, each (True where it lies outside fenced code blocks, the piece)."""
    pieces, start = [], 0
    for m in FENCED.finditer(text):
        pieces += [(True, text[start:m.start()]), (False, m[0])]
        start = m.end()
    return [*pieces, (True, text[start:])]


def markers(text: str) -> list[re.Match]:
    """The table markers of `text`, outside code blocks."""
    return [m for prose, piece in _prose(text) if prose for m in MARKER.finditer(piece)]


def render(text: str) -> str:
    """`text` with every table between markers rendered afresh."""
    return "".join(
        MARKER.sub(lambda m: m[1] + render_table(m["name"], m["view"] or "") + m[5], piece)
        if prose else piece for prose, piece in _prose(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 where a page differs from its JSON")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        fresh = render(text)
        if fresh != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(fresh)
    if args.check and stale:
        print("tables differ from docs/results/*.json in: " + ", ".join(map(str, stale))
              + "\nrun `make docs-tables` (python docs/render.py) and commit", file=sys.stderr)
        return 1
    if not args.check:
        print("rewrote " + (", ".join(map(str, stale)) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
