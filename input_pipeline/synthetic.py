"""Synthetic fundus photographs whose labels are derived from what is drawn.

The embedded demo dataset (`make demo`) and the image source of many tests:

    python -m input_pipeline.synthetic --out_dir=D --num_images=800 --image_size=256 --seed=0
    python -m input_pipeline.synthetic --layout=rfmid --out_dir=D ...   (synthetic_layouts.py)

writes `D/images/NNNNNN.jpg` (JPEG quality 92) and `D/labels.csv` with the columns
`CSV_COLUMNS`; `image` is relative to D. Image i depends only on (seed, i): the same seed
gives the same bytes, and a longer run starts with the images of a shorter one.

Field geometry (`field_circle`), for an image of height S = `size`:
- square capture: S x S, circle centred, radius 0.47 S (black margin all round);
- wide capture: S x 3S//2 (3:2), radius S/2: the circle touches top and bottom and
  leaves black side borders;
- wide clipped: S x 3S//2, radius 0.56 S: the circle is cut off at top and bottom.
The centre is the image centre ((W-1)/2, (H-1)/2) in pixel-index coordinates, so the
image quadrants (0..3 = top-left, top-right, bottom-left, bottom-right) are also the
quadrants of the field.

Anatomy: optic disc (radius ~r/6, r = field radius) on the right of the image for a
right eye (OD) and on the left for OS, fovea/macula on the other side, two vessel trees
(arteries, veins) branching from the disc. Labels:
- `dr_grade` = `grade_from_counts` of the lesion counts actually drawn; `referable` =
  int(dr_grade >= 2). Target grades follow `GRADE_PRIOR`.
- disease columns (`DISEASES`) are drawn independently of the grade with `DISEASE_PRIORS`.
- two consecutive images are the OD and OS eye of one patient, who shares the capture
  geometry and fundus pigmentation.

Lesion and disease sizes are relative to r, because `prepare` crops the field and
resizes it (128 px in the demo): a microaneurysm (radius >= 0.0125 r) still spans about
1.5 px there.
"""

import functools
import pathlib

import cv2
import numpy as np
import pandas as pd
from absl import app, flags

GRADE_PRIOR = (0.45, 0.12, 0.22, 0.12, 0.09)
DISEASE_PRIORS = {
    "drusen": 0.15,
    "tessellation": 0.20,
    "cupping": 0.12,
    "macular_hole": 0.05,
    "laser_scars": 0.08,
}
DISEASES = tuple(DISEASE_PRIORS)
LESIONS = ("microaneurysms", "haemorrhages", "exudates", "neovascular")
CSV_COLUMNS = (
    "image", "patient_id", "eye", "dr_grade", "referable", *DISEASES, "width", "height",
)
JPEG_QUALITY = 92
SEVERE_HAEMORRHAGES = 8  # blot haemorrhages that make grade 3 (stands in for ICDR 4-2-1)
# Capture geometry per patient: (wide, clipped) and its probability.
GEOMETRIES = (((False, False), 0.45), ((True, False), 0.40), ((True, True), 0.15))
DARK_IMAGE_PROB = 0.12  # under-exposed captures

_AA = cv2.LINE_AA
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel centres and radii
_ONE = 1 << _SHIFT


def grade_from_counts(microaneurysms: int, haemorrhages: int, exudates: int,
                      neovascular: int) -> int:
    """ICDR-like grade 0..4 from lesion counts (exudates = number of exudate clusters).

    4 if any neovascular tuft; else 3 if >= SEVERE_HAEMORRHAGES haemorrhages; else 2 if
    any haemorrhage or exudate; else 1 if any microaneurysm; else 0.
    """
    if neovascular > 0:
        return 4
    if haemorrhages >= SEVERE_HAEMORRHAGES:
        return 3
    if haemorrhages > 0 or exudates > 0:
        return 2
    if microaneurysms > 0:
        return 1
    return 0


def image_shape(size: int, wide: bool = False) -> tuple[int, int]:
    """(height, width) of a capture of height `size`."""
    return (size, 3 * size // 2) if wide else (size, size)


def field_circle(size: int, wide: bool = False, clipped: bool = False) -> tuple[float, ...]:
    """(cx, cy, r) of the circular field in pixels (x = column, y = row; see module doc)."""
    if clipped and not wide:
        raise ValueError("clipped fields exist only for wide captures")
    h, w = image_shape(size, wide)
    r = (0.56 if clipped else 0.5) * size if wide else 0.47 * size
    return (w - 1) / 2, (h - 1) / 2, r


# ---------------------------------------------------------------------------------------
# Sampling labels (no pixels).


def sample_lesion_counts(rng: np.random.Generator, grade: int) -> dict[str, int]:
    """Lesion counts whose `grade_from_counts` is `grade` (0..4).

    Grades >= 1 always carry microaneurysms (3..10); grade 3 has 8..16 haemorrhages, which
    `render_fundus` spreads over all four quadrants.
    """
    n = {k: 0 for k in LESIONS}
    if grade >= 1:
        n["microaneurysms"] = int(rng.integers(3, 11))
    if grade == 2:
        n["haemorrhages"] = int(rng.integers(0, 6))
        n["exudates"] = int(rng.integers(0 if n["haemorrhages"] else 1, 4))
    elif grade == 3:
        n["haemorrhages"] = int(rng.integers(SEVERE_HAEMORRHAGES, 17))
        n["exudates"] = int(rng.integers(0, 5))
    elif grade == 4:
        n["haemorrhages"] = int(rng.integers(2, 15))
        n["exudates"] = int(rng.integers(0, 5))
        n["neovascular"] = int(rng.integers(1, 3))
    return n


def sample_image_spec(rng: np.random.Generator) -> dict:
    """Labels and render arguments of one image: lesions, diseases, brightness, dr_grade."""
    target = int(rng.choice(len(GRADE_PRIOR), p=GRADE_PRIOR))
    lesions = sample_lesion_counts(rng, target)
    diseases = {k: bool(rng.random() < p) for k, p in DISEASE_PRIORS.items()}
    dark = rng.random() < DARK_IMAGE_PROB
    brightness = float(rng.uniform(0.35, 0.6) if dark else rng.uniform(0.8, 1.15))
    return {"lesions": lesions, "diseases": diseases, "brightness": brightness,
            "dr_grade": grade_from_counts(**lesions)}


def sample_patient(rng: np.random.Generator) -> dict:
    """Patient-level traits shared by both eyes: capture geometry and fundus colour."""
    geometries, probs = zip(*GEOMETRIES, strict=True)
    wide, clipped = geometries[rng.choice(len(geometries), p=probs)]
    base = (rng.uniform(190, 235), rng.uniform(75, 115), rng.uniform(25, 55))
    return {"wide": wide, "clipped": clipped, "base_color": base}


# ---------------------------------------------------------------------------------------
# Geometry helpers.


class _Field:
    """Pixel grids of one capture: u, v (field coordinates, r = 1), rho, edge alpha."""

    def __init__(self, size: int, wide: bool, clipped: bool):
        self.h, self.w = image_shape(size, wide)
        self.cx, self.cy, self.r = field_circle(size, wide, clipped)
        self.u, self.v, self.rho, self.alpha = _grids(size, wide, clipped)

    def to_px(self, u, v):
        return self.cx + np.asarray(u) * self.r, self.cy + np.asarray(v) * self.r


@functools.lru_cache(maxsize=8)
def _grids(size: int, wide: bool, clipped: bool):
    h, w = image_shape(size, wide)
    cx, cy, r = field_circle(size, wide, clipped)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (x - cx) / r, (y - cy) / r
    rho = np.sqrt(u * u + v * v)
    alpha = np.clip(r * (1 - rho) + 0.5, 0, 1)  # 1-px anti-aliased field edge
    for a in (u, v, rho, alpha):
        a.flags.writeable = False
    return u, v, rho, alpha


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """float32 [H, W] smooth random field, ~unit std, `cells` features across the height."""
    h, w = shape
    grid = rng.standard_normal((cells, max(2, round(cells * w / h)))).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _fx(v: float) -> int:
    return int(round(v * _ONE))


def _disks(shape, centres, radii, values=None) -> np.ndarray:
    """float32 [H, W] in [0, 1]: filled anti-aliased disks (later ones overwrite)."""
    m = np.zeros(shape, np.uint8)
    values = np.full(len(radii), 1.0) if values is None else values
    for (x, y), rad, val in zip(centres, radii, values, strict=True):
        cv2.circle(m, (_fx(x), _fx(y)), max(_fx(rad), 1), int(255 * val), -1, _AA, _SHIFT)
    return m.astype(np.float32) / 255


def _blend(img: np.ndarray, alpha: np.ndarray, color) -> None:
    """In place: img = img * (1 - alpha) + alpha * color; alpha [H, W] in [0, 1]."""
    # Most masks cover a few lesions: blend only their bounding box (the slow part).
    x, y, w, h = cv2.boundingRect((alpha > 0).view(np.uint8))
    win = img[y:y + h, x:x + w]
    win += alpha[y:y + h, x:x + w, None] * (np.asarray(color, np.float32) - win)


def _blur(m: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(m, (0, 0), sigma) if sigma > 0.3 else m


def _window(f: _Field, x: float, y: float, half: float):
    """Slices of the box of half-size `half` px around (x, y), clipped to the image, and
    the float32 pixel offsets (dx [1, w], dy [h, 1]) of its columns and rows from (x, y).

    Local structures (disc, macula) are computed in their box only: it is much cheaper.
    """
    x0, x1 = max(0, int(x - half)), min(f.w, int(x + half) + 2)
    y0, y1 = max(0, int(y - half)), min(f.h, int(y + half) + 2)
    dx = np.arange(x0, x1, dtype=np.float32)[None] - np.float32(x)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(y)
    return (slice(y0, y1), slice(x0, x1)), dx, dy


# ---------------------------------------------------------------------------------------
# Anatomy.


def _anatomy(rng: np.random.Generator, f: _Field, eye: str) -> dict:
    """Disc and fovea centres (pixels) and disc radius; OD disc on the image right."""
    side = {"OD": 1.0, "OS": -1.0}[eye]
    disc_v = rng.uniform(-0.06, 0.06)
    disc = f.to_px(side * rng.uniform(0.40, 0.48), disc_v)
    fovea = f.to_px(-side * rng.uniform(0.28, 0.36), disc_v + rng.uniform(0.03, 0.10))
    return {"side": side, "disc": disc, "disc_r": f.r * rng.uniform(0.15, 0.18),
            "fovea": fovea}


def _background(rng, f: _Field, base, tessellated: bool, anat: dict) -> np.ndarray:
    """float32 [H, W, 3] albedo: base colour, mottling, optional tessellation, macula."""
    shape = (f.h, f.w)
    lum = 1 + 0.06 * _smooth_noise(rng, shape, 5) + 0.03 * _smooth_noise(rng, shape, 20)
    red = 1 + 0.05 * _smooth_noise(rng, shape, 4)  # patchy redness
    img = np.empty((f.h, f.w, 3), np.float32)
    img[..., 0] = base[0] * lum * red
    img[..., 1] = base[1] * lum
    img[..., 2] = base[2] * lum
    if tessellated:
        img *= _tessellation(rng, f, anat)
    sigma = 0.13 * f.r
    box, dx, dy = _window(f, *anat["fovea"], 4 * sigma)
    dark = rng.uniform(0.25, 0.4) * np.exp(-(dx * dx + dy * dy) / (2 * sigma**2))
    img[box] *= 1 - dark[..., None] * np.array([0.7, 1.0, 0.9], np.float32)
    return img


def _tessellation(rng, f: _Field, anat: dict) -> np.ndarray:
    """float32 [H, W, 3] multiplier: dark pigment between wavy choroidal vessels.

    The vessels are smooth random walks heading roughly away from the posterior pole.
    """
    pole = np.add(anat["fovea"], anat["disc"]) / 2
    n = rng.integers(45, 70)
    starts = np.stack(f.to_px(*rng.uniform(-1, 1, (2, n))), 1)
    m = np.zeros((f.h, f.w), np.uint8)
    step = 0.04 * f.r
    for (x, y), k in zip(starts, rng.integers(8, 20, n), strict=True):
        a = np.arctan2(y - pole[1], x - pole[0]) + rng.normal(0, 0.5)
        a = a + np.cumsum(rng.normal(0, 0.18, k))
        p = np.stack([x + step * np.cumsum(np.cos(a)), y + step * np.cumsum(np.sin(a))], 1)
        p = np.round((p + 0.5) * _ONE).astype(np.int32)
        cv2.polylines(m, [p], False, 255, max(1, round(f.r * rng.uniform(0.02, 0.045))),
                      _AA, _SHIFT)
    vessels = _blur(m.astype(np.float32) / 255, 0.012 * f.r)
    du, dv = f.u - (anat["fovea"][0] - f.cx) / f.r, f.v - (anat["fovea"][1] - f.cy) / f.r
    fade = np.clip((np.sqrt(du * du + dv * dv) - 0.12) / 0.25, 0, 1)  # spared fovea
    s = (rng.uniform(0.4, 0.55) * (1 - vessels) * fade)[..., None]
    return 1 - s * np.array([0.55, 0.75, 0.6], np.float32)


def _draw_disc(rng, img, f: _Field, anat: dict, cupping: bool) -> None:
    """Bright yellowish disc with a paler cup (cup/disc > 0.6 when `cupping`)."""
    rd = anat["disc_r"]
    box, dx, dy = _window(f, *anat["disc"], 1.3 * rd)
    win = img[box]
    a = np.clip((rd - np.sqrt(dx * dx + dy * dy)) / (0.25 * rd) + 0.5, 0, 1)
    _blend(win, a, (250, rng.uniform(195, 215), rng.uniform(120, 150)))
    rc = rd * (rng.uniform(0.65, 0.8) if cupping else rng.uniform(0.2, 0.4))
    dx = dx + anat["side"] * 0.08 * rd  # cups sit slightly temporal
    ac = np.clip((rc - np.sqrt(dx * dx + dy * dy)) / (0.2 * rc) + 0.5, 0, 1)
    _blend(win, ac * (0.95 if cupping else 0.5), (255, 245, 215))


def _grow_vessel(rng, f: _Field, start, angle, bend, length, width, depth, out) -> None:
    """Appends (points [N, 2] float, width px) polylines of a branching vessel to `out`.

    The vessel is a smooth random walk (turning by `bend` per step plus jitter) that stops
    at the field edge; every 5..11 steps it narrows and, while depth > 0, spawns a branch.
    """
    step = 0.025 * f.r
    n = max(2, int(length / step))
    angles = angle + np.cumsum(bend + rng.normal(0, 0.05, n))
    pts = np.empty((n + 1, 2))
    pts[0] = start
    pts[1:, 0] = start[0] + step * np.cumsum(np.cos(angles))
    pts[1:, 1] = start[1] + step * np.cumsum(np.sin(angles))
    outside = np.nonzero(np.hypot(pts[1:, 0] - f.cx, pts[1:, 1] - f.cy) > 1.02 * f.r)[0]
    end = int(outside[0]) + 1 if len(outside) else n  # last point index (first one outside)
    first = 0
    for k in np.cumsum(rng.integers(5, 12, 8)).tolist():  # k: point index of a branch
        if k >= end:
            break
        if depth > 0 and width > 0.9:
            s = rng.choice((-1.0, 1.0))
            _grow_vessel(rng, f, pts[k], angles[k - 1] + s * rng.uniform(0.4, 0.9),
                         0.3 * s * bend, (n - k) * step * rng.uniform(0.45, 0.8),
                         0.68 * width, depth - 1, out)
        out.append((pts[first:k + 1], width))
        first, width = k, 0.88 * width
    out.append((pts[first:end + 1], width))


def _vessel_trees(rng, f: _Field, anat: dict) -> dict[str, list]:
    """Artery and vein polylines: temporal arcades arching round the macula, nasal trunks."""
    trees = {}
    for kind, w in (("vein", 0.026), ("artery", 0.02)):
        out = []
        for up in (-1.0, 1.0):  # superior / inferior
            # (angle, bend per step, length), written for a disc right of the fovea.
            trunks = [(up * (np.pi / 2 + rng.uniform(0.2, 0.45)), up * 0.02, 1.5),
                      (up * rng.uniform(0.4, 0.8), 0.0, 0.9),
                      (up * (np.pi - rng.uniform(0.2, 0.5)), 0.0, 0.5)]
            for a, bend, length in trunks:
                if anat["side"] < 0:  # mirror for OS
                    a, bend = np.pi - a, -bend
                a += rng.normal(0, 0.08)
                width = w * f.r * (0.55 if length < 0.6 else 1.0)
                _grow_vessel(rng, f, anat["disc"], a, bend, length * f.r, width, 2, out)
        trees[kind] = out
    return trees


def _vessel_masks(f: _Field, trees: dict[str, list]) -> np.ndarray:
    """float32 [H, W, 2] in [0, 1] (artery, vein): drawn at 2x and area-downsampled, so
    widths come in half pixels."""
    planes = []
    for kind in ("artery", "vein"):  # separate planes: a crossing must not erase the other
        m = np.zeros((2 * f.h, 2 * f.w), np.uint8)
        for pts, width in trees[kind]:
            p = np.round((2 * pts + 0.5) * _ONE).astype(np.int32)
            cv2.polylines(m, [p], False, 255, max(1, round(2 * width)), _AA, _SHIFT)
        planes.append(m)
    m = cv2.resize(cv2.merge(planes), (f.w, f.h), interpolation=cv2.INTER_AREA)
    return m.astype(np.float32) / 255


def _draw_vessels(img, f: _Field, base, trees) -> None:
    masks = _vessel_masks(f, trees)
    for i, gain, opacity in ((0, (0.75, 0.45, 0.55), 0.85), (1, (0.55, 0.28, 0.45), 0.92)):
        color = np.asarray(base, np.float32) * np.asarray(gain, np.float32)
        _blend(img, opacity * masks[..., i], color)


# ---------------------------------------------------------------------------------------
# Lesions (DR) and diseases.


def _place(rng, f: _Field, anat: dict, n: int, extent: float, quadrant: int | None = None,
           max_rho: float = 0.88, near=None) -> np.ndarray:
    """[n, 2] pixel centres in the visible field, clear of the disc by `extent` (px).

    With `quadrant`, every centre sits inside that image quadrant with room for `extent`
    plus a blur margin. With `near` = (x, y, radius), centres lie within that disk.
    """
    if n == 0:
        return np.zeros((0, 2))
    margin = extent + 3 + 0.02 * f.r
    x0, x1, y0, y1 = margin, f.w - 1 - margin, margin, f.h - 1 - margin
    if quadrant is not None:
        if quadrant not in (0, 1, 2, 3):
            raise ValueError(f"quadrant must be 0..3, got {quadrant}")
        xm, ym = f.w / 2, f.h / 2  # columns < w/2 are the left half
        x0, x1 = (x0, xm - 0.5 - margin) if quadrant in (0, 2) else (xm - 0.5 + margin, x1)
        y0, y1 = (y0, ym - 0.5 - margin) if quadrant in (0, 1) else (ym - 0.5 + margin, y1)
    if near is not None:
        x0, x1 = max(x0, near[0] - near[2]), min(x1, near[0] + near[2])
        y0, y1 = max(y0, near[1] - near[2]), min(y1, near[1] + near[2])
    found = []
    for _ in range(200):
        if x1 <= x0 or y1 <= y0:
            break
        c = rng.uniform((x0, y0), (x1, y1), (4 * n + 16, 2))
        ok = np.hypot(c[:, 0] - f.cx, c[:, 1] - f.cy) + extent <= max_rho * f.r
        ok &= np.hypot(c[:, 0] - anat["disc"][0], c[:, 1] - anat["disc"][1]) > (
            anat["disc_r"] + extent + 2)
        if near is not None:
            ok &= np.hypot(c[:, 0] - near[0], c[:, 1] - near[1]) <= near[2]
        found.extend(c[ok])
        if len(found) >= n:
            return np.array(found[:n])
    raise ValueError(f"no room for {n} lesions of extent {extent:.1f} px (quadrant {quadrant})")


def _spread_quadrants(rng, f, anat, n, extent, quadrant):
    """Centres spread over all four quadrants (ICDR severe NPDR) unless one is forced."""
    if quadrant is not None or n < 4:
        return _place(rng, f, anat, n, extent, quadrant)
    per = np.full(4, n // 4) + (np.arange(4) < n % 4)
    return np.concatenate([_place(rng, f, anat, int(k), extent, q) for q, k in enumerate(per)])


def _draw_microaneurysms(rng, img, f, anat, n, quadrant) -> None:
    radii = f.r * rng.uniform(0.0125, 0.018, n)
    centres = _place(rng, f, anat, n, radii.max(initial=0), quadrant)
    _blend(img, _disks((f.h, f.w), centres, radii, rng.uniform(0.85, 1.0, n)), (115, 12, 14))


def _draw_haemorrhages(rng, img, f, anat, n, quadrant) -> None:
    """Dark-red blots: a main ellipse plus a satellite, soft edged."""
    radii = f.r * rng.uniform(0.03, 0.06, n)
    centres = _spread_quadrants(rng, f, anat, n, 1.5 * radii.max(initial=0), quadrant)
    m = np.zeros((f.h, f.w), np.uint8)
    for (x, y), a in zip(centres, radii, strict=True):
        val = int(rng.uniform(200, 255))
        ang = rng.uniform(0, 180)
        cv2.ellipse(m, (_fx(x), _fx(y)), (_fx(a), _fx(a * rng.uniform(0.55, 1.0))), ang, 0, 360,
                    val, -1, _AA, _SHIFT)
        ox, oy = rng.uniform(-0.6, 0.6, 2) * a
        cv2.circle(m, (_fx(x + ox), _fx(y + oy)), _fx(0.6 * a), val, -1, _AA, _SHIFT)
    _blend(img, _blur(m.astype(np.float32) / 255, 0.006 * f.r), (100, 10, 12))


def _draw_exudates(rng, img, f, anat, n, quadrant) -> None:
    """Bright yellow clusters of small waxy dots (one cluster = one counted lesion)."""
    spread = f.r * rng.uniform(0.03, 0.06, n)
    centres = _place(rng, f, anat, n, spread.max(initial=0) + 0.016 * f.r, quadrant)
    dots, radii = [], []
    for (x, y), s in zip(centres, spread, strict=True):
        k = rng.integers(5, 13)
        ang, dist = rng.uniform(0, 2 * np.pi, k), s * np.sqrt(rng.random(k))
        dots.extend(np.stack([x + dist * np.cos(ang), y + dist * np.sin(ang)], 1))
        radii.extend(f.r * rng.uniform(0.009, 0.016, k))
    _blend(img, 0.95 * _disks((f.h, f.w), dots, radii), (255, 238, 120))


def _draw_neovascular(rng, img, f, anat, n, quadrant, trees) -> None:
    """Tufts: a pale fibrous patch covered by a tangle of fine bright-red loops."""
    extent = 0.1 * f.r
    # Near the disc, or on a main vessel: candidate anchors within the allowed region.
    polylines = trees["vein"] + trees["artery"]
    main = [p for p, w in polylines if w > 0.012 * f.r]  # trunks and first branches
    ring = rng.uniform(0, 2 * np.pi, 16)
    disc_ring = np.add(anat["disc"], 1.6 * anat["disc_r"] * np.stack(
        [np.cos(ring), np.sin(ring)], 1))
    anchors = np.concatenate([*main, disc_ring])
    centres = []
    for _ in range(n):
        anchor = anchors[rng.integers(len(anchors))]
        near = (*anchor, 0.15 * f.r)
        try:
            centres.append(_place(rng, f, anat, 1, extent, quadrant, near=near)[0])
        except ValueError:  # anchor outside the quadrant: anywhere in it
            centres.append(_place(rng, f, anat, 1, extent, quadrant)[0])
    membrane = np.zeros((f.h, f.w), np.uint8)
    loops = np.zeros((2 * f.h, 2 * f.w), np.uint8)
    for x, y in centres:
        cv2.circle(membrane, (_fx(x), _fx(y)), _fx(0.8 * extent), 255, -1, _AA, _SHIFT)
        for _ in range(rng.integers(10, 16)):
            k = 9
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = f.r * rng.uniform(0.012, 0.035) * rng.uniform(0.5, 1.3, k)
            lx, ly = np.array([x, y]) + rng.uniform(-0.6, 0.6, 2) * extent
            p = np.stack([lx + rad * np.cos(ang), ly + rad * np.sin(ang)], 1)
            p = np.round((2 * p + 0.5) * _ONE).astype(np.int32)
            cv2.polylines(loops, [p], True, 255, max(1, round(0.016 * f.r)), _AA, _SHIFT)
    _blend(img, 0.45 * _blur(membrane.astype(np.float32) / 255, 0.01 * f.r), (240, 190, 160))
    lm = cv2.resize(loops, (f.w, f.h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    _blend(img, np.minimum(1.0, 1.3 * lm), (225, 20, 40))


def _draw_drusen(rng, img, f, anat) -> None:
    """Soft pale-yellow dots scattered around the fovea."""
    k = rng.integers(12, 30)
    ang, dist = rng.uniform(0, 2 * np.pi, k), f.r * rng.uniform(0.05, 0.28, k)
    fx, fy = anat["fovea"]
    centres = np.stack([fx + dist * np.cos(ang), fy + dist * np.sin(ang)], 1)
    radii = f.r * rng.uniform(0.01, 0.02, k)
    m = _blur(_disks((f.h, f.w), centres, radii, rng.uniform(0.6, 0.9, k)), 0.006 * f.r)
    _blend(img, m, (245, 215, 130))


def _draw_laser_scars(rng, img, f, anat) -> None:
    """Grid of pigmented spots with pale atrophic rims in the mid-periphery."""
    step = rng.uniform(0.1, 0.13)
    g = np.arange(-1, 1 + step, step)
    gu, gv = [a.ravel() for a in np.meshgrid(g, g)]
    t = rng.uniform(0, np.pi / 2)
    u = gu * np.cos(t) - gv * np.sin(t) + rng.normal(0, 0.008, gu.size)
    v = gu * np.sin(t) + gv * np.cos(t) + rng.normal(0, 0.008, gu.size)
    x, y = f.to_px(u, v)
    rho = np.hypot(u, v)
    clear = np.hypot(x - anat["disc"][0], y - anat["disc"][1]) > 1.6 * anat["disc_r"]
    keep = (rho > 0.5) & (rho < 0.9) & clear
    centres = np.stack([x[keep], y[keep]], 1)
    radii = f.r * rng.uniform(0.025, 0.033, keep.sum())
    _blend(img, 0.9 * _disks((f.h, f.w), centres, radii), (225, 195, 145))
    _blend(img, 0.9 * _disks((f.h, f.w), centres, 0.6 * radii), (55, 32, 22))


def _draw_macular_hole(rng, img, f, anat) -> None:
    """Dark round spot with a bright rim, centred on the fovea."""
    rh = f.r * rng.uniform(0.045, 0.055)
    c = [anat["fovea"]]
    _blend(img, 0.9 * _blur(_disks((f.h, f.w), c, [rh]), 0.004 * f.r), (250, 215, 150))
    _blend(img, 0.95 * _disks((f.h, f.w), c, [0.72 * rh]), (85, 22, 16))


# ---------------------------------------------------------------------------------------
# Rendering.


def render_fundus(rng: np.random.Generator, size: int, *, wide: bool = False, eye: str = "OD",
                  lesions: dict | None = None, diseases: dict | None = None,
                  brightness: float = 1.0, clipped: bool = False,
                  base_color: tuple[float, float, float] | None = None) -> np.ndarray:
    """Renders one synthetic fundus photograph.

    Args:
      rng: randomness. The anatomy, vessels, diseases, each lesion type and the noise use
        separate streams spawned from it, so adding lesions changes only their pixels.
      size: image height S (>= 64 sensible); width is S, or 3S//2 when `wide`.
      wide, clipped: capture geometry (`field_circle`).
      eye: "OD" (disc on the image right) or "OS".
      lesions: counts {"microaneurysms", "haemorrhages", "exudates" (clusters),
        "neovascular" (tufts)}, missing = 0, plus optional "quadrant" (0..3 = top-left,
        top-right, bottom-left, bottom-right): every lesion then lies in that quadrant.
      diseases: {name in DISEASES: bool}, missing = False.
      brightness: global exposure factor (1 = normal, ~0.4 = under-exposed).
      base_color: fundus albedo RGB (0..255); sampled when None.
    Returns:
      uint8 RGB [S, W, 3]; near 0 outside the field circle.
    """
    lesions, diseases = dict(lesions or {}), dict(diseases or {})
    quadrant = lesions.pop("quadrant", None)
    if eye not in ("OD", "OS"):
        raise ValueError(f"eye must be 'OD' or 'OS', got {eye!r}")
    for name, known in ((lesions, LESIONS), (diseases, DISEASES)):
        if set(name) - set(known):
            raise ValueError(f"unknown keys {sorted(set(name) - set(known))}; known: {known}")
    r_anat, r_bg, r_vessel, r_disease, r_noise, r_lesion = rng.spawn(6)
    f = _Field(size, wide, clipped)
    anat = _anatomy(r_anat, f, eye)
    if base_color is None:
        base_color = (r_anat.uniform(190, 235), r_anat.uniform(75, 115), r_anat.uniform(25, 55))
    img = _background(r_bg, f, base_color, diseases.get("tessellation", False), anat)
    d_rngs = r_disease.spawn(len(DISEASES))
    if diseases.get("drusen"):
        _draw_drusen(d_rngs[0], img, f, anat)
    if diseases.get("laser_scars"):
        _draw_laser_scars(d_rngs[4], img, f, anat)
    _draw_disc(d_rngs[2], img, f, anat, diseases.get("cupping", False))
    trees = _vessel_trees(r_vessel, f, anat)
    _draw_vessels(img, f, base_color, trees)
    _draw_lesions(r_lesion, img, f, anat, trees, lesions, quadrant)
    if diseases.get("macular_hole"):
        _draw_macular_hole(d_rngs[3], img, f, anat)
    return _expose(r_noise, img, f, brightness)


def _draw_lesions(rng, img, f, anat, trees, counts: dict, quadrant) -> None:
    ma, hem, ex, nv = rng.spawn(4)
    _draw_exudates(ex, img, f, anat, counts.get("exudates", 0), quadrant)
    _draw_haemorrhages(hem, img, f, anat, counts.get("haemorrhages", 0), quadrant)
    _draw_microaneurysms(ma, img, f, anat, counts.get("microaneurysms", 0), quadrant)
    if counts.get("neovascular", 0):
        _draw_neovascular(nv, img, f, anat, counts["neovascular"], quadrant, trees)


def _expose(rng, img, f: _Field, brightness: float) -> np.ndarray:
    """Vignetting, exposure, field mask, optics blur and sensor noise -> uint8."""
    vignette = rng.uniform(0.25, 0.45)
    gu, gv = rng.uniform(-0.08, 0.08, 2)  # uneven illumination
    illum = brightness * (1 - vignette * f.rho**2) * (1 + gu * f.u + gv * f.v) * f.alpha
    img *= illum[..., None]
    img = _blur(img, 0.0045 * f.r)
    # Uniform noise from random bytes: ~10x cheaper than Gaussian, looks the same here.
    # Its std is sigma; the surround gets a quarter of it (dark current).
    sigma = rng.uniform(1.5, 3.5)
    noise = rng.integers(0, 256, img.shape, dtype=np.uint8).astype(np.float32)
    noise -= 127.5
    noise *= ((0.25 + 0.75 * f.alpha) * (sigma / 73.9))[..., None]
    img += noise
    img += 0.5  # round, not truncate, in astype below
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Dataset.


def encode_jpeg(img: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """uint8 RGB [H, W, 3] -> JPEG bytes (deterministic for equal pixels)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def make_example(index: int, image_size: int, seed: int) -> tuple[np.ndarray, dict]:
    """Image `index` of the dataset `seed`: (uint8 RGB image, CSV row without `image`).

    Images 2p and 2p+1 are the OD and OS eyes of patient p.
    """
    patient = index // 2
    eye = ("OD", "OS")[index % 2]
    traits = sample_patient(np.random.default_rng([seed, patient, 0]))
    rng = np.random.default_rng([seed, patient, 1 + index % 2])
    spec = sample_image_spec(rng)
    img = render_fundus(rng, image_size, wide=traits["wide"], clipped=traits["clipped"],
                        eye=eye, lesions=spec["lesions"], diseases=spec["diseases"],
                        brightness=spec["brightness"], base_color=traits["base_color"])
    row = {"patient_id": f"P{patient:05d}", "eye": eye, "dr_grade": spec["dr_grade"],
           "referable": int(spec["dr_grade"] >= 2),
           **{k: int(v) for k, v in spec["diseases"].items()},
           "width": img.shape[1], "height": img.shape[0]}
    return img, row


def generate(out_dir, num_images: int, image_size: int, seed: int) -> pd.DataFrame:
    """Writes `out_dir/images/*.jpg` and `out_dir/labels.csv`; returns the label table.

    Rows 2p and 2p+1 are patient p's OD and OS eyes (an odd `num_images` leaves the last
    patient with one eye). Columns: `CSV_COLUMNS`; `image` is relative to `out_dir`.
    """
    out = pathlib.Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_images):
        img, row = make_example(i, image_size, seed)
        name = f"images/{i:06d}.jpg"
        (out / name).write_bytes(encode_jpeg(img))
        rows.append({"image": name, **row})
    df = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    df.to_csv(out / "labels.csv", index=False)
    return df


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("out_dir", None, "Output directory (images/ and labels.csv).")
    flags.DEFINE_integer("num_images", 800, "Number of images (two per patient).")
    flags.DEFINE_integer("image_size", 256, "Image height in pixels.")
    flags.DEFINE_integer("seed", 0, "Dataset seed; same seed, same bytes.")
    flags.DEFINE_string("layout", "demo", "demo (images/ + labels.csv) or a public source's "
                        "layout: eyepacs, rfmid, odir, idrid, kermany (synthetic_layouts.py).")
    flags.mark_flag_as_required("out_dir")


def main(argv) -> None:
    del argv
    if FLAGS.layout != "demo":
        from input_pipeline import synthetic_layouts

        layout = synthetic_layouts.write_layout(FLAGS.layout, FLAGS.out_dir, FLAGS.num_images,
                                                FLAGS.image_size, FLAGS.seed)
        print(f"wrote a {FLAGS.layout} layout of {FLAGS.num_images} images; prepare with "
              + " ".join(layout.prepare_flags()))
        return
    df = generate(FLAGS.out_dir, FLAGS.num_images, FLAGS.image_size, FLAGS.seed)
    grades = df["dr_grade"].value_counts().sort_index().to_dict()
    print(f"wrote {len(df)} images to {FLAGS.out_dir}; dr_grade counts {grades}; "
          f"disease positives {df[list(DISEASES)].sum().to_dict()}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
