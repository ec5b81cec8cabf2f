"""DVC stage `train`: fit the configured model -> models/, per-epoch history and best validation metrics."""

import json

from pneumonia import paths, tracking, training
from pneumonia.atomic import write_csv, write_json
from pneumonia.config import load_params
from pneumonia.logs import run_stage


def main() -> None:
    params = load_params()
    class_weight = {int(label): weight for label, weight in json.loads(paths.CLASS_WEIGHTS.read_text()).items()}
    with tracking.training_run(params, paths.MANIFESTS) as run:
        result = training.train(params, paths.TFRECORDS, class_weight, paths.MODEL)

        epochs = range(1, len(next(iter(result.history.values()))) + 1)
        names = sorted(result.history)
        write_csv(paths.TRAIN_HISTORY, ["epoch", *names],
                  [[epoch, *(result.history[name][epoch - 1] for name in names)] for epoch in epochs])
        summary = {
            **{f"best_{name}": value for name, value in result.best_metrics().items()},
            "best_epoch": result.best_epoch + 1,
            "epochs_trained": len(epochs),
            "train_seconds": round(result.seconds, 1),
            "total_params": result.total_params,
            "trainable_params": result.trainable_params,
        }
        write_json(paths.TRAIN_METRICS, summary)
        tracking.log_training(summary, paths.MODEL, inputs={
            "class_weights": paths.CLASS_WEIGHTS, "data_counts": paths.DATA_METRICS, "source": paths.RAW_SOURCE,
        })
        tracking.write_run_info(run, paths.RUN_INFO)


if __name__ == "__main__":
    run_stage(main)
