"""Whether onnxruntime loads a model: the promise every written output keeps.

Verification loads the output anyway; a run without verification asks here, at onnxruntime's
default level (the one users load at: some models fail only in its constant folding), so that
`--no-verify` never writes a file onnxruntime cannot open.
"""

from __future__ import annotations

import os

import onnxruntime as ort


def onnxruntime_load_problem(source: str | os.PathLike | bytes) -> str | None:
    """None when onnxruntime loads the model; otherwise its error, on one line."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # our one-line error says it; onnxruntime's log would repeat it
    model = source if isinstance(source, bytes) else os.fspath(source)
    try:
        ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        return " ".join(str(exc).split()) or type(exc).__name__
    return None
