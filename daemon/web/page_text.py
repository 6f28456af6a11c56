"""The words and marks the worklist pages use for the codes the database stores.

Each code keeps its stored value beside the sentence (the pages show both), and an unknown code
reads as itself, so a code added elsewhere shows up plainly instead of breaking a page.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Badge:
    """How one state looks: a label, a mark that does not depend on colour, and a CSS class
    whose colours come from the Okabe-Ito palette (readable with every common colour-vision
    deficiency)."""

    label: str
    mark: str
    css: str


LEVELS: dict[str, Badge] = {
    "urgent": Badge("Urgent", "▲▲", "urgent"),
    "elevated": Badge("Elevated", "▲", "elevated"),
    "routine": Badge("Routine", "●", "routine"),
    "not_analysable": Badge("Not analysable", "?", "unknown"),
}

DELIVERIES: dict[str, Badge] = {
    "delivered": Badge("delivered", "✓", "delivered"),
    "pending": Badge("pending", "…", "pending"),
    "failed": Badge("failed", "✗", "failed"),
    "not_sent": Badge("not sent", "–", "unknown"),
}

REFUSALS: dict[str, str] = {
    "not_readable": "Not a DICOM file or an image that can be opened.",
    "no_pixel_data": "The object holds no pixel data.",
    "too_large": "The image is larger than the model accepts.",
    "not_grayscale": "A colour image: only greyscale radiographs are scored.",
    "unsupported_photometric": "Its photometric interpretation is not one that can be scored.",
    "unsupported_transfer_syntax": "Compressed in a transfer syntax this installation cannot decode.",
    "corrupt_pixel_data": "The pixel data are damaged, or the image size is invalid (e.g. one pixel wide).",
    "blank_image": "Every pixel has the same value: there is nothing to score.",
}

INELIGIBLE: dict[str, str] = {
    "own_output": "An object opacityd made itself.",
    "no_pixel_data": "The object holds no pixel data.",
    "modality_not_accepted": "A modality that is not scored.",
    "not_chest": "Not a chest image.",
    "body_part_unknown": "The body part is not recorded.",
    "lateral_view": "A lateral view: only frontal views are scored.",
    "view_unknown": "The view is not recorded.",
    "not_human": "Not a human patient.",
}

JOB_FAILURES: dict[str, str] = {
    "database_busy": "The database was busy; it is retried.",
    "database_error": "A database error while reading or recording; it is retried.",
    "spool_unreadable": "A received file is no longer a DICOM file.",
    "spool_file_missing": "A received file is missing from the spool.",
    "spool_not_mounted": "The spool is not mounted on the worker's host; it is retried.",
    "preprocess_error": "Decoding or preparing an image failed unexpectedly.",
    "no_input": "None of the study's eligible images is held any more.",
    "inference_error": "The network failed on one of the study's images.",
    "sr_build_failed": "The structured report could not be built from the headers.",
    "sr_write_failed": "The structured report could not be written (e.g. a full disk).",
    "abandoned": "Its worker stopped (killed or crashed) on every attempt.",
    "internal_error": "An internal error; the worker's log has the details.",
}

STUDY_STATES: dict[str, str] = {
    "receiving": "Images are still arriving.",
    "complete": "Complete: no image arrived for its quiet period, so it was queued for scoring.",
    "ignored": "Not scored: none of its images is eligible.",
}

JOB_STATES: dict[str, str] = {
    "queued": "Queued for scoring.",
    "running": "Being scored now.",
    "failed": "Scoring failed.",
    "superseded": "Replaced by a later revision of the study.",
    "done": "Scored.",
}


def badge(table: dict[str, Badge], code: str | None) -> Badge:
    """The badge for ``code``; an unknown or missing code gets a plain grey one naming it."""
    if code is None:
        return Badge("unknown", "?", "unknown")
    return table.get(code, Badge(code.replace("_", " "), "?", "unknown"))


def sentence(table: dict[str, str], code: str | None) -> str:
    """The readable sentence for ``code``, or the code itself when the table does not know it."""
    if code is None:
        return "No reason was recorded."
    return table.get(code, code.replace("_", " "))


def age(seconds: float) -> str:
    """A short age: ``45 s``, ``12 min``, ``3 h 5 min``, ``2 d 4 h``; negative reads as 0 s."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"
