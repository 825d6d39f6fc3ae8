"""The reverse walk compiled: one pass traced into torch ops and compiled by inductor.

On a small network at batch 1 the eager walk's time goes to calls, not arithmetic: dozens of
Python steps and kernel calls of 5-25 microseconds each around ten convolutions. A
`CompiledWalk` runs the walk of torch ops alone (`ReverseWalk`'s `native`: boolean ReLU
masks, torch's max-pool indices) once under `make_fx`, which keeps the tensor ops and drops the
Python, and compiles that graph with inductor (`torch._inductor.compile`, the entry for graphs
captured without Dynamo: no guards to check on each call): the ReLU rules, pools, target and
taps fuse into a few C++ loops around the convolutions. One graph per batch shape, dtype,
target kind (conv_max or classes) and set of taps, traced and compiled on its first call
(seconds).

The weights enter a graph as constants (folded, flipped, cast when it is traced): when any of
the model's parameters or buffers changes (its version counter or storage moves: in-place
torch ops, `load_state_dict`, optimizer steps; not writes through `.data`), every graph is
traced and compiled again. The eager walk is the reference: they compute the same ops, in
float32 to rounding in another order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from frmap.engine.responses.reverse_walk import ReverseWalk, WalkOutput
from frmap.engine.responses.targets import check_classes
from frmap.engine.responses.tracing import TracedModel

Graph = Callable[..., tuple[torch.Tensor, ...]]
# inductor's settings: the code around the kernels in C++. The digits' walk at batch 1 on a
# 2-core Xeon, in multiples of the model's own forward pass: 1.23x with a Python wrapper, 1.14x
# with this one (torch.compile of the same graph, behind Dynamo's guards: 1.54x; with freezing,
# which moved the convolutions to another kernel, 1.40x).
OPTIONS = {"cpp_wrapper": True}


class CompiledWalk:
    """`ReverseWalk.run`, compiled (see the module text); same arguments and results, but the
    logits always come back (the forward pass runs to the model's output).

    Args:
        traced, rule, compute_dtype, backward_dtype: as for `ReverseWalk`.
    """

    def __init__(self, traced: TracedModel, rule: str,
                 compute_dtype: torch.dtype | None = None,
                 backward_dtype: torch.dtype | None = None) -> None:
        self.walk = ReverseWalk(traced, rule, compute_dtype, backward_dtype, native=True)
        module = traced.module
        self._tensors = [*module.parameters(), *module.buffers()]
        self._stamp = self._weights_stamp()
        # (shape, dtype, device, classes given, taps) -> (the compiled graph, the model's
        # number of outputs)
        self._graphs: dict[tuple, tuple[Graph, int]] = {}

    def run(self, x: torch.Tensor, classes: torch.Tensor | None,
            taps: Sequence[str] = ()) -> WalkOutput:
        """As `ReverseWalk.run`; `taps` each `ReverseWalk.tappable`.

        Raises:
            ValueError: a class index out of range, or target 'conv_max' on a model without a
                ReLU after a convolution.
        """
        stamp = self._weights_stamp()
        if stamp != self._stamp:
            self._graphs.clear()
            self._stamp = stamp
        taps = tuple(taps)
        key = (tuple(x.shape), x.dtype, x.device, classes is not None, taps)
        if key not in self._graphs:
            self._graphs[key] = self._compile(x, classes, taps)
        graph, outputs = self._graphs[key]
        if classes is not None:
            check_classes(classes, outputs)
        with torch.no_grad():
            responses, logits, *pooled = graph(x) if classes is None else graph(x, classes)
        return WalkOutput(responses, logits, dict(zip(taps, pooled, strict=True)))

    def _compile(self, x: torch.Tensor, classes: torch.Tensor | None,
                 taps: tuple[str, ...]) -> tuple[Graph, int]:
        """The compiled graph of the walk on batches like `x`, and the model's outputs."""
        walk = self.walk

        def flat(*example: torch.Tensor) -> tuple[torch.Tensor, ...]:  # x[, classes]
            out = walk.run(example[0], example[1] if len(example) > 1 else None, taps,
                           checked=True)  # by `run`, before the graph
            return (out.responses, out.logits, *(out.taps[name] for name in taps))

        example = (x,) if classes is None else (x, classes)
        # eager first (checking the classes): the weights' folded, flipped and cast copies are
        # made and cached now, so that the trace holds them as constants instead of the ops
        # that made them
        logits = walk.run(x, classes, taps).logits
        with torch.no_grad():
            traced = make_fx(flat)(*example)
            # make_fx on real tensors records each input's fake value in a fake mode of its
            # own, which inductor refuses to mix: it makes its own from the examples
            for node in traced.graph.find_nodes(op="placeholder"):
                node.meta.pop("val", None)
            graph = torch._inductor.compile(traced, list(example), OPTIONS)
        return graph, logits.shape[1]

    def _weights_stamp(self) -> tuple:
        return tuple((t._version, t.data_ptr()) for t in self._tensors)
