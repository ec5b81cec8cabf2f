"""Target 7: inference keeps up with training, and the served model answers one image fast.

- `pneumonia predict` (inference.predict_files) on `predict_images` full-resolution stand-in JPEGs
  (1000 at 1800x1500 in the full run, see common.standins), and the evaluate stage's prediction
  (evaluation.predictions.predict_split) on the same images as TFRecords: images/s, against the
  training input rate, the images/s the training tf.data pipeline (dataset.training_batches)
  delivers to `fit` on the same machine and model. That is the rate to compare with: the pipeline's
  own read rate with nothing consuming it (target 2, thousands of pre-resized images/s) is far
  above what any forward pass on 2 cores reaches, while training runs at the compute limit (target 1).
  Target: both >= 1 x the training input rate. A forward pass costs about a third of a training
  step, so predicting slower than training would mean that decoding the files, not the model, is
  the limit. `predict` is also timed as it was before (each batch of 32 files decoded in the calling
  thread, then `model.predict`), alternately with the current code (a pool of threads decoding
  two batches ahead of the model, `predict_on_batch`).
- The served model: serving.log_model of the same model, served by the real `mlflow models serve`
  (as docs/serving.md runs it) on 127.0.0.1; N concurrent clients (threads, one HTTP session each)
  each post one full-resolution stand-in at a time. Per N: p50 and p99 latency of a request and
  images/s. Target: p99 <= 500 ms with one client, the latency of a clinician's single upload.
- Start-up: `pneumonia predict` on one full-resolution stand-in, a fresh process each (issue 36), with the
  bundle's model.onnx (ONNX Runtime, no TensorFlow) and without it (Keras), alternately: wall and CPU
  seconds of each run. Target: under 4 s wall with model.onnx.

The model is the default profile's network (params.yaml), fitted for the few steps that time training:
its weights do not change the speed. Reproduce: `python -m benchmarks.inference [--smoke]`. With
`--members N` (or train.ensemble_members > 1 in params.yaml) it is an ensemble of N such networks
(models.build.ensemble_of) in predict, evaluate and the served model, and its training images/s are a
member's divided by N (the members train one after another).

What an ensemble (train.ensemble_members) costs when predicting: `python -m benchmarks.inference --ensemble
A.keras B.keras C.keras [--json FILE]` times the ensembles of the first 1, 2, 3 of the trained models
(models.build.ensemble_of), each through the Classifier that `pneumonia predict` and the served model use,
on decoded images at the models' size: the forward passes, which grow with the members (decoding a file
does not).
"""

import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import harness
from benchmarks.common import (
    REPO,
    Scale,
    epoch_timer,
    load_during,
    main,
    manifests_for_tfrecords,
    median,
    prepared_sample,
    quiet_tensorflow,
    standins,
    timed,
)
from pneumonia.atomic import write_json

TARGET_RATIO = 1.0
TARGET_P99_MS = 500.0
TARGET_STARTUP_SECONDS = 4.0
SERVER_START_SECONDS = 300  # TensorFlow import and model load on a busy 2-core machine


def run(workdir: Path, scale: Scale, sample_zip: Path, members: int | None = None) -> dict:
    import keras
    import numpy as np

    from pneumonia import engines, inference
    from pneumonia.classifier import IMAGES_PER_PASS, Classifier
    from pneumonia.config import load_params
    from pneumonia.data import dataset
    from pneumonia.data.tfrecords import write_tfrecords
    from pneumonia.engines import KerasEngine
    from pneumonia.evaluation.predictions import predict_split
    from pneumonia.model_settings import write_beside
    from pneumonia.models.build import build_model, ensemble_of
    from pneumonia.training import fit, recipe

    params = load_params(REPO / "params.yaml")
    members = members or params.train.ensemble_members
    size, batch_size = params.data.image_size, params.train.batch_size
    _, records = standins(workdir, prepared_sample(workdir, sample_zip, scale.sample_every),
                          scale.predict_images, scale.standin_size)
    files = [Path(record.path) for record in records]
    tfrecords = workdir / f"standin-tfrecords-{len(records)}-{size}"
    if not tfrecords.exists():
        write_tfrecords(manifests_for_tfrecords(workdir / "standin-manifests", {"train": records}), tfrecords, size,
                        params.tfrecords)

    keras.utils.set_random_seed(params.train.seed)
    networks = [build_model(params.model, size, params.train.augment) for _ in range(members)]
    for network in networks:
        recipe.prepare_stage(network, params.model, params.train, recipe.stages(params.train)[0], scale.train_steps)
    model = networks[0] if members == 1 else ensemble_of(networks)
    # predict as it runs: with the out-of-distribution score (a reference of the stand-ins: its values do not
    # change the work)
    reference = stand_in_reference(model, tfrecords, batch_size)
    classifier = Classifier(KerasEngine(model), threshold=0.5, jpeg_quality=params.tfrecords.jpeg_quality,
                            ood=reference)

    def training_rate() -> float:  # of the whole model: an ensemble trains its members one after another
        timer = epoch_timer()
        batches = dataset.training_batches(tfrecords, batch_size, params.train.seed)
        networks[0].fit(fit.labelled_for(params.model.output, batches),
                        epochs=scale.train_epochs, steps_per_epoch=scale.train_steps, callbacks=[timer], verbose=0)
        return median([scale.train_steps * batch_size / seconds for seconds in timer.seconds[1:]]) / members

    def before(chosen: list[Path]) -> None:  # predict_files before: each batch decoded in this thread, model.predict
        step = IMAGES_PER_PASS
        for start in range(0, len(chosen), step):
            model.predict(np.stack([classifier.preprocess(file) for file in chosen[start:start + step]]),
                          batch_size=step, verbose=0)

    def after(chosen: list[Path]) -> None:
        inference.predict_files(classifier, chosen)

    for warm_up in (before, after):  # tracing the predict functions: for a full batch and a partial one
        warm_up(files[:IMAGES_PER_PASS + 1])
    sides = {
        "training": training_rate,
        "predict_before": lambda: len(files) / timed(lambda: before(files)),
        "predict": lambda: len(files) / timed(lambda: after(files)),
        "evaluate": lambda: len(files) / timed(lambda: predict_split(model, tfrecords, "train", batch_size)),
    }
    result: dict = {"model": params.model.name, "members": members, "image_size": size, "predict_images": len(files),
                    "standin_size": list(scale.standin_size)}
    with load_during(result):
        rounds = [{side: measure() for side, measure in sides.items()} for _ in range(scale.repeats)]
        model_path = workdir / f"inference-model-{members}.keras"  # each its own MLflow store (serve_and_load)
        model.save(model_path)
        write_beside(model_path, stand_in_settings(model_path, params, reference, len(records)), reference,
                     engines.onnx_model(model))  # as the evaluate stage writes a bundle
        served = serve_and_load(workdir, model_path, files[0].read_bytes(), scale)
        startup = predict_startup(workdir, model_path, files[0], scale)
    rates = {side: median([r[side] for r in rounds]) for side in sides}
    ratios = {side: rates[side] / rates["training"] for side in ("predict", "evaluate")}
    one_client = served["clients"][str(scale.serve_clients[0])]
    return {
        "target": (f"the same for an ensemble of {members}" if members > 1 else
                   f"`pneumonia predict` (full-resolution JPEGs) and the evaluate stage's prediction images/s "
                   f">= {TARGET_RATIO:g} x the training input rate; served p99 latency of one image "
                   f"<= {TARGET_P99_MS:g} ms (1 client)"),
        "measured": measured(rates, ratios, served["clients"], startup),
        "met": (min(ratios.values()) >= TARGET_RATIO and one_client["p99_ms"] <= TARGET_P99_MS
                and max(startup["onnx"]["wall_seconds"]) < TARGET_STARTUP_SECONDS),
        "images_per_second": {side: round(rate, 1) for side, rate in rates.items()},
        "ratios_to_training": {side: round(ratio, 2) for side, ratio in ratios.items()},
        "rounds": [{side: round(rate, 1) for side, rate in r.items()} for r in rounds],
        "served": served,
        "startup": startup,
        **result,
    }


def measured(rates: dict[str, float], ratios: dict[str, float], clients: dict[str, dict], startup: dict) -> str:
    """The report's line: the images/s of each side (`rates`) and their `ratios` to training, the served
    latencies with the fewest and the most concurrent `clients` ({number: its level of serve_and_load}), and
    one-image predict's wall seconds by engine (predict_startup's `startup`)."""
    fewest, most = min(clients, key=int), max(clients, key=int)
    started = ", ".join(f"{engine} {median(runs['wall_seconds']):.1f} s" for engine, runs in startup.items())
    return (f"predict {ratios['predict']:.2f} x ({rates['predict']:.0f} vs "
            f"{rates['training']:.0f} images/s; {rates['predict'] / rates['predict_before']:.2f} x before), evaluate "
            f"{ratios['evaluate']:.2f} x ({rates['evaluate']:.0f}); served p50 / p99 "
            f"{clients[fewest]['p50_ms']:.0f} / {clients[fewest]['p99_ms']:.0f} ms at {fewest} client, "
            f"{clients[most]['p50_ms']:.0f} / {clients[most]['p99_ms']:.0f} ms at {most} "
            f"({clients[most]['images_per_second']:.1f} images/s); one-image predict {started}")


def predict_startup(workdir: Path, model_path: Path, image: Path, scale: Scale) -> dict:
    """Wall and CPU seconds (user + system) of `pneumonia predict IMAGE --model BUNDLE`, a fresh process each,
    `scale.repeats` times for each of scale.startup_engines in turn: "onnx" the bundle of `model_path` as it is,
    "keras" a copy without its .onnx."""
    import resource
    import subprocess

    from pneumonia.model_settings import onnx_file

    keras_only = workdir / f"{model_path.stem}-keras" / model_path.name
    shutil.rmtree(keras_only.parent, ignore_errors=True)
    keras_only.parent.mkdir()
    for file in model_path.parent.glob(f"{model_path.stem}.*"):
        if file != onnx_file(model_path):
            shutil.copy(file, keras_only.parent)
    bundles = {"onnx": model_path, "keras": keras_only}
    runs: dict[str, dict[str, list[float]]] = {engine: {"wall_seconds": [], "cpu_seconds": []}
                                               for engine in scale.startup_engines}
    for _ in range(scale.repeats):
        for engine in scale.startup_engines:
            command = [sys.executable, "-c", "from pneumonia.cli import main; main()", "predict", str(image),
                       "--model", str(bundles[engine])]
            before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            subprocess.run(command, capture_output=True, check=True)
            seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
            runs[engine]["wall_seconds"].append(round(seconds, 2))
            runs[engine]["cpu_seconds"].append(round(after.ru_utime + after.ru_stime - before.ru_utime
                                                     - before.ru_stime, 2))
    return runs


def stand_in_reference(model, tfrecords: Path, batch_size: int):
    """An out-of-distribution reference fitted (and scaled) on the stand-ins' split, as evaluate fits one."""
    from pneumonia import ood

    _, *inputs, detail = ood.split_outputs(ood.pooled_features_model(model), tfrecords, "train", batch_size)
    return ood.fit(tuple(inputs), tuple(inputs), 0.01, detail)


def stand_in_settings(model_path: Path, params, reference, images: int):
    """The settings the evaluate stage would write for the benchmark's model (threshold 0.5, no calibration)."""
    from pneumonia import CLASS_NAMES, ood
    from pneumonia.model_settings import ModelSettings, OodSettings, TrainingData, model_digest

    return ModelSettings(
        model_sha256=model_digest(model_path), model_name=params.model.name, class_names=CLASS_NAMES,
        image_size=params.data.image_size, input_norm=params.model.input_norm, crop=params.model.crop,
        jpeg_quality=params.tfrecords.jpeg_quality, tta_views=1, threshold=0.5, threshold_rule="0.5",
        input_checks=params.evaluate.input_checks,
        ood=OodSettings(method=ood.METHOD, threshold=reference.threshold, validation_flagged=0.01),
        training_data=TrainingData(source="stand-ins", archive_sha256=None, manifests_sha256="0" * 64,
                                   images={"train": images}), git_commit=None)


def serve_and_load(workdir: Path, model_path: Path, image: bytes, scale: Scale) -> dict:
    """Log the model with serving.log_model into a store of its own, serve it, and time one-image
    requests from each number of concurrent clients: latency percentiles (ms) and images/s."""
    import mlflow
    import requests

    from pneumonia import serving

    store = workdir / f"{model_path.stem}-mlflow"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("inference", artifact_location=(store / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        serving.log_model(model_path)  # the bundle: the settings beside it
    body = json.dumps({"dataframe_split": {"columns": [serving.IMAGE_COLUMN], "data": [[serving.encode_image(image)]]}})

    def client(url: str, count: int) -> list[float]:
        """Seconds of each of `count` requests, one after the other."""
        latencies = []
        with requests.Session() as session:
            for _ in range(count):
                started = time.perf_counter()
                session.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"},
                             timeout=120).raise_for_status()
                latencies.append(time.perf_counter() - started)
        return latencies

    levels = {}
    with harness.mlflow_model_server(f"runs:/{run.info.run_id}/model", uri, store / "server.log",
                                      SERVER_START_SECONDS) as (url, _, start_seconds):
        client(url, 3)  # warm-up: the first request traces the model's predict function
        for clients in scale.serve_clients:
            with ThreadPoolExecutor(clients) as pool:
                started = time.perf_counter()
                count = max(1, scale.serve_requests // clients)
                latencies = [s for one in pool.map(client, [url] * clients, [count] * clients) for s in one]
                wall = time.perf_counter() - started
            p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98]
            levels[str(clients)] = {"requests": len(latencies), "p50_ms": round(median(latencies) * 1000, 1),
                                    "p99_ms": round(p99 * 1000, 1),
                                    "images_per_second": round(len(latencies) / wall, 1)}
    return {"server_start_seconds": round(start_seconds, 1), "image_bytes": len(image), "clients": levels}


def ensemble_speed(model_files: list[Path], images: int = 512, repeats: int = 5) -> dict:
    """Images/s of the ensembles of the first 1, 2, ... of `model_files` (the median of `repeats` rounds, each
    timing every ensemble in turn, so that a burst of load hits them alike; one pass over `images` images of
    random content, which does not change the speed), and each against one model."""
    import numpy as np

    from pneumonia.classifier import IMAGES_PER_PASS, Classifier
    from pneumonia.engines import KerasEngine
    from pneumonia.models.build import ensemble_of, load_model

    models = [load_model(path) for path in model_files]
    size = int(models[0].input_shape[1])
    batch = list(np.random.default_rng(0).integers(0, 256, (images, size, size, 3), dtype=np.uint8))
    classifiers = {members: Classifier(KerasEngine(models[0] if members == 1 else ensemble_of(models[:members])),
                                       0.5, 95)
                   for members in range(1, len(models) + 1)}
    for classifier in classifiers.values():
        classifier.probabilities(batch[:IMAGES_PER_PASS])  # warm-up: tracing the predict function
    result = {"models": [path.name for path in model_files], "image_size": size, "images": images,
              "repeats": repeats}
    with load_during(result):
        rounds = [{members: images / timed(partial(classifier.probabilities, batch))
                   for members, classifier in classifiers.items()} for _ in range(repeats)]
    rates = {members: median([one[members] for one in rounds]) for members in classifiers}
    return {**result, "images_per_second": {str(members): round(rate, 1) for members, rate in rates.items()},
            "ratio_to_one_model": {str(members): round(rate / rates[1], 2) for members, rate in rates.items()},
            "rounds": [{str(members): round(rate, 1) for members, rate in one.items()} for one in rounds]}


def ensemble_main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="prediction images/s of ensembles of 1, 2, ... trained models")
    parser.add_argument("--ensemble", type=Path, nargs="+", required=True, metavar="MODEL",
                        help=".keras files of one profile's seeds (benchmarks.external_validity --keep-models)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--json", type=Path, help="write the result here instead of printing it")
    args = parser.parse_args()
    quiet_tensorflow()
    result = ensemble_speed(args.ensemble, args.images)
    write_json(args.json, result, sort_keys=False) if args.json else print(json.dumps(result, indent=2))


if __name__ == "__main__":
    ensemble_main() if "--ensemble" in sys.argv else main(run, {"members": int})
