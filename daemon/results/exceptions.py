"""Errors raised by :mod:`daemon.results`."""

from __future__ import annotations

from daemon.exceptions import OpacitydError


class ResultsError(OpacitydError):
    """Root of the errors of the result messages and their transport."""


class MessageNotBuilt(ResultsError):
    """The result cannot be written as an HL7 message (the message names why, no values)."""


class MLLPError(ResultsError):
    """An MLLP exchange ended without an acknowledgement."""


class NoAcknowledgement(MLLPError):
    """The peer took the message but sent no complete acknowledgement within the timeout."""


class ConnectionClosed(MLLPError):
    """The peer closed the connection before a complete acknowledgement."""


class FramingError(MLLPError):
    """The peer answered with bytes that are not one MLLP frame."""


class AckUnreadable(ResultsError):
    """The peer's answer is not an HL7 acknowledgement (the message says what was missing)."""
