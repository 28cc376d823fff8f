"""One self-contained HTML evaluation report, its figures as PNGs, and TensorBoard images.

Inputs are the JSON-ready dicts of the other evaluation modules:
- metrics: `evaluation.metrics.compute_metrics(...)`;
- thresholds: the thresholds.json dict ({"task", "head", "temperature", "decision": rule});
- calibration: `evaluation.calibration.calibrate(...)` or None;
- curves: `evaluation.metrics.compute_curves(...)`;
- gradcam_items: [{"png": bytes, "caption": str, "correct": bool}] (overlay images).

Section ids in report.html: headline, confusion, curves, per-class, reliability,
thresholds, gradcam.
"""

import base64
import html
import io
import pathlib

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SECTIONS = {
    "headline": "Headline metrics",
    "confusion": "Confusion matrix",
    "curves": "ROC and precision-recall curves",
    "per-class": "Per-class F1",
    "reliability": "Reliability diagram",
    "thresholds": "Decision thresholds",
    "gradcam": "Grad-CAM gallery",
}


# --------------------------------------------------------------------------- figures

def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def fig_confusion(metrics: dict) -> plt.Figure:
    """Heatmap of the [K, K] confusion matrix, or of per-label tp/fp/fn/tn (multilabel)."""
    if "confusion_matrix" in metrics:
        cm = np.asarray(metrics["confusion_matrix"])
        rows = cols = metrics["class_names"]
        xlabel, ylabel = "predicted", "true"
    else:
        rows = list(metrics["label_confusion"])
        cols = ["tp", "fp", "fn", "tn"]
        cm = np.array([[metrics["label_confusion"][r][c] for c in cols] for r in rows])
        xlabel, ylabel = "count", "label"
    size = 2 + 0.45 * max(len(rows), len(cols))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > cm.max() / 2 else "black", fontsize=8)
    ax.set(xticks=range(len(cols)), yticks=range(len(rows)), xticklabels=cols,
           yticklabels=rows, xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    return fig


def fig_curves(curves: dict, kind: str) -> plt.Figure:
    """ROC (kind="roc") or PR (kind="pr") curves, one line per class in `curves[kind]`."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, c in curves[kind].items():
        if kind == "roc":
            ax.plot(c["fpr"], c["tpr"], label=f"{name} (AUC {c['auc']:.3f})")
        else:
            ax.step(c["recall"], c["precision"], where="post", label=f"{name} (AP {c['ap']:.3f})")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    else:
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    if curves[kind]:
        ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
    else:
        ax.text(0.5, 0.5, "undefined on this split", ha="center")
    fig.tight_layout()
    return fig


def fig_per_class_f1(metrics: dict) -> plt.Figure:
    """Bar per class; classes with undefined F1 are marked n/a."""
    names = list(metrics["per_class"])
    f1 = [metrics["per_class"][n].get("f1") for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), [v or 0.0 for v in f1], color="tab:blue")
    for i, v in enumerate(f1):
        ax.text(i, (v or 0) + 0.01, _fmt(v), ha="center", fontsize=7)
    ax.set(xticks=range(len(names)), ylim=(0, 1.1), ylabel="F1")
    ax.set_xticklabels(names, rotation=45 if len(names) > 6 else 0, ha="right", fontsize=8)
    fig.tight_layout()
    return fig


def fig_reliability(calibration: dict) -> plt.Figure:
    """Accuracy vs confidence per bin, before and after temperature scaling."""
    split = "test" if "test" in calibration["reliability"] else "val"
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    for when, marker in (("before", "o-"), ("after", "s-")):
        bins = [b for b in calibration["reliability"][split][when] if b["count"]]
        ece = calibration["ece"][split][when]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker,
                label=f"{when} (ECE {ece:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"Reliability ({split}), T = {_fmt_t(calibration['temperature'])}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def _fmt_t(t) -> str:
    return f"{t:.3f}" if np.isscalar(t) else "per class"


def make_figures(metrics: dict, calibration: dict | None, curves: dict) -> dict[str, bytes]:
    """Figure name -> PNG bytes (names are the PNG file stems)."""
    figs = {"confusion_matrix": fig_confusion(metrics), "roc": fig_curves(curves, "roc"),
            "pr": fig_curves(curves, "pr"), "per_class_f1": fig_per_class_f1(metrics)}
    if calibration is not None:
        figs["reliability"] = fig_reliability(calibration)
    pngs = {}
    for name, fig in figs.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        pngs[name] = buf.getvalue()
    return pngs


# --------------------------------------------------------------------------- html

def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def headline_html(metrics: dict) -> str:
    rows = []
    for name in metrics["headline"]:
        ci = metrics["confidence_intervals"].get(name, {})
        interval = (f"[{ci['low']:.3f}, {ci['high']:.3f}]" if ci.get("low") is not None
                    else ci.get("reason", "not computed"))
        rows.append([name, metrics["metrics"][name], interval,
                     metrics["undefined"].get(name, "")])
    others = [[k, v, "", metrics["undefined"].get(k, "")] for k, v in metrics["metrics"].items()
              if k not in metrics["headline"]]
    unit = metrics.get("ci_unit", "patient")
    patients = ("no patient ids in the source: each image is its own bootstrap cluster"
                if metrics.get("num_patients") is None
                else f"{metrics['num_patients']} patients")
    n = f"<p>{metrics['num_examples']} images, {patients}.</p>"
    return (scope_html(metrics) + n
            + _table(["metric", "value", f"95% CI ({unit}-level bootstrap)", "note"],
                     rows + others))


def scope_text(metrics: dict) -> list[str]:
    """Sentences saying what was evaluated and where the decision rule came from."""
    split = metrics.get("split", "test")
    lines = [f"Evaluated split: {split}"
             + (f" of {metrics['data_dir']}" if metrics.get("data_dir") else "")
             + (" (external validation: another prepared data set)" if metrics.get("external")
                else "") + "."]
    if metrics.get("decision_origin"):
        lines.append(f"Temperature, decision rule and TTA setting: {metrics['decision_origin']};"
                     " none of them was tuned on the evaluated data."
                     if metrics.get("external")
                     else f"Temperature and decision rule: {metrics['decision_origin']}.")
    if metrics.get("tuned_on_evaluated_data"):
        lines.append("Optimistic: the temperature and the decision rule were tuned on this "
                     "same split, then scored on it.")
    lines.append("Test-time augmentation (mean logits of the image and its flips): "
                 + ("on" if metrics.get("tta") else "off") + ".")
    return lines


def scope_html(metrics: dict) -> str:
    return "".join(f"<p>{html.escape(line)}</p>" for line in scope_text(metrics))


def thresholds_html(thresholds: dict) -> str:
    rule = thresholds["decision"]
    parts = [f"<p>Rule: <code>{html.escape(rule['type'])}</code>, temperature "
             f"{html.escape(str(thresholds.get('temperature')))}, tuned on the "
             f"{html.escape(str(thresholds.get('tuned_on', 'val')))} split"
             f"{' of ' + html.escape(thresholds['data_dir']) if thresholds.get('data_dir') else ''}"
             f"; TTA "
             f"{'on' if thresholds.get('tta') else 'off'} (the export graph does the same)."
             "</p>"]
    if rule["type"] == "per_class_thresholds":
        parts.append(_table(["class", "threshold", "val F1", "val precision", "val recall",
                             "fallback reason"],
                            [[n, d["threshold"], d["f1"], d["precision"], d["recall"],
                              d["reason"] or ""] for n, d in rule["details"].items()]))
    elif rule["type"] == "binary_threshold":
        rows = [[c, (rule.get(c) or {}).get("threshold"), (rule.get(c) or {}).get("value")]
                for c in ("f1", "youden")]
        parts.append(_table(["criterion", "threshold", "val value"], rows))
        parts.append(f"<p>Applied: {rule['criterion']} threshold {_fmt(rule['threshold'])}"
                     f"{' (' + html.escape(rule['reason']) + ')' if rule['reason'] else ''}</p>")
    elif rule["type"] == "ordinal_cutpoints":
        parts.append(_table(["cut-point on E[grade]", "value"],
                            [[f"grade >= {j + 1}", c] for j, c in enumerate(rule["cutpoints"])]))
        parts.append(f"<p>Validation QWK: default {_fmt(rule['qwk_default'])}, "
                     f"tuned {_fmt(rule['qwk_tuned'])}.</p>")
    return "".join(parts)


def gradcam_html(items: list[dict]) -> str:
    if not items:
        return "<p>No Grad-CAM images.</p>"
    parts = []
    for correct, title in ((True, "Correct"), (False, "Wrong")):
        figs = [f"<figure>{_img(it['png'], it['caption'])}<figcaption>"
                f"{html.escape(it['caption'])}</figcaption></figure>"
                for it in items if bool(it["correct"]) == correct]
        parts.append(f'<h3>{title}</h3><div class="gallery">{"".join(figs) or "none"}</div>')
    return "".join(parts)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        ".gallery{display:flex;flex-wrap:wrap}figure{margin:4px;width:200px}"
        "figure img{width:200px}figcaption{font-size:11px}")


def render_html(metrics: dict, thresholds: dict, pngs: dict[str, bytes],
                gradcam_items: list[dict]) -> str:
    """The report page; every image is embedded as base64 so the file stands alone."""
    def img(name):
        return _img(pngs[name], name) if name in pngs else "<p>Not available.</p>"

    bodies = {
        "headline": headline_html(metrics),
        "confusion": img("confusion_matrix"),
        "curves": img("roc") + img("pr"),
        "per-class": img("per_class_f1"),
        "reliability": img("reliability"),
        "thresholds": thresholds_html(thresholds),
        "gradcam": gradcam_html(gradcam_items),
    }
    sections = "".join(f'<section id="{sid}"><h2>{title}</h2>{bodies[sid]}</section>'
                       for sid, title in SECTIONS.items())
    title = f"fundusflow evaluation: {html.escape(metrics['task'])}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_CSS}</style></head><body><h1>{title}</h1>{sections}</body></html>")


def write_report(eval_dir, metrics: dict, thresholds: dict, calibration: dict | None,
                 curves: dict, gradcam_items: list[dict]) -> pathlib.Path:
    """Writes eval_dir/report.html and eval_dir/<figure>.png; returns the report path."""
    eval_dir = pathlib.Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    pngs = make_figures(metrics, calibration, curves)
    for name, png in pngs.items():
        (eval_dir / f"{name}.png").write_bytes(png)
    path = eval_dir / "report.html"
    path.write_text(render_html(metrics, thresholds, pngs, gradcam_items), encoding="utf-8")
    return path


def report_pngs(eval_dir) -> dict[str, bytes]:
    """The figure PNGs that `write_report` saved beside report.html: name -> bytes."""
    return {p.stem: p.read_bytes() for p in sorted(pathlib.Path(eval_dir).glob("*.png"))}


def log_to_tensorboard(logdir, pngs: dict[str, bytes], step: int = 0) -> None:
    """Writes each PNG as a `tf.summary.image` named eval/<name> under logdir
    (W/tensorboard/eval in evaluate.py)."""
    import tensorflow as tf  # only here: the rest of the report needs no TensorFlow

    writer = tf.summary.create_file_writer(str(logdir))
    with writer.as_default():
        for name, png in pngs.items():
            tf.summary.image(f"eval/{name}", tf.image.decode_png(png, channels=3)[None], step=step)
    writer.flush()
    writer.close()
