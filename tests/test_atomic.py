"""Atomic outputs: complete or absent, never half-written."""

import csv

import pytest

from pneumonia.atomic import atomic_path, write_csv, write_json


def test_file_appears_only_on_success(tmp_path):
    target = tmp_path / "out" / "result.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []  # the temporary is gone too
    write_json(target, {"b": 1, "a": 2})
    assert target.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'


def test_directory_replaces_previous_output_whole(tmp_path):
    target = tmp_path / "raw"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_path(target, directory=True) as temporary:
        (temporary / "new.txt").write_text("new")
        assert not (target / "new.txt").exists()  # invisible until done
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    stale = tmp_path / ".raw.tmp-abc123"
    stale.mkdir()
    with atomic_path(tmp_path / "raw", directory=True):
        pass
    assert not stale.exists()


def test_write_csv(tmp_path):
    write_csv(tmp_path / "t.csv", ["a", "b"], [[1, 2.5], ["x", "y"]])
    assert (tmp_path / "t.csv").read_text() == "a,b\n1,2.5\nx,y\n"


def test_write_csv_quotes_file_names_as_the_csv_module_reads_them(tmp_path):
    """Image file names go into CSVs (reports/evaluation/external_predictions.csv): a comma, a quote or a
    line break in one must come back as the same one value (issue 33)."""
    names = ["scan, left.png", 'the "best" one.dcm', "two\nlines.png", "plain.png"]
    write_csv(tmp_path / "t.csv", ["file_name", "probability"], [[name, 0.25] for name in names])
    with open(tmp_path / "t.csv", newline="") as file:
        assert list(csv.reader(file)) == [["file_name", "probability"], *([name, "0.25"] for name in names)]


def test_outputs_get_ordinary_permissions(tmp_path):
    write_json(tmp_path / "m.json", {})
    with atomic_path(tmp_path / "folder", directory=True):
        pass
    assert (tmp_path / "m.json").stat().st_mode & 0o044 == 0o044  # readable by group and others
    assert (tmp_path / "folder").stat().st_mode & 0o055 == 0o055


def test_a_folder_where_a_file_goes_is_refused_and_leaves_nothing(tmp_path):
    """issue 27: writing a file over a folder failed in os.replace and left the .tmp-* file beside it."""
    from pneumonia.errors import PipelineError

    (tmp_path / "out.csv").mkdir()
    with pytest.raises(PipelineError, match=r"out.csv is a folder: name a file"):
        write_csv(tmp_path / "out.csv", ["a"], [[1]])
    assert [path.name for path in tmp_path.iterdir()] == ["out.csv"]


def test_staged_outputs_appear_together_or_not_at_all(tmp_path):
    """issue 33: the evaluate stage wrote metrics/evaluation.json, reports/evaluation/ and plots/figures, then
    failed in MLflow: the new threshold was used by `pneumonia predict`, the old figures were gone."""
    from pneumonia.atomic import staged_outputs

    metrics, figures = tmp_path / "metrics" / "evaluation.json", tmp_path / "plots" / "figures"
    metrics.parent.mkdir()
    metrics.write_text("old")
    figures.mkdir(parents=True)
    (figures / "old.png").write_text("old")
    (tmp_path / ".evaluate.tmp-stale").mkdir()  # left by a killed run
    with pytest.raises(RuntimeError, match="the MLflow run was deleted"):
        with staged_outputs([metrics, figures], "evaluate") as staged:
            write_json(staged(metrics), {"threshold": 0.1})
            staged(figures).mkdir()
            (staged(figures) / "new.png").write_text("new")
            raise RuntimeError("the MLflow run was deleted")
    assert metrics.read_text() == "old" and [path.name for path in figures.iterdir()] == ["old.png"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics", "plots"]  # no scratch, stale or new

    with pytest.raises(ValueError, match="outputs not written: .*figures"):
        with staged_outputs([metrics, figures], "evaluate") as staged:
            write_json(staged(metrics), {"threshold": 0.1})
    assert metrics.read_text() == "old"

    with staged_outputs([metrics, figures], "evaluate") as staged:
        write_json(staged(metrics), {"threshold": 0.1})
        staged(figures).mkdir()
        (staged(figures) / "new.png").write_text("new")
        assert metrics.read_text() == "old"  # nothing moves before the end
    assert metrics.read_text() == '{\n  "threshold": 0.1\n}\n' and [p.name for p in figures.iterdir()] == ["new.png"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics", "plots"]
