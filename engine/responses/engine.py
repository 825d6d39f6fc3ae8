"""Feature responses of images and their entropy scores: `ResponseEngine`.

A response is what a ReLU rule (`frmap.kernels.RULES`) back-propagates from a target
(`frmap.engine.responses.targets`) to the images (METHOD section 1, steps 1-3). Two paths compute
the same responses, chosen once, when the engine is built:

- "reverse_walk" (`frmap.engine.responses.reverse_walk`): any model whose forward torch.fx
  traces into ops the walk knows (`frmap.engine.responses.tracing`: convolutions, linear
  layers, batch norm, ReLUs as modules or functions, pools, reshapes, residual sums, ...);
  keeps 1 bit per ReLU input and the argmax of each max-pool window instead of the activations;
- "autograd" (`frmap.engine.responses.autograd_path`): any other model whose ReLUs are
  `nn.ReLU` modules; `ResponseEngine.fallback` says why the walk could not read it.

Precision, also chosen at construction: "float32" (the model's own dtype) or "bf16", the
convolutions and linear layers of the reverse walk in bfloat16 on weights cast once, everything
else exact given those bfloat16 activations (see `frmap.engine.responses.reverse_walk`). bf16
runs on the reverse walk only: through autocast and autograd it was slower than float32 on the
CPU where it was measured (0.4x), so the autograd path refuses it rather than run it slowly.
On CUDA, float32 convolutions run in IEEE float32: cuDNN's default TF32 is turned off while the
engine computes (and restored afterwards), so the GPU's responses are the CPU's to float32
rounding in another order, which can flip a rare ReLU mask or max-pool choice: the CUDA tests
hold them to 1e-3 relative L2 of float64 Captum. bf16 responses are off float64 by a relative L2
of 0.05 (guided), 0.12 (deconvnet), 0.35 (gradient, whose signed sums cancel) on VGG11 at 64x64,
and 0.03 from float32 on VGG19 at 224 (guided).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from frmap.engine.models.runtime import model_device, native_bf16
from frmap.engine.models.vgg import Normalized
from frmap.engine.responses.autograd_path import autograd_responses
from frmap.engine.responses.compiled_walk import CompiledWalk
from frmap.engine.responses.reverse_walk import ReverseWalk, WalkOutput
from frmap.engine.responses.targets import Target, check_target, target_classes
from frmap.engine.responses.tracing import Untraceable, trace_ops
from frmap.kernels import RULES, check_footprint, response_score
from frmap.kernels.errors import out_of_memory

T = TypeVar("T")

PATHS = ("auto", "reverse_walk", "autograd")
PREPROCESS = ("imagenet", None)
# precision -> the dtypes of the walk's convolutions and linear layers, forward and back (None:
# the model's own)
PRECISIONS = {"float32": (None, None), "bf16": (torch.bfloat16, torch.bfloat16),
              "bf16-backward": (None, torch.bfloat16)}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`precision`, with "auto" resolved for `device`: "bf16-backward" where it runs bfloat16
    natively (`native_bf16`), else "float32".

    bf16 in the walk back only keeps the forward pass (logits, features, masks) exact and moved
    every AUC of the digits study by at most 0.004; full "bf16" moved the minimal-L2 attacks'
    AUC by up to -0.06 (and was no faster on the CPU where both were measured), so "auto"
    never picks it.
    """
    if precision == "auto":
        return "bf16-backward" if native_bf16(device) else "float32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of "
                         f"{', '.join((*PRECISIONS, 'auto'))}")
    return precision


@dataclass(frozen=True)
class EngineConfig:
    """How a `ResponseEngine` computes (see its arguments)."""

    rule: str = "guided"
    target: str | int = "conv_max"
    batch_size: int = 8
    preprocess: str | None = "imagenet"
    path: str = "auto"
    precision: str = "float32"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {', '.join(RULES)}")
        check_target(self.target)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be 'imagenet' or None, got {self.preprocess!r}")
        if self.path not in PATHS:
            raise ValueError(f"unknown path {self.path!r}; choose one of {', '.join(PATHS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of "
                             f"{', '.join(PRECISIONS)}")
        if self.precision != "float32" and self.path == "autograd":
            raise ValueError(f"precision={self.precision!r} runs on the reverse walk only: the "
                             "autograd path computes in float32 (use path='reverse_walk' or "
                             "'auto')")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        if self.compile and self.path == "autograd":
            raise ValueError("compile=True compiles the reverse walk: use path='reverse_walk' or "
                             "'auto'")


@dataclass(frozen=True)
class Observation:
    """What `ResponseEngine.observe` gives for N images.

    Attributes:
        scores: footprint name -> [N] float64 entropy scores.
        logits: [N, K] float32 on the CPU; layers: name -> [N, D] float32 pooled outputs.
    """

    scores: dict[str, torch.Tensor]
    logits: torch.Tensor
    layers: dict[str, torch.Tensor]


class ResponseEngine:
    """Feature responses and detection scores of images for one model.

    Args:
        model: a CNN taking [N, C, H, W] images; its ReLUs must be `nn.ReLU` modules. It is put
            in eval mode while the engine runs and left exactly as it was afterwards.
        rule: "guided" (the paper's), "deconvnet" or "gradient".
        target: "conv_max" (the paper's), "logit" (top class) or one class index for every
            image; `responses`/`scores` may override it per call, also with one class per image.
        batch_size: images per pass through the model (halved, with a warning, when a batch
            does not fit in memory).
        device: where to compute; the model must already be there (default: where it is).
        preprocess: "imagenet" normalises [0, 1] RGB images with the ImageNet mean/std inside
            the differentiable model; None feeds the images as they are (any channel count).
        path: "reverse_walk", "autograd", or "auto" (the walk where it can read the model's
            forward: see `frmap.engine.responses.tracing`).
        precision: "float32" or "bf16" (the walk's convolutions and linear layers in bfloat16;
            see the module text).
        compile: run the walk compiled (`frmap.engine.responses.compiled_walk`): each batch
            shape traces and compiles on its first call (seconds); later calls skip the walk's
            per-step Python and run its elementwise steps fused (what pays at small batches).

    Raises:
        ValueError: a bad setting, a model on another device, path="reverse_walk", a precision
            other than float32 or compile=True for a model the walk cannot read (saying why).
    """

    def __init__(self, model: nn.Module, *, rule: str = "guided", target: str | int = "conv_max",
                 batch_size: int = 8, device: str | torch.device | None = None,
                 preprocess: str | None = "imagenet", path: str = "auto",
                 precision: str = "float32", compile: bool = False) -> None:
        self.config = EngineConfig(rule, target, batch_size, preprocess, path, precision,
                                   compile)
        self.model = model
        self._modules = tuple(model.modules())  # what `_eval_mode` switches, listed once
        params = next(model.parameters(), None)
        self.device = model_device(model)
        wanted = self.device if device is None else torch.device(device)
        if wanted.type != self.device.type or wanted.index not in (None, self.device.index):
            raise ValueError(f"the model is on {self.device}, not on {wanted}: move it first")
        self.dtype = params.dtype if params is not None else torch.float32
        self._net = Normalized(model).to(self.device) if preprocess == "imagenet" else model
        self.channels = self._input_channels()
        self._walk: ReverseWalk | None = None
        #: why the reverse walk cannot read the model (None where it runs it, or where
        #: path="autograd" was asked for)
        self.fallback: str | None = None
        if path != "autograd":
            try:
                self._walk = ReverseWalk(trace_ops(self._net), rule, *PRECISIONS[precision])
            except Untraceable as err:
                self.fallback = str(err)
        if self._walk is None and path != "autograd" and (
                path == "reverse_walk" or precision != "float32" or compile):
            setting = f"precision={precision!r}" if precision != "float32" else "compile=True"
            needs = f"{setting} needs the reverse walk, but " if path == "auto" else ""
            raise ValueError(f"{needs}{self.fallback}; use path='autograd' or 'auto' in "
                             "float32, without compile")
        self._compiled = None if not compile else CompiledWalk(
            self._walk.traced, rule, *PRECISIONS[precision])

    @property
    def path(self) -> str:
        """The path in use: "reverse_walk" or "autograd"."""
        return "reverse_walk" if self._walk is not None else "autograd"

    def responses(self, images: torch.Tensor | np.ndarray,
                  target: Target | None = None) -> torch.Tensor:
        """Feature responses of `images`, with respect to the images as given.

        Args:
            images: [N, C, H, W] floats in [0, 1], N >= 1, C the model's input channels.
            target: overrides the engine's target: "conv_max", "logit", a class index, or N
                class indices (one per image).

        Returns:
            [N, C, H, W] float responses, in input order, on the images' device.
        """
        x, classes = self._prepare(images, target)
        parts = list(self._map_batches(self._responses, x, classes))
        return torch.cat(parts).to(_device_of(images))

    def scores(self, images: torch.Tensor | np.ndarray,
               footprint: torch.Tensor | np.ndarray, target: Target | None = None, *,
               backend: str = "auto") -> torch.Tensor:
        """Detection scores: mean local entropy (bits) of each image's response image.

        Equal to `frmap.kernels.response_score(self.responses(images), footprint)`, batch by
        batch (responses are not kept). Higher = more likely adversarial.

        Args:
            images: as for `responses`; the model must take 1 or 3 channels.
            footprint: [h, w] binary window of the local entropy.
            target: as for `responses`.
            backend: backend of `response_score`.

        Returns:
            [N] float64 scores on the images' device.
        """
        x, classes = self._prepare(images, target)
        check_footprint(footprint)
        parts = list(self._map_batches(
            lambda b, c: response_score(self._responses(b, c), footprint, backend=backend),
            x, classes))
        return torch.cat(parts).to(_device_of(images))

    def footprint_scores(self, images: torch.Tensor,
                         footprints: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`scores` for several footprints: the responses once per batch, then one [N] float64
        array of scores per footprint name."""
        out: dict[str, list[np.ndarray]] = {name: [] for name in footprints}
        for start in range(0, len(images), self.config.batch_size):
            responses = self.responses(images[start:start + self.config.batch_size])
            for name, fp in footprints.items():
                out[name].append(response_score(responses, fp).numpy())
        return {name: np.concatenate(parts) if parts else np.zeros(0)
                for name, parts in out.items()}

    def observes(self, layers: Sequence[str]) -> bool:
        """Whether `observe` takes the outputs of `layers` (names in the model's
        `named_modules`, behind the normalisation as `Normalized` names them when preprocess is
        "imagenet") from its own forward pass: not on the autograd path, nor from a forward
        pass in bfloat16 (precision "bf16"), nor for a layer whose output the walk does not
        hold (`ReverseWalk.tappable`)."""
        return self._walk is not None and PRECISIONS[self.config.precision][0] is None and \
            all(self._walk.tappable(name) for name in layers)

    def observe(self, images: torch.Tensor, footprints: dict[str, np.ndarray],
                layers: Sequence[str]) -> Observation:
        """One pass over `images` for a screen: each footprint's `scores` and, from the walk's
        own forward pass, the logits and the pooled outputs of `layers`.

        Raises:
            ValueError: bad images, or layers the walk's forward pass does not hold (check
                `observes` first).
        """
        if not self.observes(layers):
            raise ValueError(f"the {self.path} path in {self.config.precision} cannot give the "
                             f"outputs of {list(layers)} from its own forward pass")
        x, classes = self._prepare(images, self.config.target)
        for fp in footprints.values():
            check_footprint(fp)

        def batch(b: torch.Tensor, c: torch.Tensor | None) -> Observation:
            out = self._run(b, c, layers)
            return Observation({k: response_score(out.responses, fp)
                                for k, fp in footprints.items()},
                               out.logits.float().cpu(),
                               {name: out.taps[name].float().cpu() for name in layers})

        parts = list(self._map_batches(batch, x, classes))
        if len(parts) == 1:
            return parts[0]
        return Observation({k: torch.cat([p.scores[k] for p in parts]) for k in footprints},
                           torch.cat([p.logits for p in parts]),
                           {k: torch.cat([p.layers[k] for p in parts]) for k in layers})

    def logits(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """`[N, K]` float32 on the CPU: the model's logits for `images` (floats in [0, 1], not
        checked) from the walk's forward pass alone, `batch_size` images a call (default: the
        engine's); where `observes(())`.

        Raises:
            ValueError: where the walk's forward pass is not the classifier's float32 one.
        """
        if not self.observes(()):
            raise ValueError(f"the {self.path} path in {self.config.precision} has no float32 "
                             "forward pass of its own")

        def batch(b: torch.Tensor, _: None) -> torch.Tensor:
            with _eval_mode(self._modules), _ieee_float32():
                return self._walk.logits(b.to(self.device, self.dtype)).float().cpu()

        return torch.cat(list(self._map_batches(batch, images, None, batch_size)))

    def _input_channels(self) -> int | None:
        if isinstance(self._net, Normalized):
            return self._net.channels
        conv = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)
        return None if conv is None else conv.in_channels

    def _prepare(self, images: object, target: Target | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validated images and the per-image classes (None for conv_max)."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch tensor or numpy array, got "
                            f"{type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floats in [0, 1], got {images.dtype} "
                            "(divide uint8 images by 255)")
        if images.dim() != 4:
            raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
        n, c, h, w = images.shape
        if n == 0:
            raise ValueError("images is an empty batch (N = 0)")
        if self.channels is not None and c != self.channels:
            hint = " (preprocess='imagenet' takes RGB; use preprocess=None)" if isinstance(
                self._net, Normalized) else ""
            raise ValueError(f"the model takes {self.channels}-channel images, got {c} channels "
                             f"(shape {tuple(images.shape)}){hint}")
        if h == 0 or w == 0:
            raise ValueError(f"images have an empty spatial shape {(h, w)}")
        low, high = (float(v) for v in torch.aminmax(images))
        if not 0 <= low <= high <= 1:  # also false for NaN
            bad = ~torch.isfinite(images)
            if bad.any():
                where = bad.flatten(1).any(1).nonzero().flatten().tolist()
                raise ValueError(
                    f"images hold {int(bad.sum())} NaN or Inf values (images {where[:10]})")
            raise ValueError(f"images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")
        return images, target_classes(self.config.target if target is None else target, n)

    def _map_batches(self, fn: Callable[[torch.Tensor, torch.Tensor | None], T],
                     images: torch.Tensor, classes: torch.Tensor | None,
                     batch_size: int | None = None) -> Iterator[T]:
        """fn over fixed-size batches in order (the engine's size unless given); a batch that
        runs out of memory is split."""
        size, start = batch_size or self.config.batch_size, 0
        while start < len(images):
            stop = min(start + size, len(images))
            try:
                out = fn(images[start:stop], None if classes is None else classes[start:stop])
            except RuntimeError as err:
                if stop - start == 1 or not out_of_memory(err):
                    raise
                out = None  # retry outside the handler, so the failed batch's memory is freed
            if out is None:
                size = (stop - start) // 2
                warnings.warn(f"a batch of {stop - start} images did not fit in memory; "
                              f"continuing with batches of {size}", RuntimeWarning, stacklevel=3)
                continue
            yield out
            start = stop

    def _responses(self, images: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        """Responses of one batch (validated images; classes with -1 for the top class)."""
        return self._run(images, classes).responses

    def _run(self, images: torch.Tensor, classes: torch.Tensor | None,
             taps: Sequence[str] | None = None) -> WalkOutput:
        """One batch through the path in use, on the engine's device (`ReverseWalk.run`; the
        autograd path gives the responses alone)."""
        x = images.to(self.device, self.dtype)
        classes = None if classes is None else classes.to(self.device)
        with _eval_mode(self._modules), _ieee_float32():
            if self._walk is None:
                return WalkOutput(autograd_responses(self.model, self._net, x, classes,
                                                     self.config.rule))
            if self._compiled is not None:
                return self._compiled.run(x, classes, taps or ())
            return self._walk.run(x, classes, taps)


def _device_of(images: object) -> torch.device:
    return images.device if isinstance(images, torch.Tensor) else torch.device("cpu")


@contextmanager
def _ieee_float32() -> Iterator[None]:
    """cuDNN convolutions in IEEE float32 inside, not TF32; the setting restored afterwards."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = allowed


@contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode inside for `modules` (a model's, all of them); each one's own training flag
    restored afterwards (modules already in eval mode are left alone: no writes on each
    call)."""
    training = [m for m in modules if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True

