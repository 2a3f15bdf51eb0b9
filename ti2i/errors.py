"""Typed errors shared by every layer.

Each names one kind of problem a user can fix; the CLI maps all of them to exit code 2,
the Triton models map them to INVALID_ARG.
"""


class Ti2iError(Exception):
    """Base class of every error ti2i raises on purpose."""


class InvalidInputError(Ti2iError, ValueError):
    """An argument or an input tensor/image is not acceptable."""


class OverBudgetError(InvalidInputError):
    """A request inside the declared ranges would need more memory than the machine's budget allows."""


class ModelNotFoundError(Ti2iError, FileNotFoundError):
    """A model folder, engine directory or manifest is missing or incomplete."""


class ServerUnavailableError(Ti2iError, ConnectionError):
    """A Triton server cannot be reached or is not ready."""


class ComponentOutputError(Ti2iError, RuntimeError):
    """A component produced outputs that cannot be used (NaN or infinite values)."""


class ExportValidationError(Ti2iError, RuntimeError):
    """An exported component disagrees with its torch module beyond its tolerance."""


class BackendUnavailableError(Ti2iError, RuntimeError):
    """A requested engine backend cannot run here (its library or the GPU it needs is missing)."""


def named_error(message: str) -> type[Ti2iError] | None:
    """The error class a message of the form ``Type: text`` names (how the server's errors cross the wire), or
    None when it names none of these."""
    kind = globals().get(message.split(":", 1)[0])
    return kind if isinstance(kind, type) and issubclass(kind, Ti2iError) else None
