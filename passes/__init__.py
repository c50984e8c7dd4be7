"""The built-in passes. Each module registers one pass class with `graphpass.manager.register`.

A new pass goes in its own module here and is imported below. It sees the model only through
the core: `ctx.model` (graphpass.edit.Model), `ctx.analysis(...)` and `graphpass.weights`.
"""

from graphpass.passes import tie  # noqa: F401
from graphpass.passes import binning  # noqa: F401
from graphpass.passes import fold  # noqa: F401
from graphpass.passes import codebook  # noqa: F401
from graphpass.passes import auto  # noqa: F401
