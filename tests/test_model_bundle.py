"""A model that travels whole and knows its limits (issue 37): the settings the evaluate stage writes beside
the model are what predict, adapt and the MLflow model read; images outside the intended use by their headers
(DICOM attributes, size) are flagged with their reason and no patient value; every prediction carries its
out-of-distribution score."""

import base64
import io
import json
import shutil
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from bundles import smooth_images, write_settings
from dicoms import SECRETS, dataset, file_bytes, png_bytes, sample_xrays
from pneumonia import cli, engines, ood, paths, serving
from pneumonia.classifier import load_classifier
from pneumonia.config import ModelConfig
from pneumonia.model_settings import model_file, onnx_digest, ood_file, read_settings, settings_file
from pneumonia.models.build import build_model

# Header attributes outside the intended use, and the reason each must give (never the value itself)
OUTSIDE = {
    "lateral": ({"ViewPosition": "LL"}, "not a frontal view"),
    "leg": ({"BodyPartExamined": "LEG"}, "body part examined is not the chest"),
    "adult": ({"PatientAge": "034Y"}, "patient age outside 0-5 years"),
}
WITHIN = {"BodyPartExamined": "CHEST", "ViewPosition": "PA", "PatientAge": "003Y"}


@pytest.fixture
def bundle(tmp_path) -> Path:
    """repo/models/: a 32 px model (untrained) with its settings and out-of-distribution reference."""
    folder = tmp_path / "repo" / "models"
    folder.mkdir(parents=True)
    model = build_model(ModelConfig(crop=0), 32)
    model.save(folder / "model.keras")
    write_settings(folder / "model.keras", threshold=0.5, jpeg_quality=90, model=model)
    return folder


@pytest.fixture
def xrays(tmp_path) -> list[Path]:
    folder = tmp_path / "xrays"
    folder.mkdir()
    for name, grey in sample_xrays(4, width=96):
        (folder / f"{name}.png").write_bytes(png_bytes(grey))
    return sorted(folder.iterdir())


def test_the_bundle_files_are_where_the_pipeline_writes_them():
    assert (settings_file(paths.MODEL), ood_file(paths.MODEL)) == (paths.MODEL_SETTINGS, paths.OOD_REFERENCE)
    assert model_file(paths.MODELS) == paths.MODEL


def predicted(*args: str) -> list[dict]:
    out = Path(args[-1])
    cli.main(["predict", *args[:-1], "--json", str(out)])
    return json.loads(out.read_text())


def test_a_copy_of_models_predicts_from_an_empty_folder_as_in_the_repository(bundle, xrays, tmp_path, monkeypatch):
    monkeypatch.chdir(bundle.parent)
    here = predicted(*map(str, xrays), str(tmp_path / "here.json"))  # the default: models/ of the repository

    copy = shutil.copytree(bundle, tmp_path / "elsewhere" / "handed-over")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for model in (copy, copy / "model.keras"):  # the folder, or the .keras file with its settings beside it
        there = predicted(*map(str, xrays), "--model", str(model), str(tmp_path / "there.json"))
        assert there == here
    assert list(empty.iterdir()) == []
    assert all(row["error"] is None and isinstance(row["out_of_distribution"], bool) and row["ood_score"] > 0
               for row in here)


def unloadable_onnx(folder: Path) -> None:
    """A model.onnx its settings vouch for that ONNX Runtime cannot load (as one exported in bfloat16 could not)."""
    data = b"not an ONNX graph"
    (folder / "model.onnx").write_bytes(data)
    settings = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**settings, "onnx_sha256": onnx_digest(data)}))


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "model.json").unlink(), "has no settings file model.json beside it"),
    (lambda folder: (folder / "model.ood.npz").unlink(), "(the out-of-distribution reference) is missing"),
    (lambda folder: (folder / "model.json").write_text('{"format": 1, "threshold": NaN}'),
     "is not a model settings file of this version"),
    (lambda folder: build_model(ModelConfig(crop=0), 32).save(folder / "model.keras"),  # another (random) model
     "belongs to another model (its model_sha256 is not this file's)"),
    (lambda folder: (folder / "model.onnx").write_bytes(engines.onnx_model(build_model(ModelConfig(crop=0), 32))),
     "model.onnx belongs to another model (its sha256 is not the onnx_sha256 of model.json)"),
    (lambda folder: (folder / "model.json").write_text(  # a bundle written without one, and a stray model.onnx
        json.dumps({**json.loads((folder / "model.json").read_text()), "onnx_sha256": None})),
     "model.onnx belongs to another model (its sha256 is not the onnx_sha256 of model.json)"),
    (unloadable_onnx, "ONNX Runtime cannot run"),
])
def test_a_model_without_its_settings_gets_a_message_saying_what_to_do(bundle, xrays, capsys, damage, message):
    damage(bundle)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(xrays[0]), "--model", str(bundle)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and ("Copy the whole models/ folder" in err or "dvc repro" in err), err


def test_a_bundle_without_its_onnx_predicts_with_keras_as_with_it(bundle, xrays, tmp_path, monkeypatch):
    """issue 36: model.onnx is what predict runs where it can (ONNX Runtime, no TensorFlow); a bundle copied
    without it, or written before bundles had one, predicts with the Keras model: the same answers."""
    monkeypatch.chdir(tmp_path)
    assert isinstance(load_classifier(bundle).engine, engines.OnnxEngine)
    with_onnx = predicted(*map(str, xrays), "--model", str(bundle), "onnx.json")
    (bundle / "model.onnx").unlink()
    assert isinstance(load_classifier(bundle).engine, engines.KerasEngine)
    with_keras = predicted(*map(str, xrays), "--model", str(bundle), "keras.json")
    assert [row["label"] for row in with_onnx] == [row["label"] for row in with_keras]
    np.testing.assert_allclose([row["probability"] for row in with_onnx], [row["probability"] for row in with_keras],
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose([row["ood_score"] for row in with_onnx], [row["ood_score"] for row in with_keras],
                               rtol=1e-4)  # rounded to 4 decimals


def served(model_uri: str, files: list[Path]) -> pd.DataFrame:
    """The logged model's answer to a request of `files`: what `mlflow models serve` runs for each request."""
    request = pd.DataFrame({"image": [base64.b64encode(file.read_bytes()).decode() for file in files]})
    return mlflow.pyfunc.load_model(model_uri).predict(request)


@pytest.mark.slow  # two MLflow models logged and loaded: ~40 s
def test_predict_adapt_and_the_mlflow_model_follow_the_settings_the_evaluate_stage_writes(bundle, xrays, tmp_path,
                                                                                          monkeypatch):
    """One place holds the threshold: rewriting the settings file, as the evaluate stage does when
    evaluate.threshold changes, changes what every consumer decides."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("bundle", artifact_location=(tmp_path / "artifacts").as_uri())
    classifier = load_classifier(bundle)
    probabilities = classifier.probabilities([classifier.preprocess(file) for file in xrays])
    for rule, threshold in (("a median", float(np.median(probabilities))), ("the lowest", float(probabilities.min()))):
        write_settings(bundle / "model.keras", threshold, jpeg_quality=90, threshold_rule=rule)
        expected = ["PNEUMONIA" if p >= threshold else "NORMAL" for p in probabilities]

        rows = predicted(*map(str, xrays), "--model", str(bundle), str(tmp_path / "out.json"))
        assert [row["label"] for row in rows] == expected
        np.testing.assert_allclose([row["probability"] for row in rows], probabilities, rtol=1e-5)

        # --input-checks ignore: the bundle's checks are fitted on smooth stand-ins, which real X-rays are not
        cli.main(["adapt", *map(str, xrays), "--model", str(bundle), "--out", str(tmp_path / "site.keras"),
                  "--min-images", "4", "--input-checks", "ignore"])
        adapted = read_settings(tmp_path / "site.keras")
        assert (adapted.threshold, adapted.threshold_rule, adapted.jpeg_quality) == (threshold, rule, 90)
        assert adapted.adapted.startswith("batch_norm on 4 images")
        site = load_classifier(tmp_path / "site.keras")
        assert site.threshold == threshold and isinstance(site.engine, engines.OnnxEngine)  # its own site.onnx

        with mlflow.start_run(experiment_id=experiment):
            info = serving.log_model(bundle / "model.keras")
        answer = served(info.model_uri, xrays)
        assert list(answer["label"]) == expected
        np.testing.assert_allclose(answer["probability"], probabilities, rtol=1e-5)
        np.testing.assert_allclose(answer["ood_score"], [row["ood_score"] for row in rows], rtol=1e-3)
        logged_classifier = serving.logged_classifier(info.model_uri)
        assert logged_classifier.threshold == threshold and isinstance(logged_classifier.engine, engines.OnnxEngine)
        logged = mlflow.models.get_model_info(info.model_uri)
        assert "children aged 1 to 5" in logged.metadata["population"]


def dicom(grey: np.ndarray, **attributes) -> bytes:
    return file_bytes(dataset(grey, 8, **{**WITHIN, **attributes}))


@pytest.fixture
def dicoms(tmp_path) -> dict[str, Path]:
    """A DICOM within the intended use and one outside it for each reason, all of the same X-ray."""
    folder = tmp_path / "dicoms"
    folder.mkdir()
    [(_, grey)] = sample_xrays(1, width=96)
    files = {"within": folder / "within.dcm"}
    files["within"].write_bytes(dicom(grey))
    for name, (attributes, _) in OUTSIDE.items():
        files[name] = folder / f"{name}.dcm"
        files[name].write_bytes(dicom(grey, **attributes))
    return files


def test_dicom_headers_outside_the_intended_use_are_flagged_with_their_reason_and_no_value(bundle, dicoms, tmp_path,
                                                                                          capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = [str(dicoms[name]) for name in ("within", *OUTSIDE)]
    rows = predicted(*files, "--model", str(bundle), "flagged.json")
    reasons = {Path(row["file"]).stem: row["flags"] for row in rows}
    assert "DICOM" not in reasons["within"]
    for name, (_, reason) in OUTSIDE.items():
        assert reason in reasons[name] and row_has_probability(rows, name)
    out, err = capsys.readouterr()
    written = Path("flagged.json").read_text()
    for value in ("LL", "LEG", "034Y", "34 years", *SECRETS):
        assert value not in out + err + written.replace("ALL", ""), value

    ignored = predicted(*files, "--model", str(bundle), "--input-checks", "ignore", "ignored.json")
    assert not any("DICOM" in row["flags"] for row in ignored)
    with pytest.raises(SystemExit) as exit_info:
        predicted(*files, "--model", str(bundle), "--input-checks", "refuse", "refused.json")
    assert exit_info.value.code == 1
    refused = json.loads(Path("refused.json").read_text())
    assert refused[0]["error"] is None and all("outside the model's intended use" in row["error"]
                                               for row in refused[1:])


def test_an_image_smaller_than_the_models_input_is_flagged_or_refused_in_every_format(bundle, tmp_path, monkeypatch):
    """Enlarged to the model's input, a thumbnail's blur reads as opacity (normal X-rays of the sample called
    pneumonia, unflagged by the out-of-distribution score: docs/reliability.md). An image whose shorter side is
    under the model's input (32 px here) is flagged, from its header: PNG, JPEG or DICOM, as a file (predict) or
    as bytes (the served model)."""
    monkeypatch.chdir(tmp_path)
    [(_, grey)] = sample_xrays(1, width=96)
    thumbnail = np.asarray(Image.fromarray(grey).resize((24, 24)))
    files = {"full.png": png_bytes(grey), "exact.png": png_bytes(np.asarray(Image.fromarray(grey).resize((32, 32)))),
             "thumbnail.png": png_bytes(thumbnail), "sliver.png": png_bytes(grey[:20]),
             "thumbnail.jpeg": jpeg_bytes(thumbnail), "thumbnail.dcm": file_bytes(dataset(thumbnail, 8))}
    for name, data in files.items():
        Path(name).write_bytes(data)
    small = {"thumbnail.png": "24 x 24", "sliver.png": f"{grey.shape[1]} x 20", "thumbnail.jpeg": "24 x 24",
             "thumbnail.dcm": "24 x 24"}
    rows = {Path(row["file"]).name: row for row in predicted(*files, "--model", str(bundle), "flagged.json")}
    for name, row in rows.items():
        reason = f"smaller than the model's 32 px input ({small[name]} px)" if name in small else None
        assert (reason in row["flags"]) if reason else "smaller" not in row["flags"], (name, row["flags"])
        assert 0 <= row["probability"] <= 1  # flagged, still predicted

    classifier = load_classifier(bundle)
    assert [bool(classifier.flags(data)) for data in files.values()] == [name in small for name in files]
    with pytest.raises(SystemExit):
        predicted(*files, "--model", str(bundle), "--input-checks", "refuse", "refused.json")
    refused = {Path(row["file"]).name: row["error"] for row in json.loads(Path("refused.json").read_text())}
    assert {name for name, error in refused.items() if error and "smaller than the model's" in error} == set(small)


def jpeg_bytes(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG")
    return buffer.getvalue()


def row_has_probability(rows: list[dict], name: str) -> bool:
    return any(Path(row["file"]).stem == name and 0 <= row["probability"] <= 1 for row in rows)


@pytest.mark.slow  # an MLflow model logged and loaded: ~20 s
def test_the_served_model_flags_or_refuses_the_same_headers(bundle, dicoms, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("checks", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        flagging = serving.log_model(bundle / "model.keras")
    answer = served(flagging.model_uri, [dicoms[name] for name in ("within", *OUTSIDE)])
    assert "DICOM" not in answer["flags"][0]
    for flags, (_, reason) in zip(answer["flags"][1:], OUTSIDE.values()):
        assert reason in flags
    assert not any(value in " ".join(answer["flags"]) for value in ("LL", "LEG", "034Y"))

    write_settings(bundle / "model.keras", 0.5, jpeg_quality=90, input_checks="refuse")
    with mlflow.start_run(experiment_id=experiment):
        refusing = serving.log_model(bundle / "model.keras")
    with pytest.raises(MlflowException, match="row 0 of column 'image' is outside the model's intended use: "
                                              "patient age outside 0-5 years"):
        served(refusing.model_uri, [dicoms["adult"]])


@pytest.mark.parametrize("size", [32, 150, 299])
def test_the_layout_thumbnail_is_tensorflows_area_resize_at_any_image_size(size):
    """issue 36: the layout thumbnail of an image size not a multiple of 16 was TensorFlow's area resize, so a
    prediction at such a size imported TensorFlow; NumPy gives the same thumbnail."""
    import tensorflow as tf

    images = np.random.default_rng(size).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    grey = tf.image.resize(images.astype(np.float32).mean(axis=-1, keepdims=True), (16, 16), method="area")
    thumbnails = grey.numpy().reshape(3, -1)
    centred = thumbnails - thumbnails.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(ood.layout(images), centred / (centred.std(axis=1, keepdims=True) + 2.55), atol=1e-5)


def sample_inputs(repo_sample: Path, size: int = 64, changed=None) -> tuple[np.ndarray, ...]:
    """The model inputs (`size` px) of the committed sample's training X-rays, split by patient: two thirds of the
    patients' to fit on and the rest; then the rest's once each function of `changed` (a PIL image to another) has
    changed their files' images."""
    from pneumonia.classifier import model_input
    from pneumonia.data.prepare import patient_id

    with zipfile.ZipFile(repo_sample) as archive:
        names = sorted(name for name in archive.namelist() if "/train/" in name and name.endswith(".jpeg"))
        patients = sorted({patient_id(Path(name).name) for name in names})
        held_out = [name for name in names if patient_id(Path(name).name) in set(patients[2::3])]
        inputs = [np.stack([model_input(archive.read(name), size, 90) for name in chosen])
                  for chosen in ([name for name in names if name not in held_out], held_out)]
        for change in changed or ():
            changed_files = [png_bytes(np.asarray(change(Image.open(io.BytesIO(archive.read(name))).convert("L"))))
                             for name in held_out]
            inputs.append(np.stack([model_input(file, size, 90) for file in changed_files]))
    return tuple(inputs)


def test_the_mirror_check_flags_real_xrays_mirrored_left_to_right_and_few_as_they_are(repo_sample, tmp_path):
    """The check (ood.MirrorCheck), fitted on real X-rays against their mirror images, on X-rays of other patients:
    almost none flagged as they are, almost all once mirrored (a model trained without flips reads those worse:
    docs/reliability.md); mirroring an image negates its log-odds."""
    fit_on, others = sample_inputs(repo_sample)
    check = ood.MirrorCheck.fit(ood.layout(fit_on))
    as_they_are, mirrored = (check.log_odds(ood.layout(images)) for images in (others, others[:, :, ::-1]))
    np.testing.assert_allclose(mirrored, -as_they_are, rtol=1e-5)  # the thumbnails are float32
    assert len(others) > 200 and np.mean(as_they_are < 0) <= 0.05 and np.mean(mirrored < 0) >= 0.95
    # the flag: where mirrored is the likelier
    assert np.array_equal(check.mirrored(ood.layout(others)), as_they_are < 0)


def test_the_detail_check_flags_real_xrays_blurred_enlarged_or_noisy_and_few_as_they_are(repo_sample):
    """The check (ood.DetailCheck), fitted on real X-rays at the default input size, on X-rays of other patients:
    few flagged as they are; blurred, enlarged from a quarter of their size or noisy, almost all (blurred, another
    site's normal X-rays were called pneumonia: docs/reliability.md). Brightness and contrast do not move it."""
    from PIL import ImageFilter

    rng = np.random.default_rng(0)

    def noisy(image: Image.Image) -> Image.Image:
        grey = np.asarray(image, np.float32) + rng.normal(0, 16, (image.height, image.width))
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))

    fit_on, others, blurred, enlarged, noised = sample_inputs(repo_sample, 128, [
        lambda image: image.filter(ImageFilter.GaussianBlur(2)),
        lambda image: image.resize((image.width // 4, image.height // 4)).resize(image.size, Image.BICUBIC), noisy])
    check = ood.DetailCheck.fit(ood.fine_detail(fit_on))
    detail = {name: ood.fine_detail(images) for name, images in
              (("others", others), ("blurred", blurred), ("enlarged", enlarged), ("noised", noised))}
    assert len(others) > 200
    assert np.mean(check.blurred(detail["others"]) | check.noisy(detail["others"])) <= 0.05
    # measured: 96%, 91% and 100%
    assert np.mean(check.blurred(detail["blurred"])) >= 0.9 and np.mean(check.blurred(detail["enlarged"])) >= 0.85
    assert np.mean(check.noisy(detail["noised"])) >= 0.95 and not check.blurred(detail["noised"]).any()
    # brighter and flatter (before any rounding): the same detail, up to the 1% of the grey range added to the spread
    # (the band is about 1.3 wide)
    changed = ood.fine_detail(0.8 * others.astype(np.float32) + 30)
    np.testing.assert_allclose(changed, detail["others"], atol=0.05)


def test_the_ood_score_is_a_shrunk_mahalanobis_distance_fitted_on_training_images_and_saved_whole(tmp_path):
    from sklearn.covariance import LedoitWolf

    # One layout, as chest X-rays share one: dark at the top, bright at the bottom, varied a little
    layout = np.linspace(40, 220, 32)[None, :, None, None] * np.ones((1, 1, 32, 3))
    images = (0.8 * layout + 0.2 * smooth_images(80, 32)).astype(np.uint8)
    features = np.random.default_rng(1).normal(size=(80, 6))
    reference = ood.fit((ood.layout(images[:60]), features[:60]), (ood.layout(images[60:]), features[60:]), 0.1,
                        ood.fine_detail(images[:60]))
    expected = np.sqrt(LedoitWolf().fit(features[:60]).mahalanobis(features[60:])) / reference.features.scale
    np.testing.assert_allclose(reference.features.distance(features[60:]), expected, rtol=1e-6)
    validation = reference.scores(ood.layout(images[60:]), features[60:])
    assert np.mean(validation > reference.threshold) <= 0.1
    # What is not like them: noise, the same images turned upside down, on their side, or inverted
    unlike = np.concatenate([np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
                             images[60:64, ::-1], np.rot90(images[64:68], axes=(1, 2)), 255 - images[68:72]])
    assert np.all(reference.scores(ood.layout(unlike), features[60:76]) > reference.threshold)

    reference.save(tmp_path / "reference.ood.npz")
    loaded = ood.OodReference.load(tmp_path / "reference.ood.npz", reference.threshold)
    np.testing.assert_array_equal(loaded.scores(ood.layout(images), features), reference.scores(ood.layout(images),
                                                                                                 features))
    # the mirror check, fitted on the training thumbnails, travels in the same file
    np.testing.assert_array_equal(loaded.mirror.direction, ood.MirrorCheck.fit(ood.layout(images[:60])).direction)
    # and the detail check's band: the training images' median plus or minus 3 robust standard deviations
    detail = ood.fine_detail(images[:60])
    spread = 3 * 1.4826 * np.median(np.abs(detail - np.median(detail)))
    assert loaded.detail == reference.detail
    np.testing.assert_allclose([loaded.detail.low, loaded.detail.high], np.median(detail) + [-spread, spread])
    # a reference saved before the checks: loaded without them, it flags nothing as mirrored
    with np.load(tmp_path / "reference.ood.npz") as stored:
        np.savez(tmp_path / "older.ood.npz", **{key: stored[key] for key in stored.files
                                                if key not in ("mirror_direction", "detail_band")})
    older = ood.OodReference.load(tmp_path / "older.ood.npz", reference.threshold)
    assert older.mirror is None and not older.mirrored(ood.layout(images[:, :, ::-1])).any()
    assert older.detail is None
