"""The compact sample committed in data_sample/: small, real, whole patients, rebuilt byte for byte."""

import hashlib
import io
import re
import zipfile
from collections import defaultdict
from pathlib import PurePosixPath

import pytest
from PIL import Image

from conftest import REPO, REPO_SAMPLE, shared_dataset
from pneumonia.data.prepare import patient_id
from pneumonia.data.sample import build_sample, draw


def test_committed_sample_is_small_real_and_keeps_patients_whole(repo_sample):
    assert repo_sample.stat().st_size <= 10 * 1024 * 1024
    splits_of = defaultdict(set)  # patient -> splits
    counts = defaultdict(int)
    with zipfile.ZipFile(repo_sample) as archive:
        names = [name for name in archive.namelist() if not name.endswith("/")]
        for name in names:
            _, split, label, file_name = PurePosixPath(name).parts
            splits_of[(label, patient_id(file_name))].add(split)
            counts[(split, label)] += 1
        first = Image.open(io.BytesIO(archive.read(names[0])))
        assert first.format == "JPEG" and first.size == (224, 224)
    assert all(len(splits) == 1 for splits in splits_of.values()), "a patient in two splits"
    # The counts data_sample/README.md states.
    assert dict(counts) == {("test", "NORMAL"): 116, ("test", "PNEUMONIA"): 293, ("train", "NORMAL"): 209,
                            ("train", "PNEUMONIA"): 602, ("val", "NORMAL"): 8, ("val", "PNEUMONIA"): 8}
    readme = (REPO / "data_sample" / "README.md").read_text()
    assert "CC BY 4.0" in readme and "10.1016/j.cell.2018.02.010" in readme
    assert hashlib.sha256(repo_sample.read_bytes()).hexdigest() in readme


def test_draw_takes_whole_patients_per_class_and_is_deterministic():
    names = [f"chest_xray/{split}/PNEUMONIA/person{p}_bacteria_{i}.jpeg"
             for split, patients in (("train", range(0, 40)), ("test", range(40, 60)))
             for p in patients for i in range(3)]
    names += [f"chest_xray/{split}/NORMAL/IM-{p:04d}-0001.jpeg"
              for split, patients in (("train", range(0, 20)), ("test", range(20, 30))) for p in patients]
    fractions = {"train": 0.25, "val": 1.0, "test": 0.5}
    kept = draw(names, fractions, seed=1)
    assert kept == draw(list(reversed(names)), fractions, seed=1)  # order of the archive does not matter
    assert kept != draw(names, fractions, seed=2)
    patients = {key: {patient_id(PurePosixPath(n).name) for n in members} for key, members in kept.items()}
    assert {key: len(p) for key, p in patients.items()} == {
        ("train", "PNEUMONIA"): 10, ("train", "NORMAL"): 5, ("test", "PNEUMONIA"): 10, ("test", "NORMAL"): 5}
    for (split, label), members in kept.items():  # every image of a kept patient
        if label == "PNEUMONIA":
            assert len(members) == 3 * len(patients[(split, label)])


def test_rebuilding_from_the_shared_archive_gives_the_committed_bytes(tmp_path):
    archive = shared_dataset("chest-xray-sample.zip")
    summary = build_sample(archive, tmp_path / "sample.zip")
    assert summary.sha256 == hashlib.sha256(REPO_SAMPLE.read_bytes()).hexdigest(), \
        "data_sample/ no longer matches its build: rebuild it (data_sample/README.md) and commit"
    assert summary.images["test"] == {"NORMAL": 116, "PNEUMONIA": 293}
    assert re.search(r"\b1236 images\b", (REPO / "data_sample" / "README.md").read_text())


def test_build_sample_refuses_to_write_over_its_input(tmp_path, monkeypatch, capsys):
    """`pneumonia build-sample data_sample/chest-xray-small.zip`: --out defaults to that very file."""
    from archives import kaggle_members, write_zip
    from pneumonia import cli
    from pneumonia.errors import PipelineError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data_sample").mkdir()
    archive = write_zip(tmp_path / "data_sample" / "chest-xray-small.zip", kaggle_members(patients=6))
    before = archive.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["build-sample", "data_sample/chest-xray-small.zip"])
    assert exit_info.value.code == 2
    assert "would write over its input" in capsys.readouterr().err
    linked = tmp_path / "link.zip"
    linked.symlink_to(archive)
    for out in (tmp_path / "data_sample" / ".." / "data_sample" / "chest-xray-small.zip", linked):  # same file
        with pytest.raises(PipelineError, match="give --out another path"):
            build_sample(archive, out)
    assert archive.read_bytes() == before
    assert sorted(p.name for p in archive.parent.iterdir()) == ["chest-xray-small.zip"]  # no temporary left


def test_build_sample_refuses_an_archive_expanding_past_the_free_space(tmp_path, monkeypatch):
    """The sample stores its images as they are: their declared sizes must fit (one extraction path)."""
    import shutil

    from archives import kaggle_members, write_zip
    from pneumonia.errors import PipelineError

    members = kaggle_members(patients=6)
    archive = write_zip(tmp_path / "bomb.zip", {**members, "chest_xray/val/NORMAL/IM-0900-0001.jpeg": bytes(5_000_000)})
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1_000_000))
    with pytest.raises(PipelineError, match=r"bomb.zip expands to 5 MB but only 1 MB are free .* free up space"):
        build_sample(archive, tmp_path / "sample.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.zip"]
