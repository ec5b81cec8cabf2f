"""DVC stage `download`: the dataset from Kaggle, a local archive or the synthetic generator -> data/raw,
and the archive's record -> data_archive.json."""

from pneumonia import paths
from pneumonia.atomic import write_json
from pneumonia.config import load_params
from pneumonia.data.download import archive_record, download
from pneumonia.logs import run_stage


def main() -> None:
    params = load_params()
    source = download(params.data, paths.RAW, paths.ARCHIVE_RECORD)
    write_json(paths.ARCHIVE_RECORD, archive_record(source))


if __name__ == "__main__":
    run_stage(main)
