"""Errors raised by the model package."""

from __future__ import annotations

import enum


class ModelPackageError(Exception):
    """Root of the model package's errors."""


class Refusal(enum.StrEnum):
    """Machine-readable reasons an image cannot be turned into model input."""

    NOT_READABLE = "not_readable"
    """Not a DICOM file or image we can open."""
    NO_PIXEL_DATA = "no_pixel_data"
    TOO_LARGE = "too_large"
    NOT_GRAYSCALE = "not_grayscale"
    UNSUPPORTED_PHOTOMETRIC = "unsupported_photometric"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    CORRUPT_PIXEL_DATA = "corrupt_pixel_data"
    BLANK_IMAGE = "blank_image"
    """Every pixel has the same value after windowing: nothing to score."""


class PreprocessError(ModelPackageError):
    """An image was refused; ``reason`` is recorded by the worker and put in the result."""

    def __init__(self, reason: Refusal, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class BundleError(ModelPackageError):
    """A model bundle is missing, malformed, or does not match its manifest."""


class WeightsUnavailable(ModelPackageError):
    """Backbone weights could not be obtained (no network for "imagenet", missing file)."""
