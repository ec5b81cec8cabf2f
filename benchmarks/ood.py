"""How well the out-of-distribution flag (pneumonia.ood) separates chest X-rays from what is not one.

    python -m benchmarks.ood --model KEPT/default-42.keras --tfrecords KEPT/default/data/tfrecords
    python -m benchmarks.ood --smoke --tfrecords DIR   # an untrained model on DIR's images: checks that it runs

The model and its TFRecords are a run kept by `python -m benchmarks.external_validity --keep-models KEPT` (the
default trained on the shared sample). The reference is fitted as the evaluate stage fits it (training split,
threshold on validation: evaluate.ood_flagged). In-distribution: the external set (Kaggle's official test
split, another acquisition: what must mostly *not* be flagged); the pipeline's own test split is read by the
evaluate stage only, which reports its share (reports/evaluation/test.json, ood_flagged_share). Not frontal
chest X-rays: CT, MR, nuclear-medicine and ultrasound images of pydicom's test files saved as PNG, photographs
and natural images of scikit-image, documents (scikit-image's scanned page and text, and typeset pages), noise
images (blank ones are refused before any model sees them), and external X-rays rotated, inverted, cropped or
padded. Radiographs of other body parts and
lateral chest views are not here: no package ships any (docs/results.md says so).

Each method is scored per group: ROC AUC against the external set, and the share flagged at its threshold.
Also the flag's cost: `pneumonia predict`'s model images/s with and without it.
"""

import argparse
import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, quiet_tensorflow, write_report
from benchmarks.external_validity import EXTERNAL_ZIP
from benchmarks.run_all import machine

# pydicom's test files: slices of other modalities (the DICOM reader refuses them by modality; saved as PNG
# they carry no header, which is what this measures)
PYDICOM_IMAGES = ("CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "MR_small.dcm", "MR_small_RLE.dcm",
                  "examples_overlay.dcm", "image_dfl.dcm", "JPEG2000.dcm", "liver_1frame.dcm",
                  "examples_palette.dcm", "examples_jpeg2k.dcm", "examples_rgb_color.dcm", "examples_ybr_color.dcm")
# scikit-image's bundled images (no download): photographs, natural and microscopy images, and two documents
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket", "coins", "moon", "hubble_deep_field",
                  "immunohistochemistry", "horse", "clock", "grass", "gravel", "brick", "cell", "colorwheel", "logo",
                  "retina")
SKIMAGE_DOCUMENTS = ("page", "text")
TRANSFORMED = 40  # external X-rays per transformation


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def to_uint8(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    return ((array - array.min()) / max(np.ptp(array), 1e-9) * 255).astype(np.uint8)


def other_modalities() -> list[bytes]:
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    found = []
    for name in PYDICOM_IMAGES:
        dataset = pydicom.dcmread(folder / name)
        pixels = dataset.pixel_array
        if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
            pixels = pixels[0]
        found.append(png(to_uint8(pixels)))
    return found


def skimage_images(names: tuple[str, ...]) -> list[bytes]:
    import skimage.data

    found = []
    for name in names:
        image = getattr(skimage.data, name)()
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        found.append(png(image if image.dtype == np.uint8 else to_uint8(image)))
    return found


def typeset_pages(count: int, seed: int = 0) -> list[bytes]:
    from PIL import Image, ImageDraw

    rng, words = np.random.default_rng(seed), "the patient was seen in clinic today and reports no fever".split()
    pages = []
    for _ in range(count):
        page = Image.new("L", (850, 1100), 255)
        draw = ImageDraw.Draw(page)
        for line in range(40):
            draw.text((60, 60 + 25 * line), " ".join(rng.choice(words, rng.integers(4, 12))), fill=0)
        pages.append(png(np.asarray(page)))
    return pages


def noise(seed: int = 0) -> list[bytes]:
    """Noise of three kinds and a plain gradient. (Blank images never reach the model: every image path
    refuses them, pneumonia.data.images.check_not_blank.)"""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(4):
        images += [rng.integers(0, 256, (256, 256), dtype=np.uint8),
                   rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                   np.clip(rng.normal(128, 30, (256, 256)), 0, 255).astype(np.uint8)]
    images.append(np.tile(np.linspace(0, 255, 256).astype(np.uint8), (256, 1)))
    return [png(image) for image in images]


def transformed(inputs: np.ndarray) -> dict[str, np.ndarray]:
    """External X-rays (model inputs) made unlike one: each transformation on its own images."""
    from PIL import Image

    size = inputs.shape[1]
    half = size // 2

    def cropped(image):  # the middle half, enlarged: a zoomed-in part of the chest
        return np.asarray(Image.fromarray(image[size // 4:3 * size // 4, size // 4:3 * size // 4]).resize((size, size)))

    def padded(image):  # the X-ray at half size in a black frame
        frame = np.zeros_like(image)
        inner = slice(half // 2, half // 2 + half)
        frame[inner, inner] = np.asarray(Image.fromarray(image).resize((half, half)))
        return frame

    chunks = [inputs[k * TRANSFORMED:(k + 1) * TRANSFORMED] for k in range(5)]
    return {"rotated 90°": np.stack([np.rot90(image, 1 + 2 * (i % 2)) for i, image in enumerate(chunks[0])]),
            "rotated 180°": np.stack([np.rot90(image, 2) for image in chunks[1]]),
            "inverted": 255 - chunks[2],
            "cropped": np.stack([cropped(image) for image in chunks[3]]),
            "padded": np.stack([padded(image) for image in chunks[4]])}


def external_images(external: Path) -> list[bytes]:
    with zipfile.ZipFile(external) as archive:
        return [archive.read(name) for name in sorted(archive.namelist())
                if name.lower().endswith((".jpeg", ".jpg", ".png"))]


def as_files(images: list[bytes], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(images):
        (folder / f"{index:04d}.img").write_bytes(data)
    return sorted(folder.iterdir())


def penultimate_model(model):
    """The model's input to its output layer (the plainest baseline: Mahalanobis on the 64-unit layer)."""
    import keras

    return keras.Model(model.input, model.layers[-1].input)


def score_methods(model, tfrecords: Path, groups: dict[str, np.ndarray], flagged: float, batch_size: int = 64) -> dict:
    """Per method, per group: ROC AUC against "external" and the share flagged at the method's threshold."""
    from sklearn.metrics import roc_auc_score

    from pneumonia import ood
    from pneumonia.data.dataset import evaluation_batches

    features_model = ood.pooled_features_model(model)
    penultimate = penultimate_model(model)

    def inputs(images: np.ndarray) -> dict[str, np.ndarray]:
        pooled = np.concatenate([features_model.predict_on_batch(images[i:i + batch_size])[1]
                                 for i in range(0, len(images), batch_size)])
        last = np.concatenate([penultimate.predict_on_batch(images[i:i + batch_size])
                               for i in range(0, len(images), batch_size)])
        return {"layout": ood.layout(images), "pooled": pooled, "penultimate": last}

    def split(name: str, limit: int | None = None) -> np.ndarray:
        images = np.concatenate([batch.numpy() for batch, _ in evaluation_batches(tfrecords, name, batch_size)])
        return images[:limit].astype(np.uint8)

    train, val = inputs(split("train", ood.MAX_FITTED_IMAGES)), inputs(split("val"))
    scored = {name: inputs(images) for name, images in groups.items()}
    gaussians = {part: ood.Gaussian.fit(train[part]) for part in train}
    scales = {part: float(np.median(gaussians[part].distance(val[part]))) for part in train}

    def method(parts: tuple[str, ...]):
        def score(found: dict[str, np.ndarray]) -> np.ndarray:
            return sum((gaussians[part].distance(found[part]) / scales[part]) ** 2 for part in parts)
        return score

    methods = {"penultimate layer (the baseline)": ("penultimate",), "pooled features": ("pooled",),
               "layout thumbnail": ("layout",), "layout + pooled features (pneumonia.ood)": ("layout", "pooled")}
    report = {}
    for label, parts in methods.items():
        score = method(parts)
        threshold = float(np.quantile(score(val), 1 - flagged))
        external = score(scored["external"])
        rows = {"external": {"flagged": float(np.mean(external > threshold)), "images": len(external)}}
        for name in groups:
            if name == "external":
                continue
            found = score(scored[name])
            truth = np.r_[np.zeros(len(external)), np.ones(len(found))]
            rows[name] = {"roc_auc": float(roc_auc_score(truth, np.r_[external, found])),
                          "flagged": float(np.mean(found > threshold)), "images": len(found)}
        unlike = [row for name, row in rows.items() if name != "external"]
        rows["all not chest X-rays"] = {
            "flagged": sum(row["flagged"] * row["images"] for row in unlike) / sum(row["images"] for row in unlike),
            "images": sum(row["images"] for row in unlike)}
        report[label] = {"validation_flagged": float(np.mean(score(val) > threshold)), "groups": rows}
    return report


def prediction_cost(model, images: np.ndarray, files: list[Path], reference, repeats: int = 5) -> dict:
    """Images/s with and without the OOD score: of `pneumonia predict` (inference.predict_files on image files:
    decoding, resizing, the model) and of the model alone on decoded inputs. The two alternated, the fastest
    of `repeats` rounds each, so that other load on the machine hits both alike."""
    from pneumonia.classifier import Classifier
    from pneumonia.engines import KerasEngine
    from pneumonia.inference import predict_files

    classifiers = {"without": Classifier(KerasEngine(model), 0.5, 95),
                   "with": Classifier(KerasEngine(model), 0.5, 95, ood=reference)}
    ways = {"predict": (lambda classifier: predict_files(classifier, files), len(files)),
            "model": (lambda classifier: classifier.predict(list(images)), len(images))}
    for classifier in classifiers.values():
        classifier.predict(list(images[:32]))  # warm-up: tracing
    cost = {}
    for way, (call, count) in ways.items():
        seconds = {label: [] for label in classifiers}
        for _ in range(repeats):
            for label, classifier in classifiers.items():
                started = time.perf_counter()
                call(classifier)
                seconds[label].append(time.perf_counter() - started)
        rates = {label: count / min(times) for label, times in seconds.items()}
        cost[way] = {**rates, "cost": 1 - rates["with"] / rates["without"]}
    return cost


def markdown(report: dict) -> str:
    methods = report["methods"]
    groups = list(next(iter(methods.values()))["groups"])
    lines = [f"Out-of-distribution flag, {report['model']}: ROC AUC against the external set / share flagged at the "
             f"threshold (validation share {report['flagged']:.0%}). External: the share flagged (must be low).", "",
             "| method | " + " | ".join(f"{name} ({methods[next(iter(methods))]['groups'][name]['images']})"
                                       for name in groups) + " |",
             "|---|" + "---|" * len(groups)]
    for label, result in methods.items():
        cells = []
        for name in groups:
            row = result["groups"][name]
            cells.append(f"{row['flagged']:.1%}" if "roc_auc" not in row else
                         f"{row['roc_auc']:.3f} / {row['flagged']:.0%}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    predict, alone = report["cost"]["predict"], report["cost"]["model"]
    lines += ["", f"Cost: `pneumonia predict` (the external set's files: decoding, resizing, the model) "
              f"{predict['without']:.0f} images/s without the score, {predict['with']:.0f} with it "
              f"({predict['cost']:.1%} fewer); the model alone on decoded inputs {alone['without']:.0f} and "
              f"{alone['with']:.0f} ({alone['cost']:.1%} fewer).", "",
              f"Reproduce: `{report['command']}`. Measured {report['date']} on {report['machine']['cpu']} "
              f"({report['machine']['cores']} cores, load average {report['load_average']:.1f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a kept model (.keras)")
    parser.add_argument("--tfrecords", type=Path, help="its run's data/tfrecords (train and val are read)")
    parser.add_argument("--external", type=Path, default=EXTERNAL_ZIP)
    parser.add_argument("--flagged", type=float, default=0.01,
                        help="share of validation flagged (evaluate.ood_flagged)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--smoke", action="store_true", help="an untrained model for --tfrecords' image size, 60 "
                                                               "external images, one timing: checks that it runs")
    args = parser.parse_args()
    quiet_tensorflow()
    from datetime import UTC, datetime

    from pneumonia import ood
    from pneumonia.classifier import model_input
    from pneumonia.models.build import load_model

    if args.smoke:
        from pneumonia.config import ModelConfig
        from pneumonia.data.tfrecords import read_meta
        from pneumonia.models.build import build_model

        model = build_model(ModelConfig(crop=0), read_meta(args.tfrecords)["image_size"])
    else:
        model = load_model(args.model)
    size = int(model.input_shape[1])

    def decoded(files: list[bytes]) -> np.ndarray:
        return np.stack([model_input(data, size, 95) for data in files])

    external_files = external_images(args.external)[:(60 if args.smoke else None)]
    external = decoded(external_files)
    groups = {"external": external,
              "CT, MR, NM, US slices": decoded(other_modalities()),
              "photographs, natural images": decoded(skimage_images(SKIMAGE_PHOTOS)),
              "documents": decoded(skimage_images(SKIMAGE_DOCUMENTS) + typeset_pages(4)),
              "noise": decoded(noise()),
              # each transformation on images of its own: the external set, repeated when it has too few
              **transformed(np.concatenate([external] * -(-5 * TRANSFORMED // len(external))))}
    report = {"model": "an untrained model (smoke)" if args.smoke else args.model.name, "flagged": args.flagged,
              "methods": score_methods(model, args.tfrecords, groups, args.flagged)}
    features = ood.pooled_features_model(model)
    _, *train, detail = ood.split_outputs(features, args.tfrecords, "train", 64, ood.MAX_FITTED_IMAGES)
    reference = ood.fit(tuple(train), ood.split_inputs(features, args.tfrecords, "val", 64), args.flagged, detail)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ood-benchmark-") as scratch:
        report["cost"] = prediction_cost(model, np.concatenate([external] * (1 if args.smoke else 2))[:256],
                                         as_files(external_files, Path(scratch)), reference,
                                         repeats=1 if args.smoke else 5)
    report |= {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine(),
               "load_average": os.getloadavg()[0],
               "command": "python -m benchmarks.ood" + (" --smoke" if args.smoke else
                                                         f" --model {args.model} --tfrecords {args.tfrecords}")}
    name = "ood-smoke" if args.smoke else "ood"
    write_report(args.out, name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
