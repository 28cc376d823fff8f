"""evaluation.report: report.html has every section with embedded images; PNGs and TB images."""

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from evaluation import calibration, metrics, report, thresholds


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def grading_inputs():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 60)
    logits = rng.normal(0, 1, (60, 4)) + (y[:, None] - np.arange(4)[None] - 0.5)
    cal = calibration.calibrate(logits[:30], y[:30], "coral", logits[30:], y[30:])
    probs = np.asarray(calibration.heads.probabilities(logits, "coral"))
    rule = thresholds.ordinal_rule(y[:30], probs[:30])
    dec = thresholds.apply_rule(rule, probs[30:])
    m = metrics.compute_metrics("dr_grade", y[30:], probs[30:], dec, list("01234"), n_boot=20)
    curves = metrics.compute_curves("dr_grade", y[30:], probs[30:], list("01234"))
    thr = {"task": "dr_grade", "head": "coral", "temperature": cal["temperature"],
           "decision": rule}
    items = [{"png": _png("red"), "caption": "true 2, pred 2", "correct": True},
             {"png": _png("blue"), "caption": "true 4, pred 1", "correct": False}]
    return m, thr, cal, curves, items


def test_report_has_every_section_and_embedded_images(tmp_path, grading_inputs):
    path = report.write_report(tmp_path, *grading_inputs)
    page = path.read_text()
    for sid, title in report.SECTIONS.items():
        assert f'<section id="{sid}"><h2>{title}</h2>' in page
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 5 + 2  # confusion, roc, pr, per-class, reliability + 2 Grad-CAMs
    assert all(base64.b64decode(e)[:8] == b"\x89PNG\r\n\x1a\n" for e in embedded)
    assert "<h3>Correct</h3>" in page and "true 4, pred 1" in page
    assert "qwk" in page and "grade &gt;= 1" in page
    names = {p.name for p in tmp_path.glob("*.png")}
    assert names == {"confusion_matrix.png", "roc.png", "pr.png", "per_class_f1.png",
                     "reliability.png"}


def test_multilabel_report_without_calibration(tmp_path):
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probs = np.array([[0.8, 0.3], [0.2, 0.7], [0.6, 0.4], [0.1, 0.2]])
    rule = thresholds.multilabel_rule(y, probs, ["a", "b"])
    dec = thresholds.apply_rule(rule, probs)
    m = metrics.compute_metrics("multilabel", y, probs, dec, ["a", "b"], n_boot=0)
    c = metrics.compute_curves("multilabel", y, probs, ["a", "b"])
    thr = {"task": "multilabel", "head": "sigmoid", "temperature": None, "decision": rule}
    page = report.write_report(tmp_path, m, thr, None, c, []).read_text()
    assert '<section id="reliability">' in page and "Not available" in page
    assert "No Grad-CAM images" in page and "fallback reason" in page


def test_tensorboard_images(tmp_path, grading_inputs):
    from tensorboard.backend.event_processing import event_accumulator

    report.write_report(tmp_path / "eval", *grading_inputs)
    report.log_to_tensorboard(tmp_path / "tb", report.report_pngs(tmp_path / "eval"))
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"),
                                             size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["images"])
    assert {"eval/roc", "eval/reliability", "eval/confusion_matrix"} <= tags
