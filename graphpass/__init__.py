"""graphpass: a post-training weight-sharing compiler for ONNX.

`graphpass.run(model, passes="tie,kmeans")` rewrites a model and verifies it in onnxruntime;
the `graphpass` command is a thin layer over it.
"""

__version__ = "0.1.0"

from graphpass.api import RunResult, run  # noqa: E402

__all__ = ["RunResult", "run", "__version__"]
