"""Error types. Each names the cause and the fix in its message."""


class FxCompressError(Exception):
    """Base class of every error fxcompress raises on purpose."""


class CaptureError(FxCompressError):
    """The model could not be captured as a graph."""


class InvalidInputError(FxCompressError, ValueError):
    """Example inputs, options, dtypes or devices that fxcompress cannot use."""


class UnknownPassError(FxCompressError, KeyError):
    """A pass name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class PassConfigError(FxCompressError, TypeError):
    """A pass was given an option it does not have, or a bad value."""


class InferenceOnlyError(FxCompressError, NotImplementedError):
    """``train(True)`` on a captured graph, whose eval-mode semantics are fixed."""


class ArchiveError(FxCompressError, ValueError):
    """A file that :func:`fxcompress.load` cannot read: not an fxcompress ``.pt2`` archive, or truncated."""


class FxCompressWarning(UserWarning):
    """Something fxcompress did differently from what was asked, and how to silence it."""


class VerificationError(FxCompressError):
    """A pass produced a graph that fails the pass manager's checks."""

    def __init__(self, pass_name: str, message: str, node: str | None = None):
        self.pass_name = pass_name
        self.node = node
        where = f" (first diverging node: {node!r})" if node else ""
        super().__init__(f"pass {pass_name!r} failed verification{where}: {message}")


class InputShapeError(InvalidInputError):
    """A compressed model was called with an input shape its captured graph does not accept."""
