"""Broken and awkward archives through the download and prepare stages: each is refused with a
clear message and nothing half-written, or handled as documented; and the leakage audit."""

import errno
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from archives import jpeg, kaggle_members, tree_hashes, write_zip
from conftest import copy_project, run, set_params
from pneumonia.atomic import write_json
from pneumonia.config import DataConfig
from pneumonia.data.audit import audit_splits, raise_if_leaked, read_image_table, write_image_table
from pneumonia.data.download import download
from pneumonia.data.manifest import Record, read_manifest, write_manifests
from pneumonia.data.prepare import prepare
from pneumonia.errors import PipelineError

RAW, MANIFESTS, AUDIT = Path("data/raw"), Path("data/manifests"), Path("data/audit.json")


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _download(archive: Path) -> dict:
    return download(DataConfig(source="local", local_path=str(archive.resolve())), RAW)


def _prepare(val_fraction: float = 0.34, **kwargs):
    """As the prepare stage does: the audit findings written, then the manifests when it passed."""
    prepared = prepare(RAW, val_fraction=val_fraction, seed=0, **kwargs)
    write_json(AUDIT, prepared.audit)
    raise_if_leaked(prepared.audit)
    write_manifests(MANIFESTS, prepared.splits)
    return prepared


def _nothing_written():
    data = Path("data")
    leftovers = sorted(p.name for p in data.iterdir()) if data.exists() else []
    assert leftovers == [], leftovers  # neither data/raw nor a temporary sibling


def test_truncated_zip_is_refused(tmp_path):
    good = write_zip(tmp_path / "good.zip", kaggle_members()).read_bytes()
    archive = tmp_path / "truncated.zip"
    archive.write_bytes(good[: len(good) * 2 // 3])

    with pytest.raises(PipelineError, match="not a readable zip archive.*truncated or corrupt"):
        _download(archive)
    _nothing_written()


def test_corrupt_member_fails_its_crc_check(tmp_path):
    members = kaggle_members()
    name = sorted(members)[-1]
    archive = write_zip(tmp_path / "corrupt.zip", members)
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo(name)
    # Flip bytes inside the member's compressed data (after its 30-byte local header and name).
    start = info.header_offset + 30 + len(name.encode()) + len(info.extra)
    for offset in range(start + 20, start + 40):
        data[offset] ^= 0xFF
    archive.write_bytes(bytes(data))

    with pytest.raises(PipelineError, match="truncated or corrupt"):
        _download(archive)
    _nothing_written()


@pytest.mark.parametrize("evil", ["chest_xray/train/NORMAL/../../../../escaped.jpeg", "/tmp/escaped-abs.jpeg"])
def test_member_escaping_the_folder_is_refused(tmp_path, evil):
    archive = write_zip(tmp_path / "evil.zip", {**kaggle_members(), evil: jpeg(99)})

    with pytest.raises(PipelineError, match="would be written outside the data folder"):
        _download(archive)
    _nothing_written()
    assert not list(tmp_path.parent.rglob("escaped*.jpeg")) and not Path("/tmp/escaped-abs.jpeg").exists()


def test_symlink_member_is_refused(tmp_path):
    archive = write_zip(tmp_path / "link.zip", kaggle_members(),
                        symlinks={"chest_xray/train/NORMAL/IM-0999-0001.jpeg": "/etc/passwd"})

    with pytest.raises(PipelineError, match="is a symbolic link"):
        _download(archive)
    _nothing_written()


def test_archive_expanding_past_the_free_space_is_refused_before_extraction(tmp_path, monkeypatch):
    members = kaggle_members()
    archive = write_zip(tmp_path / "bomb.zip",
                        {**members, "chest_xray/train/NORMAL/IM-0900-0001.jpeg": bytes(5_000_000)})
    assert archive.stat().st_size < 100_000  # 5 MB of zeros deflate to a few KiB
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1_000_000))
    copied = []
    monkeypatch.setattr(shutil, "copyfileobj", lambda *args: copied.append(args))

    with pytest.raises(PipelineError, match=r"bomb.zip expands to 5 MB but only 1 MB are free .* free up space"):
        _download(archive)
    assert copied == []  # not a byte extracted
    _nothing_written()


def test_disk_full_during_extraction_is_a_message_and_nothing_is_kept(tmp_path, monkeypatch):
    archive = write_zip(tmp_path / "good.zip", kaggle_members())
    calls = []

    def copy_until_full(source, target, *args):
        calls.append(target)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        target.write(source.read())

    monkeypatch.setattr(shutil, "copyfileobj", copy_until_full)
    with pytest.raises(PipelineError, match=r"the disk of .* is full \(No space left on device\) .* nothing was kept"):
        _download(archive)
    _nothing_written()


def test_symlinks_in_a_local_folder_are_not_followed(tmp_path, caplog):
    folder = tmp_path / "chest_xray"
    for name, data in kaggle_members(root="").items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    secret = tmp_path / "outside" / "secret.jpeg"
    secret.parent.mkdir()
    secret.write_bytes(jpeg(77))
    (folder / "train/NORMAL/IM-0999-0001.jpeg").symlink_to(secret)
    (folder / "train/PNEUMONIA/linked").symlink_to(secret.parent, target_is_directory=True)

    with caplog.at_level(logging.WARNING):
        source = _download(folder)
    copied = sorted(p.relative_to(RAW).as_posix() for p in RAW.rglob("*") if p.is_file() and p.name != "source.json")
    assert copied == sorted(name for name in kaggle_members(root=""))
    assert sum(sum(counts.values()) for counts in source["images"].values()) == len(copied)
    assert "not following 2 symbolic link(s)" in caplog.text and "IM-0999-0001.jpeg" in caplog.text


def test_non_image_named_jpeg_is_skipped_and_reported(tmp_path):
    bad = "chest_xray/train/PNEUMONIA/person9_virus_1.jpeg"
    archive = write_zip(tmp_path / "a.zip", {**kaggle_members(), bad: b"<html>Access denied</html>"})
    _download(archive)

    prepared = _prepare(max_unreadable_fraction=0.1)

    assert prepared.summary["unreadable_skipped"] == 1
    [skipped] = [image for image in prepared.images if image.error]
    assert skipped.path == "data/raw/train/PNEUMONIA/person9_virus_1.jpeg"
    assert "UnidentifiedImageError" in skipped.error
    used = {r.path for split in ("train", "val", "test") for r in read_manifest(MANIFESTS / f"{split}.csv")}
    assert skipped.path not in used and len(used) == len(prepared.images) - 1
    write_image_table(Path("data/images.csv"), prepared.images)  # the report lists it from here
    assert read_image_table(Path("data/images.csv")) == prepared.images


def test_too_many_unreadable_images_fail_the_stage(tmp_path):
    members = kaggle_members()
    for name in sorted(members)[:3]:
        members[name] = members[name][: len(members[name]) // 2]  # truncated JPEGs
    _download(write_zip(tmp_path / "a.zip", members))

    with pytest.raises(PipelineError, match=r"3 of 28 image files \(10.7%\) are not readable.*max_unreadable_fraction"):
        _prepare(max_unreadable_fraction=0.05)
    assert not MANIFESTS.exists() and not AUDIT.exists()


def test_empty_val_class_folder_is_fine(tmp_path):
    members = {name: data for name, data in kaggle_members().items() if "/val/NORMAL/" not in name}
    archive = tmp_path / "a.zip"
    write_zip(archive, {**members})
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("chest_xray/val/NORMAL/", b"")  # the folder is there, empty

    source = _download(archive)

    assert source["images"]["val"] == {"NORMAL": 0, "PNEUMONIA": 2}
    assert _prepare().audit["passed"]


def test_empty_train_class_folder_is_refused(tmp_path):
    members = {name: data for name, data in kaggle_members().items() if "/train/NORMAL/" not in name}
    archive = write_zip(tmp_path / "a.zip", members)
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("chest_xray/train/NORMAL/", b"")

    with pytest.raises(PipelineError, match="no images in train/NORMAL.*both classes are needed"):
        _download(archive)
    _nothing_written()


@pytest.mark.parametrize("val_fraction", [0.1, 0.15])
def test_val_fraction_beyond_the_patients_of_a_class_is_a_message(tmp_path, val_fraction):
    _download(write_zip(tmp_path / "a.zip", kaggle_members()))  # 4 patients a class in train + val
    with pytest.raises(PipelineError, match=r"data.val_fraction = .* class NORMAL has only 4 patient\(s\) left for "
                                            r"train and val: raise data.val_fraction to at least 0.25"):
        _prepare(val_fraction=val_fraction)
    assert not MANIFESTS.exists()


def test_a_class_left_empty_by_unreadable_images_is_a_message(tmp_path):
    members = {name: (b"not an image" if "/NORMAL/" in name and "/test/" not in name else data)
               for name, data in kaggle_members().items()}
    _download(write_zip(tmp_path / "a.zip", members))
    with pytest.raises(PipelineError, match=r"train \+ val \(before the split\) has no NORMAL image after skipping "
                                            r"8 unreadable image\(s\): every split needs both classes"):
        _prepare(max_unreadable_fraction=1)
    assert not MANIFESTS.exists()


def test_nested_duplicate_tree_and_macos_litter_give_one_copy(tmp_path):
    members = kaggle_members("chest_xray/")
    duplicate = {name.replace("chest_xray/", "chest_xray/chest_xray/", 1): data for name, data in members.items()}
    litter = {f"__MACOSX/{name.rsplit('/', 1)[0]}/._{name.rsplit('/', 1)[1]}": b"\0\5\26\7" for name in members}
    litter["chest_xray/.DS_Store"] = b"\0\0\0\1Bud1"
    archive = write_zip(tmp_path / "a.zip", {**members, **duplicate, **litter})

    source = _download(archive)

    extracted = {p.relative_to(RAW).as_posix(): p.read_bytes() for p in RAW.rglob("*") if p.is_file()}
    expected = {name.removeprefix("chest_xray/"): data for name, data in members.items()}
    assert extracted == {**expected, "source.json": extracted["source.json"]}
    assert source["images"] == {"train": {"NORMAL": 6, "PNEUMONIA": 6}, "val": {"NORMAL": 2, "PNEUMONIA": 2},
                                "test": {"NORMAL": 6, "PNEUMONIA": 6}}
    assert _prepare().summary["unreadable_skipped"] == 0


def test_patient_in_train_and_test_is_kept_out_of_training(tmp_path):
    members = kaggle_members()
    # The same X-rays of one patient shipped in train and in test.
    copied = {name.replace("/test/", "/train/"): data for name, data in members.items()
              if "/test/PNEUMONIA/person2_" in name}
    copied = {name.replace("person2_", "person77_"): data for name, data in copied.items()}
    # Another patient who only shares the `personN` number with a test patient (ids restart per split).
    members["chest_xray/train/PNEUMONIA/person3_virus_9.jpeg"] = jpeg(1234, True)
    _download(write_zip(tmp_path / "a.zip", {**members, **copied}))

    prepared = _prepare()

    test_content = {r.sha256 for r in read_manifest(MANIFESTS / "test.csv")}
    pool = read_manifest(MANIFESTS / "train.csv") + read_manifest(MANIFESTS / "val.csv")
    assert not test_content & {r.sha256 for r in pool}
    assert "data/raw/train/PNEUMONIA/person3_virus_9.jpeg" in {r.path for r in pool}  # not a leak by id alone
    assert prepared.summary["dropped_as_in_test"] == 2
    audit = json.loads(AUDIT.read_text())
    assert audit == prepared.audit
    assert audit["passed"] and audit["official_train_images_also_in_test"] == 2
    assert set(audit["leaks"].values()) == {0}


def test_duplicates_within_a_split_are_reported(tmp_path):
    members = kaggle_members()
    members["chest_xray/test/NORMAL/IM-0299-0001.jpeg"] = members["chest_xray/test/NORMAL/IM-0201-0001.jpeg"]
    _download(write_zip(tmp_path / "a.zip", members))

    audit = _prepare().audit

    assert audit["duplicates_within_split"]["test"] == 1 and audit["passed"]


def _record(name: str, patient: str, content: str, split: str = "train") -> Record:
    return Record(f"data/raw/{split}/NORMAL/{name}", 0, patient, content, split)


def test_audit_catches_a_leaky_split():
    splits = {"train": [_record("a.jpeg", "IM-1", "h1"), _record("b.jpeg", "IM-2", "h2")],
              "val": [_record("c.jpeg", "IM-1", "h3"), _record("d.jpeg", "IM-4", "h2")],
              "test": [_record("e.jpeg", "IM-5", "h3", "test")]}

    audit = audit_splits(splits, official=[])

    assert not audit["passed"]
    assert audit["leaks"] == {"train_val_patients": 1, "train_val_content": 1, "train_test_content": 0,
                              "val_test_content": 1}
    with pytest.raises(PipelineError, match="leakage audit failed: train_val_patients = 1, train_val_content = 1"):
        raise_if_leaked(audit)


@pytest.mark.e2e
def test_the_data_stages_twice_give_identical_bytes(tmp_path):
    """The data stages' scripts, run twice from scratch in a copy of the project, each in a fresh process:
    every output byte-identical, TFRecord shards (of the splits and of an external set) included. None of
    them imports TensorFlow (its import would be most of their time and memory): here it cannot be imported."""
    archive = write_zip(tmp_path / "data.zip", {**kaggle_members(patients=4),
                                                "chest_xray/train/NORMAL/IM-0999-0001.jpeg": b"not an image"})
    external = write_zip(tmp_path / "site.zip", {f"site/{name}/{index}.jpeg": jpeg(500 + index, name == "PNEUMONIA")
                                                 for name in ("NORMAL", "PNEUMONIA") for index in range(3)})
    project = copy_project(tmp_path / "project")
    set_params(project, **{"data.source": "local", "data.local_path": str(archive), "data.val_fraction": 0.25,
                           "data.max_unreadable_fraction": 0.1, "data.image_size": 48,
                           "tfrecords.images_per_shard": 4, "evaluate.external": str(external)})
    outputs = [project / "data", project / "reports" / "data"]
    shutil.rmtree(outputs[1])  # the committed baseline's: from scratch means without it
    blocker = tmp_path / "without_tensorflow" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('a data stage imported TensorFlow')\n")

    hashes = []
    for _ in range(2):
        for stage in ("download", "prepare", "tfrecords", "class_weights", "external", "data_report"):
            run(["python", f"stages/{stage}.py"], project, PYTHONPATH=str(blocker.parent))
        hashes.append(tree_hashes(*outputs))
        for output in outputs:
            shutil.rmtree(output)

    differing = sorted(Path(name).relative_to(project).as_posix() for name in hashes[0]
                       if hashes[0][name] != hashes[1].get(name))
    assert differing == []
    assert hashes[0].keys() == hashes[1].keys()
    names = {Path(name).relative_to(project).as_posix() for name in hashes[0]}
    assert {"data/raw/source.json", "data/manifests/train.csv", "data/manifests/val.csv", "data/manifests/test.csv",
            "data/images.csv", "data/split_counts.json", "data/audit.json", "data/tfrecords/meta.json",
            "data/external/external-00000-of-00002.tfrecord", "data/class_weights.json",
            "reports/data/summary.json"} <= names
    for prefix in ("data/tfrecords/train-", "data/tfrecords/test-", "reports/data/figures/"):
        assert any(name.startswith(prefix) for name in names), prefix


def test_an_archive_extracts_into_a_folder_that_does_not_exist_yet(tmp_path):
    """The free-space check looks at the disk the folder will be on (benchmarks extract into a new data/raw)."""
    from pneumonia.data.download import extract_archive

    archive = write_zip(tmp_path / "archive.zip", kaggle_members())
    extract_archive(archive, tmp_path / "new" / "raw")
    assert len(list((tmp_path / "new" / "raw" / "train" / "NORMAL").iterdir())) == 6


def test_hash_file_names_keeps_pacs_names_out_of_every_output(tmp_path):
    """issue 33: a PACS export names files by patient ID or accession number; with data.hash_file_names those
    names reach neither data/raw (so no manifest, TFRecord or table) nor the external set, and the same name
    always becomes the same stand-in."""
    from pneumonia.data.external import write_external
    from pneumonia.data.layout import hashed_name
    from test_external import CONFIG

    members = {name.replace("IM-", "PID-7Q3X9-"): data for name, data in kaggle_members().items()}
    write_zip(tmp_path / "pacs.zip", members)
    download(DataConfig(source="local", local_path=str(tmp_path / "pacs.zip"), hash_file_names=True), RAW)
    stored = sorted(path.relative_to(RAW).as_posix() for path in RAW.rglob("*.jpeg"))
    expected = sorted(f"{'/'.join(name.split('/')[1:3])}/{hashed_name(name)}" for name in members)
    assert stored == expected and len(stored) == len(members)
    assert hashed_name("a/PID-7Q3X9-0001-0001.jpeg") == hashed_name("PID-7Q3X9-0001-0001.jpeg")  # base name only
    prepared = _prepare()
    assert not [record for split in prepared.splits.values() for record in split if "PID-7Q3X9" in record.path]

    site = tmp_path / "site"
    for label, name in (("NORMAL", "ACC-8675309-1.jpeg"), ("NORMAL", "ACC-8675309-2.jpeg"),
                        ("PNEUMONIA", "ACC-8675309-3.jpeg")):
        (site / label).mkdir(parents=True, exist_ok=True)
        (site / label / name).write_bytes(jpeg(len(name) * 1000 + int(name[-6]), label == "PNEUMONIA"))
    write_image_table(tmp_path / "images.csv", [])
    write_external(site, str(site), tmp_path / "external", tmp_path / "images.csv", 32, CONFIG, 0.0,
                   hash_names=True)
    written = [path for path in (tmp_path / "external").rglob("*") if path.is_file()]
    assert written and not [path for path in written if b"ACC-8675309" in path.read_bytes()]
