"""The summary image: a DICOM Secondary Capture a radiologist sees in any PACS viewer.

It shows the study's highest-scoring frontal image as the network saw it (the
equalised network input) with the Grad-CAM heatmap over it in viridis and a
legend, above a band of burned-in text: the product, "NOT FOR CLINICAL USE"
until the bundle is validated, the priority, probability and decision, the
model's name and version, and the date. A study that is not analysable gets the
same band with each image's reason instead of a heatmap. No patient data is
burned in; the patient and study attributes are copied from the source header
(the sanitised copy the SR is made from), so the PACS files the image in the
study it belongs to.

Identity follows the SR's (:mod:`daemon.results.report`): one series per study and model
name; the SOP Instance UID is derived from the result key and the UID of the
summary it supersedes, so the same content always has the same UID and a re-send
is de-duplicated by the PACS. A later result's summary joins the same series
with the next Instance Number and names the one it replaces in its Derivation
Description.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache, cached_property

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from daemon.dicom.eligibility import OWN_MANUFACTURER
from daemon.results.report import REASON_CODES, UNKNOWN_REASON, deterministic_uid, priority_for
from model.heatmap_render import render_heatmap
from model.manifest import NOT_FOR_CLINICAL_USE, Manifest

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SERIES_NUMBER = 9902
"""The SR series is 9901; the summary images follow it."""

IMAGE_SIDE = 768
"""Pixels of the radiograph (and heatmap) in the summary image."""
WIDTH = 1024
BAND = 232
"""Height of the text band above the image."""
HEIGHT = BAND + IMAGE_SIDE + 24
WHITE = (255, 255, 255)
GREY = (190, 190, 190)
AMBER = (230, 159, 0)
"""Okabe-Ito orange: the "not for clinical use" line (the words say it; colour only helps)."""


@dataclass(frozen=True)
class SummaryInput:
    """What one result's summary shows."""

    study_uid: str
    revision: int
    key: str
    """The result key (:func:`daemon.results.report.result_key`)."""
    manifest: Manifest
    probability: float | None
    """The study's probability; None: not analysable."""
    source: Dataset
    """The header the patient and study attributes are copied from: the shown image's, or for a
    study that is not analysable the first image's (sanitised copies, no pixel data)."""
    network_input: np.ndarray | None = None
    """The shown image as the network saw it: (H, W) in [0, 1] (equalised), or None."""
    heatmap: np.ndarray | None = None
    """Grad-CAM for it, (H, W) in [0, 1], or None when it could not be computed."""
    heatmap_problem: str | None = None
    """Why there is no heatmap over a shown image (burned in, and recorded)."""
    scored_images: int = 0
    refusals: Sequence[str | None] = ()
    """The reasons of the images that were not scored (for a study that is not analysable)."""
    previous_uid: str | None = None
    """The summary this one supersedes."""

    @cached_property
    def picture(self) -> np.ndarray | None:
        """What is shown, at the network's resolution, uint8 RGB: the heatmap over the image
        with its legend, or the image alone in gray; None when no image is shown. Made once
        (the summary scales it up; the preview PNGs are it)."""
        if self.network_input is None:
            return None
        if self.heatmap is not None:
            return render_heatmap(self.network_input, self.heatmap)
        gray = np.round(np.clip(self.network_input, 0.0, 1.0) * 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)


def summary_series_uid(study_uid: str, manifest: Manifest) -> str:
    """One summary series per study and model name, so later summaries join it."""
    return deterministic_uid(study_uid, "opacityd-summary-series", manifest.name)


def summary_instance_uid(key: str, previous_uid: str | None, heatmap: str = "") -> str:
    """From the result key, the superseded summary's UID (as
    :func:`daemon.results.report.sr_instance_uid`) and what the image shows besides the result:
    ``heatmap`` says whether it has one or why not, so a retried job whose Grad-CAM came out
    differently never reuses a UID for other pixels."""
    return deterministic_uid("opacityd-summary", key, previous_uid or "", heatmap)


def series_description(manifest: Manifest) -> str:
    """``opacityd <model> <version>``, with NOT FOR CLINICAL USE until validated (64 chars kept
    by shortening the model's name, never its version or the warning)."""
    suffix = "" if manifest.validated else f" {NOT_FOR_CLINICAL_USE}"
    version = manifest.version[:16]
    name = manifest.name[:max(1, 64 - len("opacityd ") - len(suffix) - len(version) - 1)]
    return f"opacityd {name} {version}{suffix}"[:64]


def reason_text(reason: str | None) -> str:
    """A refusal reason as words (the SR code's meaning)."""
    code = REASON_CODES.get(reason or UNKNOWN_REASON)
    return code.meaning if code is not None else str(reason).replace("_", " ")


def text_lines(item: SummaryInput, created: datetime) -> list[tuple[str, tuple[int, int, int]]]:
    """The burned-in text, line by line, with each line's colour."""
    manifest = item.manifest
    lines: list[tuple[str, tuple[int, int, int]]] = [("opacityd - AI lung opacity triage", WHITE)]
    if not manifest.validated:
        lines.append((f"{NOT_FOR_CLINICAL_USE} - model not validated", AMBER))
    priority = priority_for(item.probability, manifest)
    if item.probability is None:
        lines.append(("Priority: NOT ANALYSABLE - no image could be scored", WHITE))
        counts: dict[str, int] = {}
        for reason in item.refusals:
            text = reason_text(reason)
            counts[text] = counts.get(text, 0) + 1
        for text, n in sorted(counts.items()):
            lines.append((f"  {n} image{'s' if n > 1 else ''}: {text}", WHITE))
    else:
        decision = ("opacity PRESENT" if item.probability >= manifest.thresholds.decision
                    else "opacity absent")
        lines.append((f"Priority: {priority.value.replace('_', ' ').upper()}   "
                      f"Probability: {item.probability:.3f}   Decision: {decision} "
                      f"(threshold {manifest.thresholds.decision:g})", WHITE))
        shown = ("Heatmap: Grad-CAM (viridis, legend at right)" if item.heatmap is not None
                 else f"No heatmap ({item.heatmap_problem or 'not computed'})")
        lines.append((f"{shown} on the highest of {item.scored_images} scored image"
                      f"{'s' if item.scored_images != 1 else ''}"[:84], GREY))
    lines.append((f"Model: {manifest.name} {manifest.version}   "
                  f"Scored: {created.strftime('%Y-%m-%d %H:%M')}", GREY))
    return lines[:7]


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render_summary(item: SummaryInput, created: datetime) -> np.ndarray:
    """The summary as uint8 RGB: (HEIGHT, WIDTH, 3), or only the text band (BAND + 24 rows)
    when there is no image to show."""
    height = HEIGHT if item.network_input is not None else BAND + 24
    canvas = Image.new("RGB", (WIDTH, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    y = 14
    for i, (text, colour) in enumerate(text_lines(item, created)):
        size = 30 if i == 0 else 22
        draw.text((20, y), text, fill=colour, font=_font(size))
        y += size + 10
    picture = item.picture
    if picture is not None:
        height, width = picture.shape[:2]
        shown = Image.fromarray(picture).resize((round(width * IMAGE_SIDE / height), IMAGE_SIDE),
                                                Image.Resampling.BILINEAR)
        left = 20
        canvas.paste(shown, (left, BAND))
        if item.heatmap is not None:
            x = left + shown.width + 8
            draw.text((x, BAND), "high", fill=WHITE, font=_font(20))
            draw.text((x, BAND + IMAGE_SIDE - 24), "low", fill=WHITE, font=_font(20))
    return np.asarray(canvas, dtype=np.uint8)


def build_summary(item: SummaryInput, created: datetime | None = None) -> Dataset:
    """The Secondary Capture of one result. ``created``: Content Date/Time (default now, local)."""
    when = created or datetime.now()
    pixels = render_summary(item, when)
    manifest = item.manifest
    source = item.source
    orientation = source.get("PatientOrientation")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=summary_series_uid(item.study_uid, manifest),
        series_number=SERIES_NUMBER,
        sop_instance_uid=summary_instance_uid(
            item.key, item.previous_uid,
            "heatmap" if item.heatmap is not None else item.heatmap_problem or ""),
        instance_number=item.revision,
        manufacturer=OWN_MANUFACTURER,
        # highdicom wants a pair of single letters; the header's own value (the image is
        # resized, never flipped or rotated, so it still holds) is set below.
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(manifest),
        manufacturer_model_name=manifest.name[:64],
        software_versions=manifest.version[:64],
        content_date=when.date(),
        content_time=when.time(),
    )
    sc.PatientOrientation = (list(orientation) if orientation is not None and len(orientation) == 2
                             else [])
    sc.Laterality = source.get("Laterality", "")  # Type 2C; empty for a chest (unpaired)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    if item.heatmap is not None:
        derivation = "opacityd summary: network input with Grad-CAM heatmap"
    elif item.network_input is not None:
        derivation = "opacityd summary: network input without heatmap"
    else:
        derivation = "opacityd summary: result text"
    if item.previous_uid is not None:
        derivation += f"; supersedes {item.previous_uid}"
    sc.DerivationDescription = derivation[:1024]
    if item.network_input is not None:
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        sc.SourceImageSequence = DicomSequence([ref])
    sc.InstanceCreationDate = sc.ContentDate
    sc.InstanceCreationTime = sc.ContentTime
    return sc


def png_bytes(pixels: np.ndarray) -> bytes:
    """``pixels`` (uint8 gray (H, W) or RGB (H, W, 3)) as PNG (fast compression)."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def previews(item: SummaryInput) -> dict[str, bytes]:
    """The worklist page's pictures at the network's resolution: ``input`` (the network input
    in gray) and, when there is a heatmap, ``heatmap`` (drawn over it, with its legend)."""
    if item.network_input is None:
        return {}
    gray = np.round(np.clip(item.network_input, 0.0, 1.0) * 255).astype(np.uint8)
    out = {"input": png_bytes(gray)}
    if item.heatmap is not None and item.picture is not None:
        out["heatmap"] = png_bytes(item.picture)
    return out

