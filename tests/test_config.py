"""Params validation: every mistake stops with the key, the value and what is allowed; `pneumonia check-params`."""

import json
import re

import pytest
import yaml

from conftest import REPO
from pneumonia import paths
from pneumonia.architectures import MODEL_NAMES
from pneumonia.config import flatten, load_params, parse_params, read_params_file
from pneumonia.data.download import local_archive
from pneumonia.errors import PipelineError


def test_repository_params_are_valid_and_complete():
    raw = yaml.safe_load(paths.PARAMS.read_text()) if paths.PARAMS.exists() else None
    if raw is None:  # tests may run from another folder
        from conftest import REPO

        raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = parse_params(raw)
    # The user's contract keys (issue: pipeline spine) exist with these names.
    flat = flatten(params)
    for key in ("data.source", "data.kaggle_dataset", "data.local_path", "data.image_size", "data.val_fraction",
                "data.seed", "model.name", "model.weights", "train.epochs", "train.batch_size",
                "train.learning_rate", "tracking.experiment"):
        assert key in flat
    # A fresh clone runs on the sample committed with it (issue 15).
    assert params.data.source == "local" and params.data.local_path == "data_sample/chest-xray-small.zip"
    assert params.model.name == "custom_cnn"
    # Every key in params.yaml is one the config knows, and vice versa (no silent defaults-only keys).
    assert dotted_keys(raw) == set(flat)


def test_the_schema_defaults_are_the_committed_params():
    """Defaults live in params.yaml; the schema's are the same values, so a key missing from a params file
    means what the committed params.yaml says (its `auto` keys resolved as for its custom_cnn)."""
    from conftest import REPO

    committed = flatten(load_params(REPO / "params.yaml"))
    defaults = flatten(parse_params({}))
    assert {key: (defaults[key], value) for key, value in committed.items() if defaults[key] != value} == {}


def dotted_keys(raw: dict, prefix: str = "") -> set[str]:
    """The leaf keys of a YAML mapping, dotted as `flatten` writes them."""
    keys = set()
    for key, value in raw.items():
        name = f"{prefix}{key}"
        keys |= dotted_keys(value, f"{name}.") if isinstance(value, dict) else {name}
    return keys


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"model": {"name": "resnet9000"}}, ["model.name = 'resnet9000'", "allowed:", "custom_cnn"]),
        ({"train": {"epochs": "ten"}}, ["train.epochs = 'ten'", "integer"]),
        ({"data": {"source": "s3"}}, ["data.source = 's3'", "'kaggle'", "'local'", "'synthetic'"]),
        ({"data": {"imagesize": 64}}, ["data.imagesize", "unknown key"]),
        ({"data": {"val_fraction": 0.9}}, ["data.val_fraction = 0.9", "less than 0.5"]),
        ({"data": {"kaggle_dataset": "owner/name/latest"}}, ["data.kaggle_dataset = 'owner/name/latest'", "pattern"]),
        ({"model": {"weights": "imagenet"}}, ["model.weights = 'imagenet'", "custom_cnn", "'none'"]),
        # issue 16: lax parsing took these for settings
        ({"train": {"epochs": True}}, ["train.epochs = True", "integer"]),
        ({"train": {"epochs": 2.5}}, ["train.epochs = 2.5", "integer"]),
        ({"train": {"deterministic": "yes"}}, ["train.deterministic = 'yes'", "boolean"]),
        ({"train": {"learning_rate": float("inf")}}, ["train.learning_rate = inf", "finite"]),
        ({"train": {"learning_rate": True}}, ["train.learning_rate = True", "not true/false"]),
        ({"model": {"dropout": float("nan")}}, ["model.dropout = nan", "finite"]),
        ({"data": {"local_path": ""}}, ["data.local_path = ''", "at least 1 character"]),
        ({"data": {"local_path": "  "}}, ["data.local_path = '  '", "at least 1 character"]),
        # issue 33: a Literal took true for 1 and 3.0 for 3
        ({"evaluate": {"tta_views": True}}, ["evaluate.tta_views = True", "integer: 1, 3 or 9"]),
        ({"evaluate": {"tta_views": 3.0}}, ["evaluate.tta_views = 3.0", "integer: 1, 3 or 9"]),
        ({"evaluate": {"tta_views": 2}}, ["evaluate.tta_views = 2", "1, 3 or 9"]),
    ],
)
def test_bad_params_name_key_value_and_what_is_allowed(raw, expected):
    with pytest.raises(PipelineError) as error:
        parse_params(raw)
    for fragment in expected:
        assert fragment in str(error.value)


def test_yaml_numbers_and_strings_still_parse():
    # PyYAML reads `1e-4` (no dot) as a string: it must stay a valid learning rate.
    params = parse_params(yaml.safe_load("train:\n  learning_rate: 1e-4\n  epochs: 3\n  deterministic: false\n"
                                         "data:\n  local_path: ' data.zip '\n"))
    assert params.train.learning_rate == 1e-4 and params.train.epochs == 3 and params.train.deterministic is False
    assert params.data.local_path == "data.zip"


def test_image_size_below_a_backbones_minimum_is_refused():
    assert "xception" in MODEL_NAMES
    with pytest.raises(PipelineError, match=r"data.image_size = 64 is below the 71px minimum of model 'xception'"):
        parse_params({"model": {"name": "xception", "crop": 0}, "data": {"image_size": 64}})


def test_the_cropped_image_must_fit_the_model_too():
    """xception needs 71 px: 72 px less a 0.08 crop on each side leaves 60 (its own error, not a traceback)."""
    raw = {"model": {"name": "xception", "weights": "none", "crop": 0.08}, "data": {"image_size": 72}}
    with pytest.raises(PipelineError, match=r"less model.crop = 0.08 on each side leaves 60 px, below the 71px"):
        parse_params(raw)
    assert parse_params({**raw, "data": {"image_size": 88}}).model.cropped_size(88) == 74


def test_missing_local_path_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    params = parse_params({"data": {"source": "local", "local_path": "nowhere.zip"}})
    with pytest.raises(PipelineError, match=r"data.local_path = 'nowhere.zip' does not exist"):
        local_archive(params.data)


def test_relative_local_path_resolves_against_the_repository_root(tmp_path, monkeypatch):
    """Inside `dvc exp run --temp` the working folder is a copy; DVC_ROOT names the real root."""
    (tmp_path / "archive.zip").write_bytes(b"zip")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    params = parse_params({"data": {"source": "local", "local_path": "archive.zip"}})
    assert local_archive(params.data) == tmp_path / "archive.zip"


def test_load_params_reports_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_params(tmp_path / "params.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_params(broken)


def test_flatten_uses_dotted_keys():
    flat = flatten(parse_params({}))
    assert flat["data.synthetic.image_size"] == 96
    assert flat["model.name"] == "custom_cnn"


def test_documented_gpu_profile_is_a_valid_set_of_params():
    """docs/results.md's recommended GPU profile (`dvc exp run -n gpu-profile -S ...`) names real keys and values."""
    import shlex

    from conftest import REPO

    readme = (REPO / "docs" / "results.md").read_text()
    start = readme.index("dvc exp run -n gpu-profile")
    command = readme[start:readme.index("```", start)].replace("\\\n", " ")
    words = shlex.split(command)
    overrides = dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "-S")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in overrides.items():
        *parents, last = key.split(".")
        section = raw
        for parent in parents:
            section = section[parent]
        assert last in section, f"the documented GPU profile sets {key}, which params.yaml does not have"
        section[last] = yaml.safe_load(value)
    params = parse_params(raw)
    assert params.model.weights == "imagenet" and params.model.name != "custom_cnn"
    assert params.train.accelerator == "gpu" and params.train.warmup_epochs > 0


def test_a_kaggle_dataset_version_can_be_pinned():
    assert parse_params({"data": {"kaggle_dataset": "owner/name/12"}}).data.kaggle_dataset == "owner/name/12"


@pytest.mark.parametrize("key", ["tfrecords.uri", "train.backup_uri"])
@pytest.mark.parametrize("uri", ["file://data/shards", "file://./shards", "file://localhost/tmp/shards"])
def test_a_file_uri_must_be_absolute(key, uri):
    """issue 27: TensorFlow reads `file://data/shards` as host `data`, path /shards: it wrote under /."""
    section, name = key.split(".")
    with pytest.raises(PipelineError, match=rf"{key} = '{uri}': a file:// URI must be absolute, file:///"):
        parse_params({section: {name: uri}})
    assert getattr(getattr(parse_params({section: {name: "file:///tmp/shards"}}), section), name) == "file:///tmp/shards"


@pytest.mark.parametrize("key", ["data.seed", "train.seed", "evaluate.seed"])
@pytest.mark.parametrize("seed", [-1, 2**32, 2**70])
def test_a_seed_outside_what_numpy_accepts_is_refused_up_front(key, seed):
    """issue 27: data.seed -1 or train.seed 2**70 passed, then the stage died with a traceback (evaluate's, after
    training). NumPy's legacy seeding (np.random.seed, keras.utils.set_random_seed, scikit-learn) takes 0..2**32-1."""
    section, name = key.split(".")
    with pytest.raises(PipelineError, match=rf"{key} = {seed}: a seed is an integer from 0 to 4294967295"):
        parse_params({section: {name: seed}})
    assert getattr(parse_params({section: {name: 2**32 - 1}}), section).seed == 2**32 - 1


def test_tracking_names_longer_than_mlflow_stores_are_refused():
    """issue 27: a 600-character tracking.experiment was a traceback from MLflow (its stores keep 256)."""
    for key in ("experiment", "register_model"):
        with pytest.raises(PipelineError, match=rf"tracking.{key} = 'xxx.*at most 256 characters"):
            parse_params({"tracking": {key: "x" * 600}})
        assert parse_params({"tracking": {key: "x" * 256}})


def test_an_empty_section_says_so_and_nothing_else(tmp_path):
    """issue 27: an empty `train:` also gave a spurious `model.weights = 'auto'` error."""
    from conftest import REPO

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("\ntrain:\n", "\ntrain:\nunused_train:\n"))
    with pytest.raises(PipelineError) as error:
        load_params(params)
    message = str(error.value)
    assert "train: the section is empty" in message and "model.weights" not in message


def test_a_params_file_that_is_not_utf8_is_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes("tracking:\n  experiment: pneumonie \xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(PipelineError, match=r"params.yaml is not UTF-8 text .*byte 0xe9.*save it as UTF-8"):
        load_params(params)


def test_duplicate_keys_are_refused_as_dvc_refuses_them(tmp_path, capsys):
    """issue 27: PyYAML keeps the last of two equal keys; DVC refuses the file. So do the stages and check-params."""
    from pneumonia import cli

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: 3\n  batch_size: 8\n  epochs: 5\n")
    with pytest.raises(PipelineError, match=r"params.yaml has the key 'epochs' twice .*line 4.*keep one"):
        load_params(params)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check-params", "--params", str(params)])
    assert exit_info.value.code == 2 and "has the key 'epochs' twice" in capsys.readouterr().err
    # A key overriding one merged in (`<<: *anchor`) is not a duplicate, for DVC either.
    params.write_text("x-base: &base\n  epochs: 3\n  batch_size: 8\ntrain:\n  <<: *base\n  epochs: 5\n")
    assert read_params_file(params)["train"] == {"epochs": 5, "batch_size": 8}


# Nine levels of aliases, each ten of the one before: 10**9 strings when expanded, 1 KB on disk.
BILLION_LAUGHS = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 10)}]\n" for level in range(1, 9)) + "model:\n  name: *a8\n"


@pytest.mark.parametrize("text, expected", [
    (BILLION_LAUGHS, r"expands its aliases to more than 100,000 values"),
    (f"model:\n  name: {'x' * 2_000_000}\n", r"is 2\.0 MB: more than the 1 MB a params file may have"),
], ids=["aliases", "bytes"])
def test_an_oversized_params_file_is_refused_in_seconds(tmp_path, text, expected):
    """Before, a billion-laughs `model.name` ran `pneumonia check-params` for minutes and GBs, printing the value."""
    import subprocess

    from conftest import VENV_BIN, tool_env

    (tmp_path / "params.yaml").write_text(text)
    result = subprocess.run([VENV_BIN / "pneumonia", "check-params", "--params", "params.yaml"], cwd=tmp_path,
                            env=tool_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(expected, result.stderr), result.stderr


def test_a_long_value_is_quoted_shortened():
    with pytest.raises(PipelineError) as error:
        parse_params({"model": {"name": "x" * 100_000}, "train": {"epochs": [[1] * 1000] * 1000}})
    message = str(error.value)
    assert "model.name = 'xxxx" in message and "train.epochs = [[1, 1," in message and "..." in message
    assert len(message) < 2000


# --- `pneumonia check-params -S`: what `dvc exp run -S ...` would run with, params.yaml untouched ------------

def check_params(capsys, *args: str) -> tuple[list[dict], str]:
    """`pneumonia check-params ARGS` on the repository's params.yaml: the params printed (one per experiment)
    and stderr."""
    from pneumonia import cli

    before = (REPO / "params.yaml").read_bytes()
    cli.main(["check-params", "--params", str(REPO / "params.yaml"), *args])
    out, err = capsys.readouterr()
    assert (REPO / "params.yaml").read_bytes() == before
    return [json.loads(params) for params in re.split(r"(?<=\n})\n(?={)", out.strip())], err


def test_check_params_applies_dvc_set_params_with_yaml_typed_values(capsys):
    [params], err = check_params(capsys, "-S", "model.name=xception", "-S", "train.learning_rate=2e-3",
                                 "--set-param", "evaluate.threshold=youden", "-S", "tracking.register_model=pneumonia",
                                 "-S", "train.deterministic=false", "-S", "data.image_size=160")
    assert params["model"]["name"] == "xception" and params["model"]["weights"] == "imagenet"  # auto, resolved
    assert params["model"]["input_norm"] == "scale"  # auto: a backbone's own preprocessing
    assert params["train"]["learning_rate"] == 0.002 and params["train"]["deterministic"] is False
    assert params["evaluate"]["threshold"] == "youden" and params["data"]["image_size"] == 160
    assert params["tracking"]["register_model"] == "pneumonia"
    assert "model.weights: auto -> imagenet (model.name xception)" in err
    [params], _ = check_params(capsys, "-S", "evaluate.threshold=0.25", "-S", "tracking.register_model=null")
    assert params["evaluate"]["threshold"] == 0.25 and params["tracking"]["register_model"] is None


def test_check_params_shows_each_experiment_of_a_sweep(capsys):
    printed, err = check_params(capsys, "-S", "model.name=custom_cnn,xception", "-S", "train.learning_rate=0.001")
    assert [(p["model"]["name"], p["model"]["weights"], p["model"]["input_norm"], p["train"]["learning_rate"])
            for p in printed] == [("custom_cnn", "none", "per_image", 0.001), ("xception", "imagenet", "scale", 0.001)]
    assert "experiment 2 of 2: -S model.name=xception -S train.learning_rate=0.001" in err


@pytest.mark.parametrize("setting, message", [
    ("model.nme=xception", r"-S model\.nme=xception: Could not override 'model\.nme'"),  # no such key: DVC refuses
    ("model.name=[", r"-S model\.name=\[: .* Use KEY=VALUE"),  # not Hydra's override grammar
    ("data.image_size=abc", r"params\.yaml -S data\.image_size=abc has invalid params:\n  - data\.image_size = 'abc'"),
])
def test_check_params_refuses_what_dvc_or_the_stages_would(capsys, setting, message):
    with pytest.raises(SystemExit) as exited:
        check_params(capsys, "-S", setting)
    assert exited.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("command", ["check-params", "compare"])
def test_commands_describe_themselves_in_help(capsys, command):
    from pneumonia import cli

    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    usage, described = capsys.readouterr().out.split("\n\n", 2)[:2]
    assert not described.startswith(("options:", "positional arguments:")), described  # not only the options
    assert len(described.split()) > 20, described
