"""Speed of prepare's per-image work (`preprocessing.process_image`, TF) on one core.

    python -m benchmarks.prepare_speed [--num_files=200] [--image_size=512]

Data: the 3504x2336 HRF photographs shipped in the source distribution of the
PyPI package retinalysis-fundusprep 1.1.0, fetched with pip into bench_data/
(git-ignored) and replicated to --num_files files. Full-resolution decode and
reduced-scale (libjpeg DCT 1/2, 1/4, 1/8) decode are timed side by side in the
same run, interleaved in rounds so that load from other processes on a shared
machine hits both alike. Images/s is reported by wall clock and by the
process's CPU time (the per-core rate when the machine is shared).

When ../shared/data/mexico_fundus is present, it also reports the share of
those 1548 photographs in which `find_fundus` finds the field, and how many are
gradable.
"""

import pathlib
import shutil
import subprocess
import sys
import tarfile
import time

import cv2
import numpy as np
import pandas as pd
import tensorflow as tf
from absl import app, flags
from PIL import Image

from input_pipeline import image_decode
from input_pipeline import preprocessing as pp

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_files", 200, "Photographs timed per decode mode (replicas).")
flags.DEFINE_integer("image_size", 512, "process_image output size.")
flags.DEFINE_integer("rounds", 4, "Alternations between the two decode modes.")
flags.DEFINE_string("bench_dir", "bench_data", "Download / replica folder (git-ignored).")
flags.DEFINE_string("mexico_dir", "../shared/data/mexico_fundus",
                    "Mexican fundus set (labels.csv, images/); skipped when absent.")
flags.DEFINE_string("crop_out", "", "Optional PNG path: an HRF photograph and the darkest "
                    "Mexican image, each beside its fundus crop.")

PACKAGE = "retinalysis-fundusprep==1.1.0"
SDIST = "retinalysis_fundusprep-1.1.0.tar.gz"
MIN_PIXELS = 4_000_000  # the HRF photographs; the other samples are <= 2 MP


def fetch_sdist(bench_dir: pathlib.Path) -> pathlib.Path:
    """Downloads the package's source tarball once with pip; exits with advice on failure."""
    tarball = bench_dir / SDIST
    if tarball.is_file():
        return tarball
    bench_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           PACKAGE, "-d", str(bench_dir)]
    print("fetching the HRF sample photographs:", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not tarball.is_file():
        sys.exit(f"Could not download {PACKAGE} (network or PyPI unavailable?).\n"
                 f"{result.stderr[-2000:]}\nDownload {SDIST} by hand into {bench_dir}/ "
                 "and run the benchmark again.")
    return tarball


def find_photographs(tarball: pathlib.Path) -> list[pathlib.Path]:
    """Extracts the tarball next to it; returns its JPEG/PNG/TIFF images >= MIN_PIXELS."""
    root = tarball.parent / SDIST.removesuffix(".tar.gz")
    if not root.is_dir():
        with tarfile.open(tarball) as tar:
            tar.extractall(tarball.parent, filter="data")
    photos = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".tif", ".tiff"):
            continue
        with Image.open(path) as im:
            if im.width * im.height >= MIN_PIXELS:
                photos.append(path)
    if not photos:
        sys.exit(f"No photographs of >= {MIN_PIXELS / 1e6:g} MP found under {root}")
    return photos


def replicate(photos: list[pathlib.Path], out_dir: pathlib.Path, n: int) -> list[str]:
    """Copies the photographs round-robin to n files (each file is read from disk anew)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        src = photos[i % len(photos)]
        dst = out_dir / f"{i:04d}{src.suffix.lower()}"
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dst)
        files.append(str(dst))
    return files


def time_files(files: list[str], config: pp.PreprocessConfig) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of process_image over files."""
    wall, cpu = time.perf_counter(), time.process_time()
    for path in files:
        pp.process_image(path, config)
    return time.perf_counter() - wall, time.process_time() - cpu


def speed_table(files: list[str], image_size: int, rounds: int) -> pd.DataFrame:
    """Full vs reduced decode, interleaved in `rounds` chunks of the file list."""
    modes = {"full decode": False, "reduced decode": True}
    totals = {name: np.zeros(2) for name in modes}
    configs = {name: pp.PreprocessConfig(image_size=image_size, reduced_decode=reduced)
               for name, reduced in modes.items()}
    for name in modes:  # warm-up: page cache, OpenCV's lazy initialisation
        time_files(files[:2], configs[name])
    for chunk in np.array_split(np.array(files), rounds):
        for name in modes:
            totals[name] += time_files(list(chunk), configs[name])
    _, info = pp.process_image(files[0], configs["reduced decode"])
    rows = []
    for name in modes:
        wall, cpu = totals[name]
        rows.append({"decode": name, "images": len(files), "wall_s": wall,
                     "img/s (wall)": len(files) / wall, "img/s (CPU)": len(files) / cpu})
    table = pd.DataFrame(rows).set_index("decode")
    table["speed-up (CPU)"] = table["img/s (CPU)"] / table.loc["full decode", "img/s (CPU)"]
    table.attrs["decode_scale"] = info["decode_scale"]
    return table


def mexico_success(mexico_dir: pathlib.Path) -> list[pathlib.Path]:
    """Prints the share of the Mexican photographs where find_fundus finds a field (and
    that are gradable); returns the darkest one's path (or [] when the set is absent)."""
    labels = mexico_dir / "labels.csv"
    if not labels.is_file():
        print(f"\n{mexico_dir} absent: find_fundus success rate skipped")
        return []
    paths = [mexico_dir / p for p in pd.read_csv(labels)["image"]]
    process = pp.process_fn(pp.PreprocessConfig(image_size=FLAGS.image_size))
    failed, ungradable, seconds, darkest = [], 0, 0.0, (256.0, paths[0])
    for path in paths:
        data = tf.constant(path.read_bytes())
        t0 = time.perf_counter()
        out = process(data)
        seconds += time.perf_counter() - t0
        if not out["field_found"]:
            failed.append(path.name)
        ungradable += not bool(out["gradable"])
        darkest = min(darkest, (float(out["mean_brightness"]), path))
    found = len(paths) - len(failed)
    print(f"\nfind_fundus on {mexico_dir}: {found}/{len(paths)} = {found / len(paths):.1%} "
          f"found, {len(paths) - ungradable} gradable, {1e3 * seconds / len(paths):.1f} ms/image "
          f"(wall, whole process); failed: {failed[:10]}")
    return [darkest[1]]


def save_crop_examples(paths: list[pathlib.Path], out: str, height: int = 384) -> None:
    """Writes one row per image: [original with the found circle | fundus crop], as PNG
    (brightness stretched per image for viewing)."""
    rows = []
    for path in paths:
        img = image_decode.decode(tf.constant(path.read_bytes()), height)["image"]
        circle, _ = pp.find_fundus(img)
        crop = pp.resize(pp.crop_fundus(img, circle), height).numpy()
        img, (cx, cy, r) = img.numpy(), circle.numpy()
        # For viewing only: stretch dark captures so that the 99th percentile is white.
        stretch = 255 / max(np.percentile(img, 99), 1)
        img = cv2.convertScaleAbs(img, alpha=stretch)
        crop = cv2.convertScaleAbs(crop, alpha=stretch)
        cv2.circle(img, (round(cx), round(cy)), round(r), (0, 255, 0), max(1, img.shape[0] // 150))
        shown = cv2.resize(img, (round(img.shape[1] * height / img.shape[0]), height),
                           interpolation=cv2.INTER_AREA)
        rows.append(np.concatenate([shown, crop], 1))
        print(f"crop example {path.name}: circle {(round(cx, 1), round(cy, 1), round(r, 1))} "
              f"in a {img.shape[1]}x{img.shape[0]} decode")
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    cv2.imwrite(out, cv2.cvtColor(np.concatenate(rows, 0), cv2.COLOR_RGB2BGR))
    print(f"crop examples written to {out}")


def main(argv) -> None:
    del argv
    # One core: CPU time per image is the per-core rate whatever else runs.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    bench_dir = pathlib.Path(FLAGS.bench_dir)
    photos = find_photographs(fetch_sdist(bench_dir))
    sizes = sorted({Image.open(p).size for p in photos})
    files = replicate(photos, bench_dir / "replicas", FLAGS.num_files)
    print(f"{len(photos)} photographs {sizes} -> {len(files)} files; process_image at "
          f"{FLAGS.image_size} px (crop=fundus), one process, TF intra/inter-op threads 1")
    table = speed_table(files, FLAGS.image_size, FLAGS.rounds)
    with pd.option_context("display.float_format", "{:.2f}".format, "display.width", 120):
        print(table)
    print(f"reduced decode uses DCT scale 1/{table.attrs['decode_scale']}; "
          f"target >= 30 img/s per core: "
          f"{'met' if table.loc['reduced decode', 'img/s (CPU)'] >= 30 else 'NOT met'}")
    examples = photos[:1] + mexico_success(pathlib.Path(FLAGS.mexico_dir))
    if FLAGS.crop_out:
        save_crop_examples(examples, FLAGS.crop_out)


if __name__ == "__main__":
    app.run(main)
