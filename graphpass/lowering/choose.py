"""Which lowering keeps a weight compressed in every runtime a run targets (`--objective memory`).

The choice depends on three things only: how the weight is read (its reader nodes), what the
codec made of it (bits and block of an affine block quantization), and the run's `Deployment`.
Passes ask `compressed_plan` and get a `Plan` that replaces the weight's readers with a kernel
the targets keep packed in memory, or the reason there is none (the pass then falls back to the
file lowering and reports the reason). No pass branches on a runtime: this table does.

What each runtime runs is declared by its adapter (`Runtime.kernels`, `kernel_problem` in
graphpass/runtimes/), measured in tests/test_memory_objective.py and bench/bench_deploy.py.
"""

from __future__ import annotations

from typing import Union

import numpy as np
from onnx import helper

from graphpass.affine import quantize_blocks, quantize_blocks_gptq
from graphpass.codec import Plan, sqnr_db, sqnr_figure
from graphpass.deployment import Deployment
from graphpass.lowering.onnxruntime_contrib import (
    GatherBlockQuantizedLowering, MatMulNBitsLowering, gather_lowering, matmul_lowering,
)
from graphpass.weights import Replacement, WeightRef

KernelLowering = Union[MatMulNBitsLowering, GatherBlockQuantizedLowering]

NON_AFFINE_NOTE = "no compressed kernel for a non-uniform codebook in onnxruntime; rebuilt dense at load"


def kernel_lowering(weight: WeightRef, deployment: Deployment, bits: int, block_size: int) -> KernelLowering | str:
    """The kernel that keeps this weight compressed in every target, or why there is none."""
    if weight.scope.parent is not None or weight.scope.is_function:
        return "compressed kernels replace main-graph readers only (this weight is in a subgraph or function)"
    if not weight.consumers:
        return "nothing reads it"
    readers = weight.consumer_ops
    if len(readers) > 1:
        return f"no compressed kernel: read by {' and '.join(sorted(readers))}, and no one kernel serves both"
    found = gather_lowering(weight) if readers == {"Gather"} else matmul_lowering(weight)
    if isinstance(found, str):
        return f"no compressed kernel: {found}"
    if bits not in found.bits_allowed:
        return f"{found.op} takes {', '.join(map(str, found.bits_allowed))} bits, not {bits}"
    length = found.rows(np.empty(weight.shape, dtype=np.uint8)).shape[1]
    blocks = -(-length // block_size)
    problems = [p for p in (runtime.kernel_problem(found.op, bits, blocks) for runtime in deployment.adapters()) if p]
    return found.block_reason(block_size, length) or (problems[0] if problems else found)


def compressed_plan(weight: WeightRef, deployment: Deployment, bits: int, block_size: int,
                    importance: np.ndarray | None = None, *, search: bool = True,
                    hessian: np.ndarray | None = None) -> Plan | str:
    """A plan whose nodes keep the weight block-quantized in memory, or the reason there is none.

    `importance` (broadcastable to the weight) weights each value's squared error in the fit;
    `search=False` fits plain min/max ranges. `hessian` [K, K] (the second moment of a MatMul
    weight's input activations) turns on GPTQ-style error feedback. The reconstruction is exactly the kernel's
    dequantized weight; the kernel's matmul may round differently from a MatMul on it."""
    lowering = kernel_lowering(weight, deployment, bits, block_size)
    if isinstance(lowering, str):
        return lowering
    array = np.asarray(weight.read())
    if not np.isfinite(array).all():
        return "holds NaN or infinite values"
    rows = lowering.rows(array.astype(np.float32))
    weights_of_rows = None
    if importance is not None:
        weights_of_rows = lowering.rows(np.broadcast_to(np.asarray(importance, np.float32), weight.shape))
    feedback = hessian is not None and isinstance(lowering, MatMulNBitsLowering)
    fallback = None
    if feedback:
        fitted, fallback = quantize_blocks_gptq(rows, bits, block_size, hessian)
    else:
        fitted = quantize_blocks(rows, bits, block_size, weights_of_rows, search=search)
    weight_type = np.dtype(helper.tensor_dtype_to_np_dtype(weight.dtype))
    fitted.scale = fitted.scale.astype(weight_type).astype(np.float32)  # scales are stored in the weight's type
    reconstruction = lowering.from_rows(fitted.dequantized()).astype(weight_type)
    stored = lowering.stored_bytes(fitted, weight_type.itemsize)

    def emit(r: Replacement) -> str:
        # The plan may be applied to a copy of the model: find the readers there.
        again = kernel_lowering(r.weight, deployment, bits, block_size)
        if isinstance(again, str):
            raise ValueError(f"{r.weight.name}: the readers changed since planning ({again})")
        again.emit(r, fitted)
        return ""

    details = {
        "name": weight.name,
        "shape": list(weight.shape),
        "lowering": lowering.op,
        "bits": bits,
        "block_size": block_size,
        "weights": weight.size,
        "bytes_before": weight.nbytes,
        "bytes_after": stored,
        "bits_per_weight": round(8.0 * stored / weight.size, 3),
        "sqnr_db": sqnr_figure(sqnr_db(array, reconstruction)),
        "packing": f"{lowering.op}/{bits}bit/block{block_size}",
        "fit": "feedback" if feedback and fallback is None else "clip search",
    }
    if fallback:
        details["feedback"] = fallback
    return Plan(weight, reconstruction, stored, emit, details)
