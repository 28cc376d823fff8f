"""Imaging modality of a prepared dataset: decides the augmentation defaults.

`prepare --modality` records it in dataset.json ("modality"); without the flag it
follows `--crop`: a fundus crop means fundus photographs, `--crop=none` means
"other" (OCT B-scans, already-cropped thumbnails, anything without a circular field).
Datasets prepared before the key existed get the same rule from their recorded crop.

| modality | augmentation defaults (`augment.config_for_modality`)                       |
| -------- | ---------------------------------------------------------------------------- |
| fundus   | circular-field mask, rotation 180, h+v flips (a fundus photo has no "up")    |
| oct      | no mask, no vertical flip (retina on top), rotation 10, no hue/saturation    |
| other    | no mask, no vertical flip, rotation 10                                       |
"""

MODALITIES = ("fundus", "oct", "other")


def default_modality(crop: str) -> str:
    """The modality implied by prepare's --crop ("fundus" -> fundus, else other)."""
    return "fundus" if crop == "fundus" else "other"


def modality_of(info: dict) -> str:
    """dataset.json's "modality", else the one its recorded crop implies."""
    modality = info.get("modality")
    if modality is None:
        modality = default_modality((info.get("preprocessing") or {}).get("crop", "fundus"))
    if modality not in MODALITIES:
        raise ValueError(f"dataset.json: modality {modality!r} is not one of {MODALITIES}")
    return modality
