"""Errors that name the file and the cause in one line, as users and run reports need them."""
from __future__ import annotations


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """``Type: message`` of an unexpected exception on one line (at most ``limit`` characters of message)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit] if limit else text}"


class TrtsegError(Exception):
    """Base class of errors that trtseg raises on purpose (bad input, bad model, bad configuration)."""


class CaseError(TrtsegError):
    """A case cannot be processed: ``str(err)`` is one line, ``<file>: <cause>``."""

    def __init__(self, path: str, cause: str):
        self.path = str(path)
        self.cause = " ".join(str(cause).split())  # one line, whatever the underlying library printed
        super().__init__(f"{self.path}: {self.cause}")


class ModelFolderError(TrtsegError):
    """A model folder is missing a file or its files contradict each other."""

    def __init__(self, path: str, cause: str):
        self.path = str(path)
        self.cause = " ".join(str(cause).split())
        super().__init__(f"{self.path}: {self.cause}")
