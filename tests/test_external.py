"""The external validation set (evaluate.external): layout, unreadable images, overlap with the
pipeline's own images, one decoding path with the splits, and the shortcut audit's border share."""

import json
from pathlib import Path

import numpy as np
import pytest

from archives import jpeg, zip_bytes
from conftest import run
from pneumonia.config import TFRecordsConfig
from pneumonia.data.audit import inspect_file, write_image_table
from pneumonia.data.external import SPLIT, labelled_images, write_external
from pneumonia.data.layout import has_image_suffix
from pneumonia.data.tfrecords import read_meta
from pneumonia.errors import PipelineError
from pneumonia.evaluation import gradcam

CONFIG = TFRecordsConfig(images_per_shard=8, workers=1)


def external_folder(root: Path, normals: int = 3, pneumonias: int = 4, seed: int = 1000) -> Path:
    for index in range(normals):
        (root / "NORMAL").mkdir(parents=True, exist_ok=True)
        (root / "NORMAL" / f"IM-{index:04d}-0001.jpeg").write_bytes(jpeg(seed + index))
    for index in range(pneumonias):
        (root / "PNEUMONIA").mkdir(parents=True, exist_ok=True)
        (root / "PNEUMONIA" / f"person{index}_virus_1.jpeg").write_bytes(jpeg(seed + 100 + index, True))
    return root


@pytest.fixture
def known_images(tmp_path) -> Path:
    """data/images.csv of a pipeline whose train split holds one image."""
    train = tmp_path / "raw" / "train.jpeg"
    train.parent.mkdir()
    train.write_bytes(jpeg(1))
    write_image_table(tmp_path / "images.csv", [inspect_file(train, "train", 0)])
    return tmp_path / "images.csv"


def write(source: Path, target: Path, known: Path, max_unreadable: float = 0.0) -> dict:
    return write_external(source, str(source), target, known, 32, CONFIG, max_unreadable)


def test_layout_is_one_root_with_both_classes():
    def located(names: list[str]) -> list[tuple[str, int]]:
        return labelled_images(names, has_image_suffix, lambda name: "", "x")

    names = ["site/NORMAL/a.jpeg", "site/PNEUMONIA/b.png", "site/PNEUMONIA/._b.png", "__MACOSX/site/NORMAL/a.jpeg",
             "site/readme.txt", "site/NORMAL/c.dcm"]
    assert located(names) == [("site/NORMAL/a.jpeg", 0), ("site/NORMAL/c.dcm", 0), ("site/PNEUMONIA/b.png", 1)]
    with pytest.raises(PipelineError, match="no NORMAL/ or PNEUMONIA/ folder"):
        located(["site/a.jpeg", "site/normal_b.jpeg"])
    with pytest.raises(PipelineError, match="has no PNEUMONIA images"):
        located(["site/NORMAL/a.jpeg"])
    with pytest.raises(PipelineError, match="several roots .*'a', 'b'"):
        located(["a/NORMAL/1.jpeg", "a/PNEUMONIA/2.jpeg", "b/NORMAL/3.jpeg", "b/PNEUMONIA/4.jpeg"])


def test_folder_and_zip_give_the_same_tfrecords(tmp_path, known_images):
    folder = external_folder(tmp_path / "site")
    members = {f"external/{path.relative_to(folder).as_posix()}": path.read_bytes()
               for path in sorted(folder.rglob("*.jpeg"))}
    (tmp_path / "site.zip").write_bytes(zip_bytes(members))

    audit = write(folder, tmp_path / "from_folder", known_images)
    write(tmp_path / "site.zip", tmp_path / "from_zip", known_images)
    assert audit["passed"] and audit["images"] == {"NORMAL": 3, "PNEUMONIA": 4} and audit["patients"] == 7
    assert SPLIT in read_meta(tmp_path / "from_folder")["splits"]
    for name in ("manifest.csv", f"{SPLIT}-00000-of-00001.tfrecord"):
        assert (tmp_path / "from_folder" / name).read_bytes() == (tmp_path / "from_zip" / name).read_bytes()


def test_images_are_decoded_as_the_training_images_are(tmp_path, known_images):
    """One code path: the external shard's image equals what the splits' writer makes of the file."""
    from pneumonia.data import dataset
    from pneumonia.data.images import resized_jpeg

    folder = external_folder(tmp_path / "site", normals=1, pneumonias=1)
    write(folder, tmp_path / "external", known_images)
    [first, *_] = dataset.records(tmp_path / "external", SPLIT).as_numpy_iterator()
    expected, _ = resized_jpeg(str(folder / "NORMAL" / first["file_name"].decode()), 32, CONFIG.jpeg_quality)
    import tensorflow as tf

    assert np.array_equal(first["image"], tf.io.decode_jpeg(expected, channels=3).numpy())


def test_an_image_also_in_the_pipelines_data_fails_the_audit(tmp_path, known_images):
    folder = external_folder(tmp_path / "site")
    (folder / "NORMAL" / "copied.jpeg").write_bytes(jpeg(1))  # the train image, under another name
    with pytest.raises(PipelineError, match=r"1 of its images are also in this pipeline's data \(e.g. copied.jpeg = "):
        write(folder, tmp_path / "external", known_images)
    assert not (tmp_path / "external").exists()
    assert not list(tmp_path.glob(".external*"))  # no scratch left behind either


def test_unreadable_images_are_skipped_up_to_the_limit(tmp_path, known_images):
    folder = external_folder(tmp_path / "site")
    (folder / "PNEUMONIA" / "broken.jpeg").write_bytes(jpeg(5)[:200])
    with pytest.raises(PipelineError, match="1 of 8 image files .* are not readable") as refused:
        write(folder, tmp_path / "external", known_images, max_unreadable=0.1)
    assert not (tmp_path / "external").exists()
    # the user's file and what to do about it: not the scratch copy, not the download stage (issue 33)
    assert f"  {folder}: PNEUMONIA/broken.jpeg: " in str(refused.value)
    assert ".copy-" not in str(refused.value) and "download" not in str(refused.value)
    assert f"Export them again into evaluate.external = '{folder}'" in str(refused.value)

    audit = write(folder, tmp_path / "external", known_images, max_unreadable=0.2)
    assert audit["images"] == {"NORMAL": 3, "PNEUMONIA": 4}
    assert [entry.split(":")[0] for entry in audit["unreadable_skipped"]] == ["broken.jpeg"]


def test_symbolic_links_in_a_folder_are_not_followed(tmp_path, known_images):
    folder = external_folder(tmp_path / "site")
    outside = tmp_path / "elsewhere.jpeg"
    outside.write_bytes(jpeg(77))
    (folder / "NORMAL" / "link.jpeg").symlink_to(outside)
    assert write(folder, tmp_path / "external", known_images)["images"]["NORMAL"] == 3


def test_missing_or_wrong_source_says_what_to_do(tmp_path, known_images):
    with pytest.raises(PipelineError, match="does not exist .* or set it to ''"):
        write(tmp_path / "nowhere.zip", tmp_path / "external", known_images)
    (tmp_path / "notes.txt").write_text("not images")
    with pytest.raises(PipelineError, match="neither a folder nor a zip archive"):
        write(tmp_path / "notes.txt", tmp_path / "external", known_images)


def test_without_a_source_only_meta_says_so(tmp_path, known_images):
    assert write_external(None, "", tmp_path / "external", known_images, 32, CONFIG, 0.0) == {}
    assert read_meta(tmp_path / "external")["splits"] == {}
    assert [path.name for path in (tmp_path / "external").iterdir()] == ["meta.json"]


@pytest.mark.slow
def test_the_stage_refuses_a_bad_external_set_with_a_message(tmp_path, known_images):
    """Through the stage script: exit code 2, a message, no traceback, no output."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "images.csv").write_bytes(known_images.read_bytes())
    (project / "params.yaml").write_text(json.dumps({"evaluate": {"external": str(tmp_path / "missing")}}))
    result = run(["python", str(Path(__file__).parents[1] / "stages" / "external.py")], project, check=False)
    assert result.returncode == 2 and "evaluate.external" in result.stderr and "Traceback" not in result.stderr
    assert not (project / "data" / "external").exists()


def test_border_share_measures_heat_in_the_outer_band():
    size = 100
    border = np.zeros((1, size, size))
    border[0, :5, :] = 1  # top rows only
    centre = np.zeros((1, size, size))
    centre[0, 40:60, 40:60] = 1
    uniform = np.ones((1, size, size))
    cold = np.zeros((1, size, size))
    shares = gradcam.border_share(np.concatenate([border, centre, uniform, cold]), band=0.12)
    assert shares[:3].tolist() == pytest.approx([1.0, 0.0, 1 - 0.76**2])
    assert np.isnan(shares[3])


def test_gradcam_puts_no_heat_on_a_cropped_border():
    """With model.crop the network never sees the border: its maps must be zero there."""
    from pneumonia.config import ModelConfig
    from pneumonia.models.build import build_model

    model = build_model(ModelConfig(crop=0.1), 40)
    images = np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3)).astype(np.float32)
    maps = gradcam.heatmaps(model, images)
    assert maps.shape == (2, 40, 40)
    assert maps[:, :4].max() == maps[:, -4:].max() == maps[:, :, :4].max() == maps[:, :, -4:].max() == 0


def dicom_sites(root: Path) -> dict[str, Path]:
    """Four DICOM X-rays of the sample (2 NORMAL, 2 PNEUMONIA, in several forms) as an external set in three
    layouts: NORMAL/ and PNEUMONIA/ folders; the RSNA challenge's zip (one labels row per box, unlabelled test
    images, other CSVs beside it); images in subfolders with a path,label CSV."""
    from dicoms import dicom_file, sample_xrays

    forms = ["mono1_12bit_rescaled", "jpeg2000_lossless", "window_16bit", "rle"]
    images = {f"0004cfab-14fd-4e49-80ba-63a80b6bdd{index:02d}": (dicom_file(grey, form)[0], int(index >= 2))
              for index, ((_, grey), form) in enumerate(zip(sample_xrays(4, width=64), forms))}
    folders = root / "folders"
    for name, (data, label) in images.items():
        (folders / ("NORMAL", "PNEUMONIA")[label]).mkdir(parents=True, exist_ok=True)
        (folders / ("NORMAL", "PNEUMONIA")[label] / f"{name}.dcm").write_bytes(data)

    boxes = "".join(f"{name},,,,,0\n" if not label else f"{name},264,152,213,379,1\n{name},562,152,256,453,1\n"
                    for name, (_, label) in images.items())
    unlabelled = next(iter(images.values()))[0][:-10] + b"\0" * 10  # not in the labels: never read as an image
    rsna = {"stage_2_train_labels.csv": b"patientId,x,y,width,height,Target\n" + boxes.encode(),
            "stage_2_detailed_class_info.csv": b"patientId,class\n" + b"".join(
                f"{name},{'Lung Opacity' if label else 'Normal'}\n".encode() for name, (_, label) in images.items()),
            "stage_2_sample_submission.csv": b"patientId,PredictionString\nffff,0.5 0 0 100 100\n",
            "stage_2_test_images/ffff.dcm": unlabelled,
            **{f"stage_2_train_images/{name}.dcm": data for name, (data, _) in images.items()}}
    (root / "rsna-pneumonia-detection-challenge.zip").write_bytes(zip_bytes(rsna))

    labelled = root / "labelled"
    rows = ["path,label"]
    for index, (name, (data, label)) in enumerate(images.items()):
        (labelled / f"series{index % 2}").mkdir(parents=True, exist_ok=True)
        (labelled / f"series{index % 2}" / f"{name}.dcm").write_bytes(data)
        rows.append(f"series{index % 2}/{name}.dcm,{('NORMAL', 'PNEUMONIA')[label]}")
    (labelled / "labels.csv").write_text("\n".join(rows) + "\n")
    return {"folders": folders, "rsna": root / "rsna-pneumonia-detection-challenge.zip", "labels-csv": labelled}


@pytest.mark.slow  # a model and three external sets: 15 s
def test_rsna_and_labels_csv_layouts_score_as_the_same_images_in_class_folders(tmp_path, known_images, caplog):
    """The same DICOMs in the three layouts: the same records, and the same metrics/external.json (but its source)
    from the functions the external and evaluate stages use; no patient data in anything written or logged."""
    import logging

    from dicoms import SECRETS
    from pneumonia.config import EvaluateConfig, ModelConfig
    from pneumonia.evaluation.predictions import predict_split
    from pneumonia.evaluation.scores import external_scores
    from pneumonia.models.build import build_model

    caplog.set_level(logging.DEBUG)
    model = build_model(ModelConfig(crop=0), 32)
    scores, written = {}, {}
    for layout, source in dicom_sites(tmp_path / "sites").items():
        target = tmp_path / layout
        audit = write(source, target, known_images)
        assert audit["images"] == {"NORMAL": 2, "PNEUMONIA": 2} and audit["patients"] == 4
        written[layout] = {name: (target / name).read_bytes()
                           for name in ("manifest.csv", f"{SPLIT}-00000-of-00001.tfrecord")}
        scores[layout] = external_scores(predict_split(model, target, SPLIT, 4), 0.5, 0.5, str(source), audit,
                                         bootstrap_samples=100, seed=EvaluateConfig().seed)
        assert scores[layout].pop("source") == str(source)
        everything = b"".join(path.read_bytes() for path in target.rglob("*") if path.is_file())
        assert not [secret for secret in SECRETS if secret.encode() in everything + json.dumps(scores).encode()]
    assert written["rsna"] == written["folders"] == written["labels-csv"]
    assert scores["rsna"] == scores["folders"] == scores["labels-csv"]
    assert not [secret for secret in SECRETS if secret in caplog.text]


def test_a_labels_csv_that_is_missing_ambiguous_or_wrong_says_so(tmp_path, known_images):
    site = dicom_sites(tmp_path / "sites")["labels-csv"]
    labels = (site / "labels.csv").read_text()
    (site / "labels.csv").write_text(labels.replace("PNEUMONIA", "maybe", 1))
    with pytest.raises(PipelineError, match=r"labels.csv, row 4: the label 'maybe' is neither pneumonia"):
        write(site, tmp_path / "external", known_images)
    (site / "labels.csv").write_text(labels.replace("PNEUMONIA", "NORMAL"))
    with pytest.raises(PipelineError, match="has no PNEUMONIA images labelled in labels.csv"):
        write(site, tmp_path / "external", known_images)
    (site / "labels.csv").write_text(labels)
    (site / "more.csv").write_text(labels)
    with pytest.raises(PipelineError, match=r"several labels CSVs \(labels.csv, more.csv\)"):
        write(site, tmp_path / "external", known_images)
    (site / "more.csv").unlink()
    (site / "labels.csv").unlink()
    with pytest.raises(PipelineError, match="no NORMAL/ or PNEUMONIA/ folder of images and no labels CSV"):
        write(site, tmp_path / "external", known_images)
    assert not (tmp_path / "external").exists()


def test_a_zip_expanding_past_the_free_space_is_refused_before_extraction(tmp_path, known_images, monkeypatch):
    """The download stage's guards hold for evaluate.external too (one extraction path): before, a zip
    declaring 129 GB on a 70 GB disk was extracted until the disk was full."""
    import shutil

    folder = external_folder(tmp_path / "site")
    members = {f"site/{path.relative_to(folder).as_posix()}": path.read_bytes() for path in folder.rglob("*.jpeg")}
    (tmp_path / "bomb.zip").write_bytes(zip_bytes({**members, "site/NORMAL/huge.jpeg": bytes(5_000_000)}))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1_000_000))
    copied = []
    monkeypatch.setattr(shutil, "copyfileobj", lambda *args: copied.append(args))

    with pytest.raises(PipelineError, match=r"bomb.zip expands to 5 MB but only 1 MB are free .* free up space"):
        write(tmp_path / "bomb.zip", tmp_path / "external", known_images)
    assert copied == []  # not a byte extracted
    assert not (tmp_path / "external").exists() and not list(tmp_path.glob(".external*"))


def test_a_symbolic_link_member_is_refused(tmp_path, known_images):
    folder = external_folder(tmp_path / "site")
    members = {f"site/{path.relative_to(folder).as_posix()}": path.read_bytes() for path in folder.rglob("*.jpeg")}
    (tmp_path / "link.zip").write_bytes(zip_bytes(members, symlinks={"site/NORMAL/x.jpeg": "/etc/passwd"}))
    with pytest.raises(PipelineError, match="member 'site/NORMAL/x.jpeg' is a symbolic link"):
        write(tmp_path / "link.zip", tmp_path / "external", known_images)


@pytest.mark.parametrize("policy", ["flag", "refuse", "ignore"])
def test_images_outside_the_intended_use_by_their_headers_are_counted_with_their_reasons(tmp_path, known_images,
                                                                                          policy):
    """The external stage's audit (reports/evaluation/external.json) says how many of its images are outside the
    model's intended use by their headers (DICOM attributes, a size under the model's input), and why; `refuse`
    leaves them out. No header value in the audit."""
    from dicoms import dataset, file_bytes, png_bytes, sample_xrays

    source = external_folder(tmp_path / "site")
    [(_, grey)] = sample_xrays(1, width=64)
    for name, attributes in {"lateral": {"ViewPosition": "LL"}, "adult": {"PatientAge": "034Y"},
                             "leg_adult": {"BodyPartExamined": "LEG", "PatientAge": "040Y"},
                             "within": {"BodyPartExamined": "CHEST", "PatientAge": "002Y"}}.items():
        (source / "NORMAL" / f"{name}.dcm").write_bytes(file_bytes(dataset(grey, 8, **attributes)))
    (source / "NORMAL" / "thumbnail.png").write_bytes(png_bytes(grey[::4, ::4]))  # 16 px wide, the model's 32
    audit = write_external(source, str(source), tmp_path / "out", known_images, 32, CONFIG, 0.0, policy)
    checks = audit["input_checks"]
    if policy == "ignore":
        assert checks == {"policy": "ignore", "outside_intended_use": 0, "refused": 0, "reasons": {}}
    else:
        assert checks["outside_intended_use"] == 4 and checks["refused"] == (4 if policy == "refuse" else 0)
        assert checks["reasons"] == {
            "body part examined is not the chest (DICOM BodyPartExamined)": 1,
            "not a frontal view: lateral or other (DICOM ViewPosition is not AP or PA)": 1,
            "patient age outside 0-5 years (DICOM PatientAge)": 2,
            f"smaller than the model's 32 px input (16 x {grey[::4].shape[0]} px): enlarged, its blur reads as "
            "opacity; send the X-ray at full resolution": 1}
    assert audit["images"]["NORMAL"] == 3 + 5 - (4 if policy == "refuse" else 0)
    assert not {"LL", "034Y", "040Y", "LEG"} & set(json.dumps(audit).replace('"', " ").split())
