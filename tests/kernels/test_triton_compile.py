"""The Triton kernels compile for a GPU (sm_90) without one: what the interpreter cannot show.

The interpreter runs a kernel's Python; only the compiler sees how it lowers (tuples of
[BLOCK] vectors unrolled by tl.static_range, int64 fixed-point sums, scattered histogram
updates). Each case compiles in a fresh interpreter without TRITON_INTERPRET (the interpreter
replaces `@triton.jit` functions at import) down to a cubin with Triton's own ptxas, and checks
that nothing spills to local memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_SCRIPT = r"""
import json, subprocess, sys
import numpy as np
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from frmap.kernels.triton import entropy as E, response as R

def compile_(fn, signature, constexprs, **options):
    names = list(signature)
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, **options})
    with open("kernel.ptx", "w") as f:
        f.write(kernel.asm["ptx"])
    info = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", "kernel.ptx", "-o",
                           "kernel.cubin"], capture_output=True, text=True, check=True).stderr
    return {"cubin": len(kernel.asm["cubin"]), "ptxas": info}

footprint = np.asarray(json.loads(sys.argv[1]), np.uint8)
dy, dx = E._offsets(footprint)
scale = 2.0 ** 48
pairwise = {"img_ptr": "*u8", "mask_ptr": "*u8", "t_ptr": "*i64", "d_ptr": "*i64",
            "out_ptr": "*fp64", "H": "i32", "W": "i32", "n_blocks": "i32", "DY": "constexpr",
            "DX": "constexpr", "K": "constexpr", "SCALE": "constexpr", "MEAN": "constexpr",
            "BLOCK": "constexpr"}
sliding = {"img_ptr": "*u8", "mask_ptr": "*u8", "hist_ptr": "*u8", "offs_ptr": "*i32",
           "runs_ptr": "*i32", "t_ptr": "*i64", "d_ptr": "*i64", "out_ptr": "*fp64", "H": "i32",
           "W": "i32", "K": "i32", "R": "i32", "SEG": "i32", "n_seg": "i32", "lane0": "i32",
           "LANES": "i32", "total_lanes": "i32", "SCALE": "constexpr", "MEAN": "constexpr",
           "BLOCK": "constexpr"}
out = {}
out["pairwise"] = compile_(E._pairwise_kernel, pairwise, {
    "DY": dy, "DX": dx, "K": len(dy), "SCALE": scale, "MEAN": False,
    "BLOCK": E._PAIRWISE_GPU_BLOCK})
out["sliding mean"] = compile_(E._sliding_kernel, sliding, {
    "SCALE": scale, "MEAN": True, "BLOCK": E._SLIDING_BLOCK}, num_stages=1)
out["moments"] = compile_(R._moments_kernel, {"resp_ptr": "*fp32", "part_ptr": "*fp64",
                          "CHW": "i32", "n_blocks": "i32", "BLOCK": "constexpr"},
                          {"BLOCK": R._GPU_BLOCK})
out["gray"] = compile_(R._gray_kernel, {"resp_ptr": "*fp32", "stats_ptr": "*fp64",
                       "out_ptr": "*u8", "HW": "i32", "n_blocks": "i32", "C": "constexpr",
                       "BLOCK": "constexpr"}, {"C": 3, "BLOCK": R._GPU_BLOCK})
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """The pairwise kernel for disk(3) (29 pixels, near the crossover: its registers grow with
    K), the sliding kernel and the response kernels, with the options their launchers use."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as err:  # no NVIDIA backend or ptxas in this Triton build
        pytest.skip(f"Triton's NVIDIA backend cannot compile here: {err}")
    from skimage.morphology import disk

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(disk(3).tolist())],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert len(results) == 4
    for name, result in results.items():
        assert result["cubin"] > 0, name
        assert "0 bytes spill stores, 0 bytes spill loads" in result["ptxas"], (name, result)
