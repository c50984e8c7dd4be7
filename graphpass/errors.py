"""The errors graphpass reports to users, each with the exit code the CLI gives it."""

from __future__ import annotations


class GraphpassError(Exception):
    """An expected failure with a one-line message for the user."""

    exit_code = 2


class InputError(GraphpassError):
    """The input model or a data file is unusable: not ONNX, truncated, bad external data."""


class UsageError(GraphpassError):
    """The command line or API call asks for something that does not exist."""


class BudgetError(GraphpassError):
    """Verification ran and the candidate missed the error budget."""

    exit_code = 1


class PassFailed(GraphpassError):
    """A pass raised; no output is written. This is a bug in graphpass, not in the input."""

    exit_code = 3

    def __init__(self, pass_name: str, cause: BaseException, weight: str | None = None):
        first_line = (str(cause).strip().splitlines() or [""])[0]
        at = f" (the last weight it read or replaced: '{weight}')" if weight else ""
        super().__init__(f"pass '{pass_name}' failed: {type(cause).__name__}: {first_line}{at}. "
                         "This is a bug in graphpass, not in your model: please report it with this line")
        self.pass_name = pass_name
        self.weight = weight
        self.cause = cause


class OutputUnloadable(GraphpassError):
    """The passes wrote a model onnxruntime cannot load from one it can: a bug in graphpass."""

    exit_code = 3

    def __init__(self, passes: str, problem: str):
        super().__init__(f"the passes '{passes}' wrote a model onnxruntime cannot load, from an input it loads "
                         f"({problem}). This is a bug in graphpass, not in your model: please report it with "
                         "this line; no output was written")
        self.passes = passes


class ConditionError(Exception):
    """A pass broke a pre- or post-condition of the model (internal; wrapped in PassFailed)."""


class VerifyInputError(Exception):
    """Verification cannot start: a model does not load or run, inputs are missing, or a
    --shape is malformed. The message is one line, ready to show to a user."""


class ModelLoadError(VerifyInputError):
    """onnxruntime cannot load one of the models; `role` says which ("reference", "candidate")."""

    def __init__(self, message: str, role: str):
        super().__init__(message)
        self.role = role
