"""Tests for input_pipeline/synthetic.py: labels from drawn lesions, geometry, determinism."""

import hashlib
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from input_pipeline import synthetic as syn

SIZE = 96  # small but lesions still fit: r ~ 45 px


def _render(seed=0, **kw):
    return syn.render_fundus(np.random.default_rng(seed), SIZE, **kw)


def _rho(size, wide=False, clipped=False):
    h, w = syn.image_shape(size, wide)
    cx, cy, r = syn.field_circle(size, wide, clipped)
    y, x = np.mgrid[0:h, 0:w]
    return np.hypot(x - cx, y - cy) / r, r


def _tree_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- label rule ---------------------------------------------------------------------------

@pytest.mark.parametrize("counts, grade", [
    ((0, 0, 0, 0), 0),
    ((1, 0, 0, 0), 1),
    ((9, 0, 0, 0), 1),
    ((3, 1, 0, 0), 2),
    ((3, 0, 2, 0), 2),
    ((0, 7, 3, 0), 2),   # one below the severe threshold
    ((0, 8, 0, 0), 3),   # SEVERE_HAEMORRHAGES
    ((5, 15, 4, 0), 3),
    ((0, 0, 0, 1), 4),   # any neovascularisation, even alone
    ((10, 12, 4, 2), 4),
])
def test_grade_from_counts(counts, grade):
    assert syn.grade_from_counts(*counts) == grade


@pytest.mark.parametrize("grade", range(5))
def test_sampled_counts_give_their_grade(grade):
    rng = np.random.default_rng(grade)
    for _ in range(50):
        assert syn.grade_from_counts(**syn.sample_lesion_counts(rng, grade)) == grade


def test_label_priors():
    rng = np.random.default_rng(0)
    specs = [syn.sample_image_spec(rng) for _ in range(4000)]
    freq = np.bincount([s["dr_grade"] for s in specs], minlength=5) / len(specs)
    np.testing.assert_allclose(freq, syn.GRADE_PRIOR, atol=0.025)
    for name, p in syn.DISEASE_PRIORS.items():
        assert abs(np.mean([s["diseases"][name] for s in specs]) - p) < 0.025, name
    dark = np.mean([s["brightness"] < 0.7 for s in specs])
    assert abs(dark - syn.DARK_IMAGE_PROB) < 0.025


# --- geometry -----------------------------------------------------------------------------

def test_field_circle_values():
    assert syn.field_circle(100) == (49.5, 49.5, 47.0)
    assert syn.field_circle(100, wide=True) == (74.5, 49.5, 50.0)
    assert syn.field_circle(100, wide=True, clipped=True) == pytest.approx((74.5, 49.5, 56.0))
    with pytest.raises(ValueError):
        syn.field_circle(100, clipped=True)


@pytest.mark.parametrize("wide, clipped", [(False, False), (True, False), (True, True)])
def test_black_outside_reddish_inside(wide, clipped):
    img = _render(3, wide=wide, clipped=clipped).astype(float)
    assert img.shape == (*syn.image_shape(SIZE, wide), 3)
    rho, r = _rho(SIZE, wide, clipped)
    outside = img[rho > 1 + 2 / r]
    assert outside.mean() < 3 and np.percentile(outside, 99) < 12
    inside = img[rho < 0.9].reshape(-1, 3).mean(0)
    assert inside[0] > 80 and inside[0] > inside[1] > inside[2]


def test_wide_capture_borders_and_aspect():
    img = _render(4, wide=True)
    h, w, _ = img.shape
    assert (h, w) == (SIZE, SIZE * 3 // 2)
    cx, cy, r = syn.field_circle(SIZE, wide=True)
    side = int(cx - r) - 1  # columns fully left of the circle (and mirrored right)
    assert side >= SIZE // 4 - 2
    assert img[:, :side].max() < 25 and img[:, w - side:].max() < 25
    # The circle touches top and bottom: the centre column is lit at both ends.
    assert img[0, int(cx)].astype(int).sum() > 60 and img[-1, int(cx)].astype(int).sum() > 60


def test_clipped_capture_is_cut_at_top_and_bottom():
    img = _render(5, wide=True, clipped=True).astype(int).sum(-1)
    cx, _, r = syn.field_circle(SIZE, wide=True, clipped=True)
    assert r > SIZE / 2
    lit = img[[0, -1]] > 60
    # Top and bottom rows are lit over a chord of the circle, not a single point.
    assert lit.sum(1).min() > 0.3 * SIZE
    assert img[:, : int(cx - r) - 1].max() < 25


@pytest.mark.parametrize("eye, sign", [("OD", 1), ("OS", -1)])
def test_optic_disc_side(eye, sign):
    img = _render(6, eye=eye).astype(float)
    lum = img.sum(-1)
    bright = lum >= np.percentile(lum, 99.5)  # the disc is the brightest structure
    cx, _, r = syn.field_circle(SIZE)
    assert sign * (np.nonzero(bright)[1].mean() - cx) > 0.3 * r  # disc centre at >= 0.4 r


def test_dark_exposure():
    rho, _ = _rho(SIZE)
    normal = _render(7)[rho < 0.9].mean()
    dark = _render(7, brightness=0.4)[rho < 0.9].mean()
    assert 0.3 < dark / normal < 0.5


# --- lesions and diseases -----------------------------------------------------------------

def _diff_mask(a, b, tol=12):
    return np.abs(a.astype(int) - b.astype(int)).max(-1) > tol


@pytest.mark.parametrize("lesion", syn.LESIONS)
@pytest.mark.parametrize("quadrant", range(4))
def test_single_quadrant_lesions(lesion, quadrant):
    clean = _render(11)
    drawn = _render(11, lesions={lesion: 3, "quadrant": quadrant})
    changed = _diff_mask(clean, drawn)
    assert changed.sum() > 4
    ys, xs = np.nonzero(changed)
    top, left = ys < SIZE / 2, xs < SIZE / 2
    assert np.all(top == (quadrant in (0, 1))) and np.all(left == (quadrant in (0, 2)))


def test_haemorrhages_spread_over_quadrants():
    clean = _render(12)
    drawn = _render(12, lesions={"haemorrhages": 8})
    ys, xs = np.nonzero(_diff_mask(clean, drawn))
    quads = set((2 * (ys >= SIZE / 2) + (xs >= SIZE / 2)).tolist())
    assert quads == {0, 1, 2, 3}


def test_lesion_colours():
    """Haemorrhages darken and redden; exudates brighten towards yellow."""
    clean = _render(13).astype(float)
    for name, darker in (("haemorrhages", True), ("exudates", False)):
        img = _render(13, lesions={name: 4}).astype(float)
        m = _diff_mask(clean, img, tol=30)
        delta = (img[m] - clean[m]).mean(0)
        if darker:
            assert delta.sum() < 0 and img[m][:, 0].mean() > img[m][:, 1].mean()
        else:
            assert delta.sum() > 0 and delta[1] > 0 and img[m][:, 1].mean() > img[m][:, 2].mean()


def test_microaneurysms_visible_at_128_px_crop():
    """A 256-px render downscaled to a 128-px field crop keeps its microaneurysms."""
    size = 256
    rng_clean, rng_ma = np.random.default_rng(14), np.random.default_rng(14)
    clean = syn.render_fundus(rng_clean, size)
    ma = syn.render_fundus(rng_ma, size, lesions={"microaneurysms": 6})
    cx, cy, r = syn.field_circle(size)
    box = slice(int(cy - r), int(cy + r)), slice(int(cx - r), int(cx + r))

    def small(im):
        return cv2.resize(im[box], (128, 128), interpolation=cv2.INTER_AREA).astype(int)

    diff = np.abs(small(ma) - small(clean)).sum(-1)
    n, _ = cv2.connectedComponents((diff > 40).astype(np.uint8))
    assert n - 1 >= 5  # label 0 is the background; one blob per microaneurysm (may touch)


@pytest.mark.parametrize("disease, region", [
    ("drusen", "fovea"), ("macular_hole", "fovea"), ("cupping", "disc"),
    ("tessellation", "field"), ("laser_scars", "field"),
])
def test_each_disease_changes_its_region(disease, region):
    clean = _render(15, eye="OD")
    sick = _render(15, eye="OD", diseases={disease: True})
    ys, xs = np.nonzero(_diff_mask(clean, sick))
    assert len(xs) > 10
    cx = syn.field_circle(SIZE)[0]
    if region == "fovea":   # OD: fovea left of centre
        assert np.median(xs) < cx
    elif region == "disc":  # OD: disc right of centre
        assert xs.min() > cx
    else:
        assert xs.min() < cx < xs.max()


def test_cupping_enlarges_pale_cup():
    def pale_pixels(img):
        r, g, b = img.astype(int).transpose(2, 0, 1)
        return int(((b > 150) & (g > 200)).sum())

    assert pale_pixels(_render(16, diseases={"cupping": True})) > 1.5 * pale_pixels(_render(16))


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown keys"):
        _render(lesions={"cotton_wool": 2})
    with pytest.raises(ValueError, match="unknown keys"):
        _render(diseases={"glaucoma": True})
    with pytest.raises(ValueError, match="quadrant"):
        _render(lesions={"haemorrhages": 1, "quadrant": 4})
    with pytest.raises(ValueError, match="eye"):
        _render(eye="left")


# --- dataset ------------------------------------------------------------------------------

def test_generate_csv(tmp_path):
    df = syn.generate(tmp_path, 12, 64, seed=3)
    csv = pd.read_csv(tmp_path / "labels.csv")
    assert tuple(csv.columns) == syn.CSV_COLUMNS
    pd.testing.assert_frame_equal(csv, df)
    assert csv["dr_grade"].between(0, 4).all()
    assert (csv["referable"] == (csv["dr_grade"] >= 2).astype(int)).all()
    for col in syn.DISEASES:
        assert set(csv[col]) <= {0, 1}
    for row in csv.itertuples():
        assert row.image == f"images/{row.Index:06d}.jpg"
        img = cv2.imread(str(tmp_path / row.image))
        assert img.shape == (row.height, row.width, 3) and row.height == 64
        assert row.width in (64, 96)


def test_two_eyes_per_patient_share_traits(tmp_path):
    csv = syn.generate(tmp_path, 12, 48, seed=4)
    assert list(csv["patient_id"]) == [f"P{i // 2:05d}" for i in range(12)]
    assert list(csv["eye"]) == ["OD", "OS"] * 6
    assert (csv.groupby("patient_id")[["width", "height"]].nunique() == 1).all().all()
    # A patient's eyes share one base colour: G/R of the field (exposure-invariant) is
    # much closer between the two eyes than between patients.
    gr = []
    for row in csv.itertuples():
        img = cv2.imread(str(tmp_path / row.image))[..., ::-1].astype(float)
        rho, _ = _rho(48, wide=row.width > 48)
        field = img[rho < 0.6]
        gr.append(field[:, 1].mean() / field[:, 0].mean())
    gr = np.array(gr).reshape(-1, 2)
    within = np.abs(gr[:, 0] - gr[:, 1]).mean()
    between = np.abs(gr[:, :1] - gr[:, :1].T).sum() / (6 * 5)
    assert within < 0.5 * between


def test_same_seed_same_bytes(tmp_path):
    syn.generate(tmp_path / "a", 6, 64, seed=7)
    syn.generate(tmp_path / "b", 6, 64, seed=7)
    syn.generate(tmp_path / "c", 6, 64, seed=8)
    a, b, c = (_tree_hashes(tmp_path / d) for d in "abc")
    assert len(a) == 7 and a == b
    images = [k for k in a if k.startswith("images/")]
    assert all(a[k] != c[k] for k in images)


def test_prefix_stability(tmp_path):
    """Image i depends only on (seed, i): a longer run starts with the shorter one."""
    syn.generate(tmp_path / "short", 3, 48, seed=9)
    syn.generate(tmp_path / "long", 5, 48, seed=9)
    short, long = _tree_hashes(tmp_path / "short"), _tree_hashes(tmp_path / "long")
    assert all(long[k] == v for k, v in short.items() if k.startswith("images/"))


def test_cli(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "input_pipeline.synthetic", f"--out_dir={tmp_path}",
         "--num_images=4", "--image_size=48", "--seed=1"],
        check=True, capture_output=True, cwd=syn.__file__.rsplit("/input_pipeline", 1)[0])
    csv = pd.read_csv(tmp_path / "labels.csv")
    assert len(csv) == 4 and all((tmp_path / p).is_file() for p in csv["image"])
    img, row = syn.make_example(2, 48, seed=1)
    assert csv.loc[2, "dr_grade"] == row["dr_grade"]
