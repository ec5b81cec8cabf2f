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
from pneumonia.data.external import SPLIT, locate_images, write_external
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
    names = ["site/NORMAL/a.jpeg", "site/PNEUMONIA/b.png", "site/PNEUMONIA/._b.png", "__MACOSX/site/NORMAL/a.jpeg",
             "site/readme.txt"]
    assert locate_images(names, "x") == [("site/NORMAL/a.jpeg", 0), ("site/PNEUMONIA/b.png", 1)]
    with pytest.raises(PipelineError, match="no NORMAL/ or PNEUMONIA/ folder"):
        locate_images(["site/a.jpeg", "site/normal_b.jpeg"], "x")
    with pytest.raises(PipelineError, match="has no PNEUMONIA images"):
        locate_images(["site/NORMAL/a.jpeg"], "x")
    with pytest.raises(PipelineError, match="several roots .*'a', 'b'"):
        locate_images(["a/NORMAL/1.jpeg", "a/PNEUMONIA/2.jpeg", "b/NORMAL/3.jpeg", "b/PNEUMONIA/4.jpeg"], "x")


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
    with pytest.raises(PipelineError, match="1 of 8 image files .* are not readable"):
        write(folder, tmp_path / "external", known_images, max_unreadable=0.1)
    assert not (tmp_path / "external").exists()

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
