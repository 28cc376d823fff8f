"""The model card (model_card.md) written beside every export.

Markdown: task and classes, training data, evaluation metrics with their intervals, the
decision rule, pre-processing, intended use and limitations.
"""

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from evaluation import report
from input_pipeline import preprocessing

if TYPE_CHECKING:  # exporting imports this module
    from serving.exporting import ServingSpec

NOTICE = ("**Not a medical device.** This model is a research artefact. It has not been "
          "cleared or approved by any regulator (e.g. FDA, EU MDR) and must not be used to "
          "diagnose, screen, triage or decide the treatment of any patient.")


def _split_rows(dataset_info: dict, class_names) -> list[str]:
    rows = ["| split | images | " + " | ".join(class_names) + " |",
            "|---|---|" + "---|" * len(class_names)]
    for split, info in (dataset_info.get("splits") or {}).items():
        counts = info.get("class_counts") or []
        rows.append(f"| {split} | {info.get('num_examples', '?')} | "
                    + " | ".join(str(c) for c in counts) + " |")
    return rows


def _evaluation_lines(m: dict, heading: str) -> list[str]:
    """One evaluation (a metrics.json of evaluate.py): scope, size, headline metrics + CIs."""
    unit = m.get("ci_unit", "patient")
    patients = ("no patient ids in the source, so intervals are image-level"
                if m.get("num_patients") is None else f"{m['num_patients']} patients")
    lines = [f"**{heading}**: {m.get('num_examples', '?')} images, {patients}.", "",
             *[f"- {line}" for line in report.scope_text(m)], "",
             f"| metric | value | 95% CI ({unit}-level bootstrap) |", "|---|---|---|"]
    for name in m["headline"]:
        value = m["metrics"].get(name)
        ci = (m.get("confidence_intervals") or {}).get(name) or {}
        interval = (f"[{ci['low']:.3f}, {ci['high']:.3f}]" if ci.get("low") is not None
                    else ci.get("reason", "not computed"))
        shown = "undefined" if value is None else f"{value:.3f}"
        lines.append(f"| {name} | {shown} | {interval} |")
    return [*lines, ""]


def _metric_sections(metrics: dict | None, external: Sequence[dict] = ()) -> list[str]:
    """The evaluation on W's own data (W/eval/metrics.json), then each external one."""
    if not metrics and not external:
        return ["No evaluation found (W/eval/metrics.json); run evaluate.py before relying "
                "on this model."]
    lines = []
    if metrics:
        lines += _evaluation_lines(metrics, f"Split `{metrics.get('split', '?')}`")
    for m in external:
        lines += _evaluation_lines(m, f"External validation: split `{m.get('split', '?')}` "
                                      f"of {m.get('data_dir', '?')}")
    return lines


def _tta_text(spec: "ServingSpec") -> str:
    if spec.tta:
        return ("Test-time augmentation: on. The served graph averages the logits of the "
                "image and of its horizontal and vertical flips (3 forward passes), as "
                "evaluate.py --tta did when it tuned this rule.")
    return ("Test-time augmentation: off. The served graph runs one view, the one the rule "
            "was tuned and evaluated on.")


def _ci_limitation(metrics: dict | None) -> str:
    if not metrics:
        return "- No confidence intervals: the model was not evaluated."
    unit = ("patient-level" if metrics.get("ci_unit", "patient") == "patient"
            else "image-level (the source has no patient ids)")
    return (f"- Confidence intervals come from a {unit} bootstrap of one "
            f"`{metrics.get('split', '?')}` split.")


def _preprocessing_text(pp: preprocessing.PreprocessConfig) -> str:
    crop = "fundus circle crop to its bounding square" if pp.crop == "fundus" else "no crop"
    clahe = (f" -> CLAHE on the green channel (clip limit {pp.clahe_clip_limit}, "
             f"{pp.clahe_tile_grid}x{pp.clahe_tile_grid} tiles)" if pp.clahe else "")
    ben = f" -> Ben Graham (sigma {pp.ben_graham_sigma} at 512 px)" if pp.ben_graham else ""
    return (f"Decode (RGB) -> {crop} -> resize to {pp.image_size} px{clahe}{ben} -> "
            f"resize to the model input {pp.model_image_size} px, pixels in [0, 255] "
            "(normalisation inside the model).")


def gradability_section(pp: preprocessing.PreprocessConfig, fmt: str) -> list[str]:
    """Model-card lines on the per-image status outputs (SavedModel only)."""
    if fmt != "saved_model":
        return []
    return [
        "## Image quality and errors", "",
        "Every image gets probabilities, but check two flags first. `ok` is false (and "
        "`error` says why) when the bytes could not be used: empty, not an image, "
        "truncated, corrupt JPEG data, above the pixel or decoded-size cap; ignore that "
        "image's probabilities. `gradable` is false when `quality` lists a reason: "
        f"`no_fundus_field` (no circular field of view found), `too_dark` (mean luma in "
        f"the field below {pp.dark_threshold:g} of 255), `small_field` (field diameter "
        f"below {pp.small_field_fraction:g} of the shorter side or {pp.small_field_pixels:g}"
        " original pixels). These are the checks and thresholds prepare recorded for the "
        "training images (same code); the model was not trained to recognise ungradable "
        "images, so its output on them is not meaningful.", ""]


def model_card(spec: "ServingSpec", dataset_info: dict, metrics: dict | None = None, *,
               external: Sequence[dict] = (), title: str = "fundusflow model",
               fmt: str = "saved_model") -> str:
    """Markdown model card: task, classes, data, metrics, rule, pre-processing, use, limits.

    Args:
        metrics: W/eval/metrics.json (evaluate.py on W's own data), or None.
        external: the metrics.json of each external validation (W/eval/external/*/).
    """
    pp = spec.preprocess
    rows = dataset_info.get("rows") or {}
    temperature = spec.to_json()["temperature"]
    signature = ("`serving_default`: `image_bytes` (tf.string [B], JPEG/PNG) -> "
                 f"`probabilities`, `{spec.decision_name}`, `class_names`; `serve_tensor`: "
                 f"`image` float32 [B, {pp.model_image_size}, {pp.model_image_size}, 3] "
                 "in [0, 255]" if fmt == "saved_model" else
                 f"`model.{fmt}`: `image` float32 [B, {pp.model_image_size}, "
                 f"{pp.model_image_size}, 3] in [0, 255] -> "
                 f"{'logits, ' if fmt == 'onnx' else ''}probabilities, "
                 f"`{spec.decision_name}`; the client pre-processes (preprocessing.json)")
    lines = [
        f"# {title}", "", NOTICE, "",
        "## Model", "",
        f"- Task: `{spec.task}` (head `{spec.head}`), {len(spec.class_names)} classes: "
        + ", ".join(f"`{c}`" for c in spec.class_names),
        f"- Interface: {signature}",
        "",
        "## Training data", "",
        f"Source: {json.dumps(dataset_info.get('source', {}))}. Rows read "
        f"{rows.get('read', '?')}, written {rows.get('written', '?')}, rejected "
        f"{rows.get('rejected', '?')}; dropped classes: "
        f"{dataset_info.get('dropped_classes') or 'none'}; balance: "
        f"{dataset_info.get('balance', '?')}. Counts per class (positives per label for "
        "multilabel):", "",
        *_split_rows(dataset_info, spec.class_names), "",
        "## Evaluation", "", *_metric_sections(metrics, external), "",
        "## Decision rule", "",
        f"Temperature {temperature}; rule `{spec.rule['type']}`: "
        f"`{json.dumps({k: v for k, v in spec.rule.items() if k != 'details'})}`.", "",
        _tta_text(spec), "",
        "## Pre-processing", "",
        _preprocessing_text(pp), "",
        *gradability_section(pp, fmt),
        "## Intended use", "",
        "Research and education on retinal images like the training data (same cameras, "
        "populations and grading protocol); comparison of methods; a starting point for "
        "properly validated development.", "",
        "## Limitations", "",
        "- Validated only on the splits above; performance on other cameras, populations, "
        "image quality or disease prevalence is unknown and likely lower.",
        "- Ungradable, non-fundus or very dark images still receive a prediction.",
        _ci_limitation(metrics),
        "- Grad-CAM maps are not evidence that the model uses clinically meaningful features.",
        "", NOTICE, ""]
    return "\n".join(lines)
