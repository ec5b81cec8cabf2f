"""DVC stage `download`: the dataset from Kaggle, a local archive or the synthetic generator -> data/raw."""

from pneumonia import paths
from pneumonia.config import load_params
from pneumonia.data.download import download
from pneumonia.logs import run_stage


def main() -> None:
    params = load_params()
    download(params.data, paths.RAW, paths.ARCHIVE_RECORD)


if __name__ == "__main__":
    run_stage(main)
