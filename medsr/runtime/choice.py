"""Which model runs on an input when the user names none: the one rule (``choose_model``).

medsr ships a gray chest X-ray model (``medsr-cxr-x4``, the default) and a colour retinal fundus model
(``medsr-retina-x2``). Running the chest model on a colour fundus photograph would silently turn it
into a 4x gray-model-per-channel image it was never trained for, so ``medsr-infer`` without ``--model``
decides per input, from the header only (no pixel decoded), in this order:

1. an explicit ``--model`` / ``--engine`` (or ``Upscaler`` spec) always wins;
2. DICOM ophthalmic photography (SOP Class Ophthalmic Photography 8/16 Bit Image Storage, or Modality
   ``OP``): the retina model, whether the photograph is colour or gray (red-free);
3. any other colour image (3 samples per pixel: an RGB PNG/JPEG/TIFF, a colour DICOM): the retina
   model, medsr's colour model (medsr has no other model trained for colour medical images);
4. everything else (gray PNG/TIFF/JPEG, radiograph DICOM, unreadable headers): the default chest
   X-ray model ``medsr.weights.DEFAULT_MODEL``.

The choice and its reason are logged for every input (``medsr-infer`` prints
``model medsr-retina-x2 for IDRiD_01.jpg (colour image, 3 samples per pixel)``). A chosen model that is
registered but not shipped yet fails that file with a clear message: the chest model never runs in its
place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: SOP classes of ophthalmic photography (DICOM PS3.4 B.5): the retina model's inputs
OPHTHALMIC_PHOTOGRAPHY_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit Image Storage",
}
#: DICOM Modality of ophthalmic photography
OPHTHALMIC_MODALITY = "OP"


@dataclass(frozen=True)
class ModelChoice:
    model: str  # registry name or the spec given
    reason: str  # why, for the log


def choose_model(path: str | os.PathLike[str], explicit: str | None = None) -> ModelChoice:
    """The model for input ``path`` (see the module docstring for the rule); ``explicit`` wins when given."""
    from medsr.weights.registry import DEFAULT_MODEL, RETINA_MODEL

    if explicit:
        return ModelChoice(str(explicit), "named explicitly")
    from medsr.io.probe import header_kind

    k = header_kind(Path(path))
    sop, modality, channels = str(k["sop_class_uid"]), str(k["modality"]), int(k["channels"])  # type: ignore[call-overload]
    if k["format"] == "dicom":
        if sop in OPHTHALMIC_PHOTOGRAPHY_SOP_CLASSES:
            return ModelChoice(RETINA_MODEL, f"DICOM {OPHTHALMIC_PHOTOGRAPHY_SOP_CLASSES[sop]}")
        if modality == OPHTHALMIC_MODALITY:
            return ModelChoice(RETINA_MODEL, "DICOM Modality OP (ophthalmic photography)")
    if channels >= 3:
        return ModelChoice(RETINA_MODEL, f"colour image ({channels} samples per pixel): medsr's colour (fundus) model")
    what = f"DICOM Modality {modality}" if k["format"] == "dicom" and modality else (
        "gray image" if channels == 1 else "image kind unknown from the header")
    return ModelChoice(DEFAULT_MODEL, f"{what}: the default chest X-ray model")
