"""structlog configuration, done once in ``main()``.

JSON lines when the stream is not a terminal, readable console output when it
is. Context (association id, calling AE, study UID) is bound per unit of work
with ``structlog.contextvars``. As a last line of defence, keys that name
patient data are redacted; callers must never pass them in the first place.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

PHI_KEYS = frozenset({
    "patient_name", "patientname", "patient_id", "patientid", "birth_date",
    "patient_birth_date", "patientbirthdate", "accession_number", "accessionnumber",
})
REDACTED = "[redacted]"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_QUOTING_LOGGERS = ("pydicom", "py.warnings", "highdicom", "pynetdicom")
"""Libraries whose messages quote data element values ("Invalid value for VR DA: '...'")."""


def scrub_library_values(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """Replace quoted text in library log lines and captured warnings with ``'…'``.

    pydicom (and warnings routed through ``py.warnings``) quote header values, which may be
    patient data, in their messages; we keep the message and drop the value."""
    name = str(event_dict.get("logger", ""))
    quoting = any(name == n or name.startswith(f"{n}.") for n in _QUOTING_LOGGERS)
    if quoting and isinstance(event_dict.get("event"), str):
        event_dict["event"] = _QUOTED.sub("'…'", event_dict["event"])
    return event_dict


def scrub_exception_values(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """In a formatted traceback, replace quoted text in the exception message lines.

    pydicom's and highdicom's exception texts quote header values ("Unable to convert
    '1970-01-31' to 'DA'"); the frames (indented lines) are kept as they are."""
    text = event_dict.get("exception")
    if isinstance(text, str):
        event_dict["exception"] = "\n".join(
            line if line.startswith((" ", "Traceback")) else _QUOTED.sub("'…'", line)
            for line in text.split("\n"))
    return event_dict


class _ProtocolNoise(logging.Filter):
    """pynetdicom logs junk from the network (an undecodable PDU, a connection closed mid-PDU)
    as ERROR with a traceback. It is the peer's fault, handled (the association is aborted and
    our own ``association_closed`` / guard events say so): kept as a WARNING line, without the
    traceback, whose text the scrubber still cleans."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("pynetdicom.dul"):
            record.exc_info, record.exc_text = None, None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            if not record.getMessage():
                return False  # LOGGER.exception(exc) of an exception without text: nothing left
        return True


def redact_phi(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    for key in event_dict:
        if key.lower() in PHI_KEYS:
            event_dict[key] = REDACTED
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and route stdlib logging (pynetdicom, alembic) through it."""
    stream = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_phi,
    ]
    renderer: Processor = (structlog.processors.JSONRenderer() if as_json
                           else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    # Tracebacks are formatted here in both modes so that their messages can be scrubbed.
    tail: list[Processor] = [structlog.processors.format_exc_info, scrub_exception_values]
    structlog.configure(
        processors=[*shared, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, scrub_library_values, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail, renderer],
    ))
    handler.addFilter(_ProtocolNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # Third-party INFO lines are protocol chatter; their warnings still come through.
    logging.captureWarnings(True)
    for name in ("pynetdicom", "apscheduler", "alembic", "highdicom", "py.warnings"):
        logging.getLogger(name).setLevel(max(logging.WARNING, _LEVELS[level]))
    # A pixel decoder that fails logs the error with its traceback before raising it to us;
    # the worker records it as the image's refusal (corrupt_pixel_data), an expected outcome,
    # so pydicom's ERROR line is a duplicate that looks like a crash. Kept at debug level.
    logging.getLogger("pydicom.pixels").setLevel(
        logging.DEBUG if level == "debug" else logging.CRITICAL)
