"""Errors raised by :mod:`medsr.weights`."""

from __future__ import annotations


class WeightsError(RuntimeError):
    """A weights file is corrupt, unsupported, or failed verification. The message names the file."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """The weights of a registered model are not available locally (the message says how to get them)."""
