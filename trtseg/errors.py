"""Errors that name the file and the cause in one line, as users and run reports need them."""
from __future__ import annotations


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
