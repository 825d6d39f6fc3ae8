"""The `frmap` command line end to end: exit codes, JSON output, clear errors, no partial files."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import foolbox
import numpy as np
import pytest
import torch
from PIL import Image

from frmap.engine.cli import build_parser, main
from frmap.engine.data import load_digits_split
from frmap.engine.detectors import load_detector
from frmap.kernels import FrmapError

from helpers import frmap


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory) -> Path:
    """Six test digits as 32x32 PNGs named `d<i>_<label>.png`, plus two bad files."""
    folder = tmp_path_factory.mktemp("digits")
    split = load_digits_split("test")
    for i in range(6):
        pixels = (split.images[i, 0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"d{i}_{int(split.labels[i])}.png")
    (folder / "corrupt.png").write_text("not an image")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "colour.png")
    return folder


@pytest.mark.slow
def test_help_lists_the_commands(capsys):
    result = frmap("--help")
    assert result.returncode == 0
    for command in ("score", "calibrate", "attack", "evaluate", "visualize", "bench", "demo",
                    "train-digits", "serve"):
        assert command in result.stdout
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: frmap " + command in capsys.readouterr().out


@pytest.mark.slow
def test_unknown_command_fails():
    result = frmap("no-such-command")
    assert result.returncode != 0
    assert "invalid choice" in result.stderr


@pytest.mark.slow
def test_score_reports_and_skips_bad_files(digit_files):
    result = frmap("score", str(digit_files))
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 6
    assert {"path", "prediction", "confidence", "scores", "combined", "flagged"} == set(lines[0])
    assert all(line["flagged"] is None and set(line["scores"]) == {"entropy"} for line in lines)
    assert "corrupt.png: unreadable or corrupt" in result.stderr
    assert "colour.png: colour image" in result.stderr


@pytest.mark.slow
def test_score_paths_on_stdin_match_arguments(digit_files):
    files = sorted(str(p) for p in digit_files.glob("d*.png"))
    by_args = frmap("score", *files)
    by_stdin = frmap("score", "-", stdin="\n".join(files) + "\n")
    assert by_args.returncode == by_stdin.returncode == 0
    assert by_args.stdout == by_stdin.stdout


@pytest.mark.slow
def test_calibrate_then_score_with_screener(digit_files, tmp_path):
    out = tmp_path / "s.frmap"
    result = frmap("calibrate", "--fpr", "0.1", "--footprint", "disk2", "--detectors",
                   "entropy,squeeze", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["clean_images"] > 300 and summary["decision"] == "any"
    assert all(f <= 0.05 for f in summary["achieved_fpr"].values())  # 0.1 / 2 detectors
    scored = frmap("score", *sorted(str(p) for p in digit_files.glob("d*.png")),
                   "--screener", str(out))
    assert scored.returncode == 0, scored.stderr
    thresholds = summary["thresholds"]
    for line in map(json.loads, scored.stdout.splitlines()):
        assert line["flagged"] == any(line["scores"][k] > t for k, t in thresholds.items())


@pytest.mark.slow
def test_an_entropy_detector_file_still_screens(digit_files, tmp_path):
    from frmap.engine.data import parse_footprint
    from frmap.engine.detectors import EntropyDetector
    from frmap.engine.models import load_digits_model, model_identity
    from frmap.engine.responses import ResponseEngine

    model = load_digits_model()
    clean = load_digits_split("calibration").images[:100]
    scores = ResponseEngine(model, preprocess=None).scores(clean, parse_footprint("disk2"))
    det = EntropyDetector.fit(scores.numpy(), fpr=0.2, footprint="disk2", rule="guided",
                              target="conv_max", model=model_identity(model))
    scored = frmap("score", *sorted(str(p) for p in digit_files.glob("d*.png")),
                   "--detector", str(det.save(tmp_path / "det.npz")))
    assert scored.returncode == 0, scored.stderr
    threshold = load_detector(tmp_path / "det.npz").threshold.value
    for line in map(json.loads, scored.stdout.splitlines()):
        assert line["flagged"] == (line["scores"]["entropy"] > threshold)


@pytest.mark.slow
def test_detector_from_another_model_is_refused(digit_files, tmp_path):
    det = tmp_path / "det.npz"
    assert frmap("calibrate", "--out", str(det)).returncode == 0
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    from frmap.engine.models.digits import load_digits_model

    model = load_digits_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(iter(state))
    state[first] += 0.01
    save_file(state, other)
    result = frmap("score", str(digit_files / "d0_7.png"), "--weights", str(other),
                   "--detector", str(det))
    assert result.returncode == 1
    assert "made for model" in result.stderr
    for bad, match in (("missing.json", "no such screener"), ("det.txt", "neither a screener")):
        (tmp_path / "det.txt").write_text("{}")
        result = frmap("score", str(digit_files / "d0_7.png"), "--detector", str(tmp_path / bad))
        assert result.returncode == 1 and match in result.stderr


@pytest.mark.slow
def test_bad_arguments_fail_clearly(tmp_path):
    assert "no such file or folder" in frmap("score", str(tmp_path / "nope")).stderr
    (tmp_path / "empty").mkdir()
    result = frmap("score", str(tmp_path / "empty"))
    assert result.returncode == 1 and "holds no image files" in result.stderr
    result = frmap("score", str(tmp_path), "--footprint", "blob7")
    assert result.returncode == 2 and "argument --footprint: unknown footprint" in result.stderr


def test_a_user_error_is_one_clean_line(tmp_path, capsys):
    assert main(["score", "--screener", str(tmp_path / "missing.npz"), "x.png"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("frmap score: error: ") and "no such screener file" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(("raised", "said"), [
    (FrmapError("--address 10.0.0.9:6379: no Ray cluster answers there"), "no Ray cluster"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory (try a"),
    (MemoryError(), "out of memory (try a"),
])
def test_what_a_person_fixes_is_one_line(monkeypatch, capsys, raised, said):
    import frmap.engine.cli.commands as commands

    def fail(args):
        raise raised
    monkeypatch.setattr(commands, "load_model", fail)
    assert main(["score", "x.png"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("frmap score: error: ") and said in err and len(err.splitlines()) == 1


def test_another_runtime_error_is_a_bug(monkeypatch):
    """torch's own RuntimeErrors (a shape mismatch deep in a model) are not the user's to fix."""
    import frmap.engine.cli.commands as commands

    def fail(args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(commands, "load_model", fail)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        main(["score", "x.png"])


def test_serve_shortens_openmp_spinning_before_torch_loads():
    """`frmap serve` sets GOMP_SPINCOUNT before torch (and its OpenMP) is imported, unless the
    caller set it."""
    code = ("import sys, types, os\n"
            "fake = types.ModuleType('frmap.engine.cli.commands')\n"
            "fake.cmd_serve = lambda args: print(os.environ.get('GOMP_SPINCOUNT'),"
            " 'torch' in sys.modules) or 0\n"
            "sys.modules['frmap.engine.cli.commands'] = fake\n"
            "from frmap.engine.cli.main import main\n"
            "sys.exit(main(['serve', '--screener', 'x.frmap']))\n")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    for given, said in ((None, "1000 False"), ("77", "77 False")):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=env if given is None else {**env, "GOMP_SPINCOUNT": given})
        assert result.returncode == 0 and result.stdout.strip() == said, result.stderr


@pytest.mark.slow
def test_a_bug_keeps_its_traceback():
    """An internal TypeError is a bug: not printed as bad input, but raised with its traceback."""
    code = ("import sys\n"
            "import frmap.engine.cli.commands as commands\n"
            "def broken(args):\n"
            "    raise TypeError('an internal bug')\n"
            "commands.load_model = broken\n"
            "from frmap.engine.cli.main import main\n"
            "sys.exit(main(['score', 'x.png']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "error:" not in result.stderr
    assert "Traceback" in result.stderr and "TypeError: an internal bug" in result.stderr


@pytest.mark.slow
def test_attack_is_resumable_and_visualize_draws(tmp_path, digit_files):
    out = tmp_path / "fgsm"
    first = frmap("attack", "--attack", "fgsm", "--limit", "12", "--out", str(out))
    assert first.returncode == 0, first.stderr
    shards = sorted(p.name for p in out.iterdir())
    again = frmap("attack", "--attack", "fgsm", "--limit", "12", "--out", str(out))
    assert again.returncode == 0 and sorted(p.name for p in out.iterdir()) == shards
    assert first.stdout.splitlines()[1] == again.stdout.splitlines()[1]
    png = tmp_path / "trace.png"
    result = frmap("visualize", str(digit_files / "d0_7.png"), "--out", str(png))
    assert result.returncode == 0, result.stderr
    assert Image.open(png).size[0] > 300
    result = frmap("visualize", str(digit_files / "d0_7.png"), "--precision", "bf16", "--out",
                   str(tmp_path / "trace-bf16.png"))
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_bf16_screener_scores_in_bf16(tmp_path, digit_files):
    """`calibrate --precision bf16` records the precision; `score --screener` computes in it, and
    refuses a --precision that would void the threshold."""
    from frmap.engine.data import parse_footprint
    from frmap.engine.data.images import DIGITS_IMAGES, load_image
    from frmap.engine.models import load_digits_model
    from frmap.engine.responses import ResponseEngine

    screener = tmp_path / "bf16.frmap"
    result = frmap("calibrate", "--detectors", "entropy", "--precision", "bf16", "--out",
                   str(screener))
    assert result.returncode == 0, result.stderr
    files = sorted(digit_files.glob("d*.png"))
    result = frmap("score", "--screener", str(screener), *map(str, files))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    scores = np.array([json.loads(line)["scores"]["entropy"] for line in lines])
    images = torch.stack([load_image(f, DIGITS_IMAGES) for f in files])
    model = load_digits_model()
    for precision, close in (("bf16", True), ("float32", False)):
        reference = ResponseEngine(model, preprocess=None, precision=precision).scores(
            images, parse_footprint("square3")).numpy()
        assert np.allclose(scores, reference, rtol=0, atol=1e-6) == close, precision
    result = frmap("score", "--screener", str(screener), "--precision", "float32", str(files[0]))
    assert result.returncode == 1 and f"{screener}: its entropy detector was calibrated in bf16" \
        in result.stderr and "Traceback" not in result.stderr and not result.stdout
    # auto keeps the file's precision with a screener
    result = frmap("score", "--screener", str(screener), "--precision", "auto", str(files[0]))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["scores"]["entropy"] == scores[0]
    # the file fixes the detectors' settings: flags that would change them are refused
    result = frmap("score", "--screener", str(screener), "--rule", "deconvnet", "--footprint",
                   "disk2", str(files[0]))
    assert result.returncode == 1 and not result.stdout and "Traceback" not in result.stderr
    assert f"{screener}: a screener file fixes its detectors' settings; leave out --rule, " \
        "--footprint" in result.stderr


@pytest.mark.slow
def test_precision_auto_records_what_the_cpu_runs(tmp_path):
    """`calibrate --precision auto` writes the precision it resolved to, never "auto"."""
    from frmap.engine.models import load_digits_model
    from frmap.engine.models.runtime import native_bf16
    from frmap.engine.screening import Screener

    out = tmp_path / "auto.frmap"
    result = frmap("calibrate", "--detectors", "entropy", "--precision", "auto", "--out", str(out))
    assert result.returncode == 0, result.stderr
    detector = Screener.load(out, load_digits_model()).detectors["entropy"]
    expected = "bf16-backward" if native_bf16(torch.device("cpu")) else "float32"
    assert detector.precision == expected


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_score_on_cuda_gives_the_cpus_scores(tmp_path, digit_files):
    screener = tmp_path / "s.frmap"
    result = frmap("calibrate", "--detectors", "entropy,knn,squeeze", "--out", str(screener))
    assert result.returncode == 0, result.stderr
    files = [str(f) for f in sorted(digit_files.glob("d*.png"))]
    runs = [frmap("score", "--screener", str(screener), "--device", device, *files)
            for device in ("cpu", "cuda")]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    cpu, cuda = ([json.loads(line) for line in r.stdout.splitlines()] for r in runs)
    assert [r["prediction"] for r in cuda] == [r["prediction"] for r in cpu]
    for name, atol in (("knn", 1e-4), ("squeeze", 1e-4), ("entropy", 0.05)):
        np.testing.assert_allclose([r["scores"][name] for r in cuda],
                                   [r["scores"][name] for r in cpu], rtol=0, atol=atol)


@pytest.mark.slow
@pytest.mark.needs_extension
def test_bench_entropy_quick_writes_json(tmp_path):
    out = tmp_path / "sub" / "bench.json"
    result = frmap("bench", "entropy", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "x skimage" in result.stdout
    data = json.loads(out.read_text())
    assert {"skimage", "cpu"} <= {row["backend"] for row in data["rows"]}
    assert all(row["seconds"] > 0 for row in data["rows"])
    assert not list(out.parent.glob(".*.tmp")), "temporary file left behind"


@pytest.mark.slow
def test_bench_entropy_cuda_rows_or_why_not(tmp_path):
    """On a GPU host the Triton rows with their operation-count estimates; elsewhere the
    command says that the CUDA rows are skipped, and why. Other targets have no CUDA rows."""
    import torch

    out = tmp_path / "cuda.json"
    result = frmap("bench", "entropy", "--device", "cuda", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    if torch.cuda.is_available():
        assert data["skipped"] is None and len(data["rows"]) == 2
        assert all(r["triton_pix_per_s"] > 0 and r["est_register_ops"] > 0 for r in data["rows"])
    else:
        assert "CUDA rows skipped: no CUDA device" in result.stdout
        assert data["rows"] == []
    result = frmap("bench", "attacks", "--device", "cuda")
    assert result.returncode == 1 and "`frmap bench attacks` has no --device cuda rows" in \
        result.stderr


@pytest.mark.slow
def test_bench_responses_cuda_rows_or_why_not(tmp_path):
    """On a GPU host every method's rows and the screening throughput; elsewhere the command
    says that the CUDA rows are skipped, and why, and exits 0."""
    import torch

    out = tmp_path / "cuda.json"
    result = frmap("bench", "responses", "--device", "cuda", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    if torch.cuda.is_available():
        assert data["skipped"] is None and len(data["rows"]) == 4 and len(data["screening"]) == 2
        assert all(r["images_per_s"] > 0 and r["peak_mib"] > 0 for r in data["rows"])
    else:
        assert "CUDA rows skipped: no CUDA device" in result.stdout
        assert data["rows"] == [] and data["screening"] == []


@pytest.mark.slow
def test_bench_responses_and_detectors_quick(tmp_path):
    """The smoke runs: every method measured and checked against float64 Captum."""
    out = tmp_path / "responses.json"
    result = frmap("bench", "responses", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert {r["method"] for r in data["rows"]} == {"reverse_walk", "reverse_walk_bf16",
                                                    "autograd", "captum"}
    assert all(r["seconds"] > 0 and r["peak_mib"] > 0 for r in data["rows"])
    errors = data["errors_vs_float64"][0]
    assert all(errors[m]["l2_rel"] < 1e-5 for m in ("reverse_walk", "autograd", "captum"))
    assert 1e-4 < errors["reverse_walk_bf16"]["l2_rel"] < 0.1
    assert {s["method"] for s in data["conv_share"]} == {"reverse_walk", "autograd"}
    result = frmap("bench", "detectors", "--quick")
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stdout


@pytest.mark.slow
def test_imagenet_path_end_to_end_with_random_weights(tmp_path):
    """Mechanics, not accuracy: VGG11 with random weights on foolbox's ImageNet samples."""
    samples = sorted((Path(foolbox.__file__).parent / "data").glob("imagenet_0[0-3]_*.jpg"))
    data = tmp_path / "imagenet"
    data.mkdir()
    for path in samples:
        shutil.copy(path, data)
    out = tmp_path / "study"
    result = frmap("evaluate", "--model", "vgg11", "--data", str(data), "--labels", "predicted",
                   "--attacks", "fgsm", "--footprints", "square3", "--batch-size", "2",
                   "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "fgsm" in result.stdout
    study = json.loads((out / "study.json").read_text())
    assert study["model"].startswith("VGG:") and study["footprint"] == "square3"
    assert (out / "roc.png").exists() and (out / "detector.npz").exists()


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = frmap("demo", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    for attack in ("fgsm", "gradient", "one_pixel", "deepfool", "boundary"):
        assert attack in result.stdout
    for name in ("study.json", "results.json", "results.csv", "attacks.json", "detector.npz",
                 "roc.png", "histogram.png", "trace.png"):
        assert (out / name).is_file(), name
    assert not list(out.rglob(".*.tmp")), "temporary file left behind"


@pytest.mark.slow
def test_bench_screen_quick(tmp_path):
    """The smoke run: every set in every offered precision, as multiples of the forward pass."""
    from frmap.engine.responses import PRECISIONS

    out = tmp_path / "screen.json"
    result = frmap("bench", "screen", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    rows = {(r["detectors"], r["batch"], r["precision"], r["compiled"]): r
            for r in data["rows"]}
    for batch in (1, 16):
        assert rows[("forward", batch, "float32", False)]["forward_passes"] == 1.0
        for precision in PRECISIONS:
            assert ("entropy+knn+squeeze", batch, precision, False) in rows
        assert ("knn", batch, "float32", False) in rows and ("knn", batch, "bf16", False) \
            not in rows
    # one digit also runs compiled, each float32 set with entropy
    assert {k[0] for k in rows if k[3]} == {"entropy", "entropy+knn", "entropy+knn+squeeze"}
    assert {(k[1], k[2]) for k in rows if k[3]} == {(1, "float32")}
    assert all(r["seconds"] > 0 and r["forward_passes"] > 0 for r in data["rows"])
    assert "x forward" in result.stdout and data["machine"]["cpu"]


@pytest.mark.slow
def test_help_answers_without_the_engine():
    """`frmap --help` and every `frmap CMD --help` build the parser without importing torch or
    the engine's heavy modules; the names the parser offers are the engine's own."""
    code = ("import sys\n"
            "from frmap.engine.cli.main import build_parser\n"
            "parser = build_parser()\n"
            "for command in parser._subparsers._group_actions[0].choices:\n"
            "    try:\n"
            "        parser.parse_args([command, '--help'])\n"
            "    except SystemExit as done:\n"
            "        assert done.code == 0, command\n"
            "heavy = ('torch', 'torchvision', 'foolbox', 'sklearn', 'matplotlib', 'ray',\n"
            "         'skimage')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"

    from frmap.engine.attacks import ATTACKS
    from frmap.engine.cli import options
    from frmap.engine.data.footprints import STUDY
    from frmap.engine.data.images import MAX_PIXELS
    from frmap.engine.evaluation.comparison import DETECTORS
    from frmap.engine.models.named import MODELS
    from frmap.engine.responses import PRECISIONS, TARGETS

    assert options.ATTACKS == tuple(ATTACKS) and options.DETECTORS == DETECTORS
    assert options.TARGETS == TARGETS and options.PRECISIONS == tuple(PRECISIONS)
    assert options.MODELS == tuple(MODELS) and options.STUDY == STUDY
    assert options.MAX_PIXELS == MAX_PIXELS
    assert all(importlib.util.find_spec(f"frmap.bench.{name}") for name in options.BENCHMARKS)
    from frmap.bench.responses import MODELS as BENCH_MODELS

    assert options.BENCH_MODELS == BENCH_MODELS
