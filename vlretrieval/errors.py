"""Errors that tell the user which file, record and problem went wrong."""

from __future__ import annotations


class VLRetrievalError(Exception):
    """Base class for every error this package raises on purpose."""


class DataError(VLRetrievalError):
    """A problem with one input file or one record inside it.

    ``location`` is where to look (a path, optionally with ``:line``), ``record`` names
    the record (``text_id=5``, ``image_id=7``) when one is known.
    """

    def __init__(self, location: str, problem: str, record: str | None = None):
        self.location = str(location)
        self.problem = problem
        self.record = record
        where = self.location if record is None else f"{self.location} ({record})"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        # Errors raised in worker processes cross back to the parent by pickling.
        return (type(self), (self.location, self.problem, self.record))


class DownloadError(VLRetrievalError):
    """A source could not be fetched, verified or extracted."""


class ChecksumMismatch(DownloadError):
    """The fetched bytes are not the bytes the registry promises."""


class ConfigError(VLRetrievalError):
    """The workflow configuration names something that does not exist or cannot work."""
