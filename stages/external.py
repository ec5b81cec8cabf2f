"""DVC stage `external`: evaluate.external (another site's X-rays) checked against the pipeline's own
images and written as TFRecords like the splits -> data/external; without one, only its meta.json."""

from pneumonia import paths
from pneumonia.config import load_params
from pneumonia.data.external import write_external
from pneumonia.logs import run_stage


def main() -> None:
    params = load_params()
    source = params.evaluate.external
    write_external(paths.resolve_user_path(source) if source else None, source, paths.EXTERNAL, paths.IMAGE_TABLE,
                   params.data.image_size, params.tfrecords, params.data.max_unreadable_fraction,
                   params.evaluate.input_checks, params.data.hash_file_names)


if __name__ == "__main__":
    run_stage(main)
