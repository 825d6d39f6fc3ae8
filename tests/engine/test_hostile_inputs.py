"""Hostile and careless input: never lose data, never disable detection silently, never leak a
traceback.

Every case asserts a clear message naming the file, field or argument, the documented exit code
(1 for bad inputs, 2 for bad arguments), no traceback, the good inputs of the same run still
processed, and no file changed but frmap's own. The generated cases mutate valid files with
hypothesis. Commands run in-process (`frmap.engine.cli.main`) except the kill-and-resume test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from filelock import FileLock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from frmap.engine.attacks.sets import generate, load_adversarial_set
from frmap.engine.cli import main
from frmap.engine.data import DIGITS_IMAGES, load_digits_split
from frmap.engine.data.files import atomic_write_bytes, write_json
from frmap.engine.data.images import ImageFileError, load_image
from frmap.engine.detectors import (
    DistanceEvolutionDetector,
    EntropyDetector,
    EvolutionConfig,
    Features,
    FeatureSqueezer,
    KNNConfig,
    KNNDetector,
    Threshold,
    load_detector,
)
from frmap.engine.detectors.distance_evolution import EvolutionTrainReport, _network
from frmap.engine.models.digits import CHECKPOINT, load_digits_model
from frmap.engine.models.predict import predict
from frmap.engine.models.runtime import model_identity
from frmap.engine.responses.engine import ResponseEngine
from frmap.kernels import local_entropy, response_score

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def cli(*args: str, stdin: str = "") -> tuple[int, str, str]:
    """Run `frmap` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exit_:
                code = exit_.code
    finally:
        sys.stdin = old_stdin
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return code, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and mode."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def digit_png(path: Path, i: int, label_shift: int = 0) -> Path:
    split = load_digits_split("test")
    pixels = (split.images[i, 0].numpy() * 255).round().astype(np.uint8)
    path = path.with_name(f"{path.stem}_{(int(split.labels[i]) + label_shift) % 10}.png")
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture()
def good(tmp_path) -> list[Path]:
    folder = tmp_path / "good"
    folder.mkdir()
    return [digit_png(folder / f"g{i}", i) for i in range(3)]


def score_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


# 1. Data loss

def test_attack_never_removes_or_adopts_a_users_files(tmp_path):
    out = tmp_path / "u"
    out.mkdir()
    (out / ".draft.tmp").write_text("x")
    before = snapshot(tmp_path)
    code, stdout, err = cli("attack", "--attack", "fgsm", "--limit", "4", "--out", out)
    assert code == 1 and f"{out} is not empty and holds no adversarial set" in err
    assert ".draft.tmp" in err and snapshot(tmp_path) == before and stdout == ""

    fresh = tmp_path / "fresh"
    assert cli("attack", "--attack", "fgsm", "--limit", "4", "--out", fresh)[0] == 0
    (fresh / ".draft.tmp").write_text("mine")
    (fresh / ".frmap-shard-00000.npz.a1b2.tmp").write_bytes(b"a killed write")
    assert cli("attack", "--attack", "fgsm", "--limit", "4", "--out", fresh)[0] == 0
    assert (fresh / ".draft.tmp").read_text() == "mine"
    assert not (fresh / ".frmap-shard-00000.npz.a1b2.tmp").exists()


# 2. Detector files

V1 = {"format": "frmap.entropy-detector/1", "threshold": 2.5, "fpr": 0.05,
      "achieved_fpr": 0.048, "n_clean": 356, "footprint": "square3", "rule": "guided",
      "target": "conv_max", "model": model_identity(load_digits_model())}


@pytest.mark.parametrize(("field", "value", "named"), [
    ("threshold", float("nan"), "threshold"),
    ("threshold", float("-inf"), "threshold"),
    ("threshold", "2.4", "threshold"),
    ("threshold", None, "threshold"),
    ("footprint", "square999999", "footprint"),
    ("footprint", 3, "footprint"),
    ("footprint", "disk0", "footprint"),
    ("target", 7, "target"),
    ("rule", "sideways", "rule"),
    ("n_clean", -1, "threshold.n_clean"),
    ("fpr", 2, "threshold.fpr"),
    ("model", None, "model"),
])
def test_detector_json_fields_are_validated(tmp_path, good, field, value, named):
    path = tmp_path / "det.json"
    path.write_text(json.dumps({**V1, field: value}))
    code, stdout, err = cli("score", *good, "--detector", path)
    assert code == 1 and stdout == ""
    assert f"{path}: " in err and f"malformed entropy detector: field '{named}" in err


def test_version_one_detector_json_still_scores(tmp_path, good):
    path = tmp_path / "det.json"
    path.write_text(json.dumps(V1))
    code, stdout, _ = cli("score", *good, "--detector", path)
    assert code == 0 and [r["flagged"] for r in score_lines(stdout)] == [
        r["scores"]["entropy"] > 2.5 for r in score_lines(stdout)]


def _detectors() -> list:
    rng = np.random.default_rng(0)
    layers = {"a": rng.normal(size=(30, 6)).astype(np.float32),
              "b": rng.normal(size=(30, 4)).astype(np.float32)}
    features = Features(layers, rng.normal(size=(30, 3)).astype(np.float32))
    labels = np.arange(30) % 3
    threshold = Threshold(0.5, 0.05, 0.05, 30)
    config = EvolutionConfig(("a", "b"), network="mlp", hidden=8, epochs=1)
    references = {k: rng.normal(size=(3, v.shape[1])) for k, v in layers.items()}
    state = {k: v.numpy() for k, v in _network(config, 3).state_dict().items()}
    return [
        EntropyDetector("square3", "guided", "conv_max", "Net:abc", threshold),
        KNNDetector.fit(features, labels, KNNConfig("a", components=4, k=5),
                        model="Net:abc").calibrate(rng.random(30), 0.1),
        FeatureSqueezer(model="Net:abc", threshold=threshold),
        DistanceEvolutionDetector(config, "Net:abc", references, np.zeros(2), np.ones(2), state,
                                  EvolutionTrainReport(1, {"fgsm": 0.5}, (0.5,)), threshold),
    ]


def _npz(meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
    return buf.getvalue()


def _read_npz(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def _paths(meta: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON document."""
    if isinstance(meta, dict):
        return [p for k, v in meta.items() for p in [(*prefix, k), *_paths(v, (*prefix, k))]]
    return []


JSON = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(
    max_size=8) | st.sampled_from(["square999999", "disk0", "guided", "mlp", "a", "1e308", [],
                                   [1, "x"], {}, {"value": 1}, ["a", "b"], 0, 1, 10**9])


@pytest.mark.parametrize("kind", range(4))
@FUZZ
@given(data=st.data())
def test_mutated_detector_files_load_or_fail_clearly(tmp_path, kind, data):
    detector = _detectors()[kind]
    path = tmp_path / "det.npz"
    detector.save(path)
    meta, arrays = _read_npz(path)
    if not arrays or data.draw(st.booleans(), "mutate meta"):
        key = data.draw(st.sampled_from(_paths(meta)), "field")
        *parents, last = key
        target = meta
        for k in parents:
            target = target[k]
        if data.draw(st.booleans(), "delete"):
            del target[last]
        else:
            target[last] = data.draw(JSON, "value")
    else:
        name = data.draw(st.sampled_from(sorted(arrays)), "array")
        change = data.draw(st.sampled_from(["nan", "int", "shape", "drop", "object"]), "how")
        a = arrays[name]
        if change == "nan" and a.dtype.kind == "f" and a.size:
            a = a.copy()
            a.flat[0] = np.nan
        elif change == "int":
            a = a.astype(np.int32)
        elif change == "shape":
            a = a.reshape(-1)[: max(a.size - 1, 0)]
        elif change == "object":
            a = np.array(["x"] * max(a.size, 1))
        if change == "drop":
            del arrays[name]
        else:
            arrays[name] = a
    path.write_bytes(_npz(meta, arrays))
    try:
        loaded = load_detector(path)
    except ValueError as err:
        assert str(err).startswith(f"{path}: "), err
        return
    t = loaded.threshold
    assert t is None or (np.isfinite(t.value) and 0 <= t.fpr <= 1 and t.n_clean >= 1)


@FUZZ
@given(cut=st.integers(0, 10**6), flips=st.lists(st.integers(0, 10**6), max_size=4))
def test_corrupt_detector_bytes_fail_clearly(tmp_path, cut, flips):
    path = tmp_path / "det.npz"
    _detectors()[1].save(path)
    raw = bytearray(path.read_bytes())
    for i in flips:
        raw[i % len(raw)] ^= 0xFF
    path.write_bytes(bytes(raw[: cut % (len(raw) + 1)]))
    try:
        load_detector(path)
    except ValueError as err:
        assert str(err).startswith(f"{path}: "), err


# 3. Bad paths

def test_score_reports_each_bad_path_and_scores_the_rest(tmp_path, good):
    (tmp_path / "empty").mkdir()
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    os.mkfifo(tmp_path / "pipe.png")
    bad = [tmp_path / "nonexistent.png", tmp_path / "loop.png", tmp_path / "empty",
           tmp_path / "pipe.png"]
    before = snapshot(tmp_path)
    code, stdout, err = cli("score", good[0], good[1], *bad, good[2])
    assert code == 1
    assert [r["path"] for r in score_lines(stdout)] == [str(p) for p in good]
    for path, why in zip(bad, ("no such file", "symbolic link loop", "no image files",
                               "not a regular file"), strict=True):
        assert f"{path}: " in err and why in err
    assert "4 file(s) skipped" in err and snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_unreadable_file_and_folder_are_skipped(tmp_path, good):
    locked, folder = tmp_path / "locked.png", tmp_path / "closed"
    locked.write_bytes(good[0].read_bytes())
    folder.mkdir()
    locked.chmod(0)
    folder.chmod(0)
    try:
        code, stdout, err = cli("score", locked, folder, good[1])
    finally:
        locked.chmod(0o644)
        folder.chmod(0o755)
    assert code == 1 and len(score_lines(stdout)) == 1
    assert f"{locked}: " in err and f"{folder}: folder cannot be read" in err


# 4. Oversized images

def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG claiming width x height (8-bit gray) with one empty data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_oversized_images_are_refused_from_the_header(tmp_path, good):
    huge, bomb = tmp_path / "huge.png", tmp_path / "bomb.png"
    _png_header_only(huge, 9000, 9000)
    _png_header_only(bomb, 20000, 20000)
    code, stdout, err = cli("score", good[0], huge, bomb, good[1])
    assert code == 1 and len(score_lines(stdout)) == 2
    assert f"{huge}: 9000x9000 is 81000000 pixels, above the limit of 40000000" in err
    assert f"{bomb}: " in err
    code, stdout, err = cli("score", "--max-pixels", "1000", good[0])
    assert code == 1 and stdout == "" and "above the limit of 1000" in err
    code, _, err = cli("evaluate", "--data", tmp_path, "--max-pixels", "0")
    assert code == 2 and "--max-pixels" in err


# 5. Silent wrong results

def test_sixteen_bit_grayscale_is_scaled(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (32, 32), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    loaded = load_image(tmp_path / "g16.png", DIGITS_IMAGES)
    np.testing.assert_allclose(loaded[0].numpy(), values / 65535.0, rtol=1e-6)


def test_gifs_palette_gray_and_multiframe(tmp_path):
    gray = np.random.default_rng(1).integers(0, 4, (32, 32), dtype=np.uint8)
    palette = Image.fromarray(gray, mode="P")
    palette.putpalette([0, 0, 0, 85, 85, 85, 170, 170, 170, 255, 255, 255])
    palette.save(tmp_path / "gray-palette.gif")
    np.testing.assert_allclose(load_image(tmp_path / "gray-palette.gif", DIGITS_IMAGES)[0],
                               gray * 85 / 255.0, atol=1e-7)
    Image.fromarray(gray * 85).save(tmp_path / "gray.gif")
    np.testing.assert_allclose(load_image(tmp_path / "gray.gif", DIGITS_IMAGES)[0],
                               gray * 85 / 255.0, atol=1e-7)
    colour = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), np.uint8))
    colour.convert("P").save(tmp_path / "colour.gif")
    with pytest.raises(ImageFileError, match="colour image; the model takes grayscale"):
        load_image(tmp_path / "colour.gif", DIGITS_IMAGES)
    frame = Image.fromarray(gray * 85)
    for ext in ("gif", "tif"):  # two different frames (GIF merges equal ones)
        frame.save(tmp_path / f"multi.{ext}", save_all=True,
                   append_images=[Image.fromarray(255 - gray * 85)])
        with pytest.raises(ImageFileError, match=f"multi.{ext}: 2 frames"):
            load_image(tmp_path / f"multi.{ext}", DIGITS_IMAGES)


class _Net(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.relu, self.act, self.fc = nn.ReLU(), act, nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv2(self.relu(self.conv(x)))).flatten(1))


class _Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


RECTIFIERS = {
    "clamp(min=0)": (lambda t: t.clamp(min=0), "aten.clamp"),
    "F.threshold": (lambda t: F.threshold(t, 0.0, 0.0), "aten.threshold"),
    "torch.ops.aten.relu": (torch.ops.aten.relu, "aten.relu"),
    "nn.ReLU6": (nn.ReLU6(), "aten.hardtanh"),
    "Tensor.relu": (lambda t: t.relu(), "Tensor.relu"),
}


# rectifiers the reverse walk reads as ReLUs (tests/engine/test_traced_walk.py checks their
# responses against nn.ReLU modules); the others it refuses, naming them
WALKED = ("clamp(min=0)", "Tensor.relu")


@pytest.mark.parametrize("name", RECTIFIERS)
@pytest.mark.parametrize("target", ["conv_max", "logit", 1])
def test_rectifiers_that_are_not_relu_modules_raise(name, target):
    """Never silently a plain gradient: the walk takes a rectifier as a ReLU or refuses it, and
    the autograd path, where no rule can act on one, raises naming it."""
    act, op = RECTIFIERS[name]
    x = torch.rand(2, 1, 8, 8)
    chain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(),
                          act if isinstance(act, nn.Module) else _Lambda(act),
                          nn.Flatten(), nn.Linear(144, 3))
    for model in (_Net(act), chain):
        with pytest.raises(ValueError, match=op):
            ResponseEngine(model, preprocess=None, target=target, path="autograd").responses(x)
        engine = ResponseEngine(model, preprocess=None, target=target)
        if name in WALKED:
            assert engine.path == "reverse_walk"
            continue
        assert engine.path == "autograd" and "the reverse walk does not support" in \
            engine.fallback
        with pytest.raises(ValueError, match=op):
            engine.responses(x)
        with pytest.raises(ValueError, match="the reverse walk does not support"):
            ResponseEngine(model, preprocess=None, path="reverse_walk")


def test_a_forward_without_relus():
    """No ReLU runs: the autograd path cannot tell a rule's work from a missed rectifier and
    raises; the walk, which refuses every rectifier it does not read, gives the gradient."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 3))
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="no nn.ReLU module runs"):
        ResponseEngine(model, preprocess=None, target="logit", path="autograd").responses(x)
    guided = ResponseEngine(model, preprocess=None, target="logit").responses(x)
    gradient = ResponseEngine(model, preprocess=None, target="logit", rule="gradient",
                              path="autograd").responses(x)
    torch.testing.assert_close(guided, gradient, rtol=1e-5, atol=1e-7)


def _weights(tmp_path: Path, change) -> Path:
    state = {k: v.clone() for k, v in load_digits_model().state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = change(state[name])
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    return path


def test_bad_weights_are_refused(tmp_path, good):
    path = _weights(tmp_path, lambda t: (t * 100).to(torch.int32))
    code, stdout, err = cli("score", *good, "--weights", path)
    assert code == 1 and stdout == "" and "torch.int32" in err and "refusing to cast" in err
    path = _weights(tmp_path, lambda t: t * float("nan"))
    code, _, err = cli("score", *good, "--weights", path)
    assert code == 1 and "holds NaN or Inf" in err
    vgg_like = tmp_path / "x.pt"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, vgg_like)
    code, _, err = cli("score", *good, "--weights", vgg_like)
    assert code == 1 and f"{vgg_like} does not fit DigitsCNN" in err and len(err) < 800
    code, _, err = cli("score", *good, "--weights", tmp_path / "missing.pt")
    assert code == 1 and f"no digits checkpoint at {tmp_path / 'missing.pt'}" in err


@pytest.mark.parametrize("footprint", ["disk0", "square1", "rect1x1", "square66", "blob"])
def test_useless_or_huge_footprints_are_refused_before_any_work(good, footprint):
    code, stdout, err = cli("score", *good, "--footprint", footprint)
    assert code == 2 and stdout == "" and "--footprint" in err and footprint in err


# 6. Tracebacks and cryptic errors

def _set(tmp_path: Path, name: str = "set", attack: str = "fgsm") -> tuple[Path, tuple]:
    model = load_digits_model()
    split = load_digits_split("test")
    case = (model, split.images[:8], split.labels[:8])
    out = tmp_path / name
    generate(attack, *case, out, shard_size=4)
    return out, case


def test_corrupt_shards_are_detected_and_recomputed(tmp_path):
    out, case = _set(tmp_path)
    whole = snapshot(out)
    shard = out / "shard-00001.npz"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="shard-00001.npz: missing, truncated or corrupt"):
        load_adversarial_set(out)
    raw = bytearray(whole["shard-00001.npz"][0])
    raw[-50] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard-00001.npz: missing, truncated or corrupt"):
        load_adversarial_set(out)
    generate("fgsm", *case, out, shard_size=4)
    assert snapshot(out) == whole


def test_manifest_of_the_wrong_shape_is_a_clear_error(tmp_path):
    out, case = _set(tmp_path)
    for text in ("[1, 2]", "{not json", '"a string"'):
        (out / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match="manifest.json: "):
            load_adversarial_set(out)
        code, _, err = cli("attack", "--attack", "fgsm", "--limit", "8", "--out", out)
        assert code == 1 and "manifest.json: " in err


def test_shards_record_their_maker(tmp_path):
    out, case = _set(tmp_path)
    other, _ = _set(tmp_path, "other", "gradient")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "shard-00000.npz").write_bytes((other / "shard-00000.npz").read_bytes())
    manifest["shard_sha256"][0] = json.loads(
        (other / "manifest.json").read_text())["shard_sha256"][0]
    write_json(out / "manifest.json", manifest)
    with pytest.raises(ValueError, match="shard-00000.npz: made by .*gradient"):
        load_adversarial_set(out)


def test_kernels_take_read_only_arrays():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    footprint, responses = np.ones((3, 3), np.uint8), rng.random((2, 3, 12, 12))
    expected = (local_entropy(image.copy(), footprint.copy()),
                response_score(responses.copy(), footprint.copy()))
    for a in (image, footprint, responses):
        a.setflags(write=False)
    np.testing.assert_array_equal(local_entropy(image, footprint), expected[0])
    np.testing.assert_array_equal(response_score(responses, footprint), expected[1])


def test_calibration_without_a_correct_image_is_explained(tmp_path):
    data = tmp_path / "wrong"
    data.mkdir()
    model = load_digits_model()
    split = load_digits_split("test")
    predicted = predict(model, split.images[:4])[0]
    for i in range(4):  # every file named for a class the model does not predict
        shift = 1 if int(predicted[i]) != (int(split.labels[i]) + 1) % 10 else 2
        digit_png(data / f"w{i}", i, shift + int(predicted[i]) - int(split.labels[i]))
    code, stdout, err = cli("calibrate", "--data", data, "--out", tmp_path / "d.npz")
    assert code == 1 and stdout == "" and "classifies none of its 4 images correctly" in err
    assert not (tmp_path / "d.npz").exists()


@pytest.mark.parametrize(("args", "named"), [
    (("attack", "--attack", "fgsm", "--out", "x", "--limit", "0"), "--limit"),
    (("attack", "--attack", "fgsm", "--out", "x", "--limit", "-5"), "--limit"),
    (("attack", "--attack", "fgsm", "--out", "x", "--limit", "2.5"), "--limit"),
    (("calibrate", "--out", "d.npz", "--fpr", "0"), "--fpr"),
    (("calibrate", "--out", "d.npz", "--fpr", "1"), "--fpr"),
    (("calibrate", "--out", "d.npz", "--fpr", "1.5"), "--fpr"),
    (("calibrate", "--out", "d.npz", "--fpr", "nan"), "--fpr"),
    (("score", "--batch-size", "0"), "--batch-size"),
    (("evaluate", "--footprints", "square3,disk0"), "--footprints"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, monkeypatch, args, named):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli(*args)
    assert code == 2 and stdout == "" and named in err
    assert list(tmp_path.iterdir()) == []


# 7. Concurrent writers

def test_a_second_writer_is_refused(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    with FileLock(out / ".frmap.lock"):
        code, _, err = cli("attack", "--attack", "fgsm", "--limit", "4", "--out", out)
    assert code == 1 and "another frmap run is writing this set" in err
    assert sorted(p.name for p in out.iterdir()) == [".frmap.lock"]


# 8. Output hygiene

def test_stdout_carries_results_only(good, monkeypatch):
    import frmap.engine.models.named as named

    def chatty(path=CHECKPOINT):
        print('Downloading: "https://example.org/w.pth" to /cache/w.pth')
        return load_digits_model(path)

    monkeypatch.setattr(named, "load_digits_model", chatty)
    code, stdout, err = cli("score", *good)
    assert code == 0 and len(score_lines(stdout)) == 3 and "Downloading" in err


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# Generated hostile image files

FORMATS = ("png", "jpg", "bmp", "gif", "tif", "webp", "ppm", "pgm")


@pytest.mark.parametrize("ext", FORMATS)
@FUZZ
@given(cut=st.floats(0, 1), flips=st.lists(st.integers(0, 10**6), max_size=6))
def test_corrupt_images_load_or_fail_clearly(tmp_path, ext, cut, flips):
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32), dtype=np.uint8)
    path = tmp_path / f"x.{ext}"
    Image.fromarray(pixels).save(path)
    raw = bytearray(path.read_bytes())
    for i in flips:
        raw[i % len(raw)] ^= 0xA5
    path.write_bytes(bytes(raw[: int(cut * len(raw))]))
    try:
        image = load_image(path, DIGITS_IMAGES)
    except ImageFileError as err:
        assert str(err).startswith(f"{path}: ")
        return
    assert image.shape == (1, 32, 32) and bool(((image >= 0) & (image <= 1)).all())


@pytest.mark.parametrize("mode", ["RGBA", "LA", "CMYK", "F", "I", "YCbCr", "HSV", "1"])
def test_odd_modes_load_or_fail_clearly(tmp_path, mode):
    path = tmp_path / f"odd.{'tif' if mode in ('F', 'I', 'CMYK', 'YCbCr') else 'png'}"
    try:
        Image.new(mode, (32, 32)).save(path)
    except OSError:
        pytest.skip(f"PIL cannot write {mode} to {path.suffix}")
    try:
        image = load_image(path, DIGITS_IMAGES)
    except ImageFileError as err:
        assert str(err).startswith(f"{path}: ")
        return
    assert image.shape == (1, 32, 32)


def test_a_run_of_hostile_files_scores_the_good_ones(tmp_path, good):
    bad = []
    for i, ext in enumerate(FORMATS):
        path = tmp_path / f"bad{i}.{ext}"
        Image.fromarray(np.full((32, 32), 7, np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[: 20 + i])
        bad.append(path)
    before = snapshot(tmp_path)
    code, stdout, err = cli("score", good[0], *bad, good[1], good[2])
    assert code == 1 and [r["path"] for r in score_lines(stdout)] == [str(p) for p in good]
    assert all(f"{p}: " in err for p in bad) and snapshot(tmp_path) == before


# Kill and resume

# `frmap attack` with every rename slowed down, so that a kill can land between any two writes.
_DRIVER = """
import os, sys, time
replace = os.replace
def slow(src, dst):
    time.sleep(0.15)
    replace(src, dst)
os.replace = slow
from frmap.engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _attack(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _DRIVER, "attack", "--attack", "fgsm", "--limit", "20",
         "--shard-size", "4", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while not ready() and process.poll() is None and time.monotonic() - start < timeout:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_attack_killed_at_several_points_resumes_to_the_same_bytes(tmp_path):
    args = ("attack", "--attack", "fgsm", "--limit", "20", "--shard-size", "4", "--out")
    assert cli(*args, tmp_path / "whole")[0] == 0
    expected = snapshot(tmp_path / "whole")
    assert len([k for k in expected if k.startswith("shard-")]) == 5
    points = {
        "after the manifest": lambda out: (out / "manifest.json").exists(),
        "mid-write": lambda out: any(p.name.startswith(".frmap-") for p in out.glob("*")),
        "after two shards": lambda out: (out / "shard-00001.npz").exists(),
        "after four shards": lambda out: (out / "shard-00003.npz").exists(),
    }
    for i, (point, ready) in enumerate(points.items()):
        out = tmp_path / f"killed{i}"
        _kill_when(_attack(out), lambda out=out, ready=ready: out.exists() and ready(out))
        assert snapshot(out) != expected, f"killed {point}: nothing left to resume"
        assert cli(*args, out)[0] == 0, point
        assert snapshot(out) == expected, point
