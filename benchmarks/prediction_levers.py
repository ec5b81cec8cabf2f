"""Levers that need no training, measured on the models external_validity kept (`--keep-models DIR`):
test-time augmentation (the mean probability over fixed views of each image) and ensembles of the
seeds' models (the mean of their probabilities), alone and together.

    python -m benchmarks.prediction_levers --models DIR --profile default
    python -m benchmarks.prediction_levers --models DIR --profile default --rules sensitivity@0.9 sensitivity@0.93

Each way of predicting chooses its own threshold on validation with the pipeline's rule
(evaluate.threshold, or each of --rules) and is scored on the external set at it, like the evaluate
stage; the external set chooses nothing. Results go to <out>/prediction_levers-<profile>.json and .md;
"min sensitivity" is the lowest over the combinations of seeds (the target asks for every seed).
"""

import argparse
import itertools
import json
import statistics
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, SCORE_COLUMNS, write_report
from pneumonia.atomic import write_text


def view_probabilities(model, images: np.ndarray, views: int, batch_size: int = 64) -> np.ndarray:
    """The mean probability of pneumonia over the views of each image (evaluate.tta_views)."""
    from pneumonia.evaluation.predictions import pneumonia_probability
    from pneumonia.models.augmentation import with_test_time_augmentation

    predictor = with_test_time_augmentation(model, views)
    return pneumonia_probability(np.concatenate([predictor.predict_on_batch(images[start:start + batch_size])
                                                 for start in range(0, len(images), batch_size)]))


def kept_split(tfrecords: Path, split: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A split external_validity kept: its labels, file names and images (uint8), in file order."""
    from pneumonia.data import dataset
    from pneumonia.evaluation.predictions import images_at

    labels, names = dataset.labels_and_names(tfrecords, split)
    return np.array(labels), names, images_at(tfrecords, split, list(range(len(labels))))


def kept_seeds(models: Path, profile: str) -> list[int]:
    """The seeds of the profile's kept models (<models>/<profile>-<seed>.keras)."""
    return sorted(int(path.stem.rsplit("-", 1)[1]) for path in models.glob(f"{profile}-*.keras"))


def scores(val_labels, val_probabilities, labels, probabilities, rule) -> dict:
    from pneumonia.evaluation.metrics import classification_metrics
    from pneumonia.evaluation.threshold import choose_threshold

    threshold = choose_threshold(val_labels, val_probabilities, rule)
    found = classification_metrics(labels, probabilities, threshold)
    return {"threshold": threshold, **{name: found[name] for name in SCORE_COLUMNS}}


def markdown(report: dict) -> str:
    """The report's tables: every way of predicting (mean ± sd over the combinations of seeds of a size), then
    the ensembles as `train.ensemble_members` trains them (members seed, seed + 1, ...), one view, per seed."""
    rows, views_all = report["rows"], report["views"]
    lines = [f"Profile {report['profile']}; external set, each way's threshold chosen on validation by the rule "
             "(mean ± sd over the combinations of seeds of that size).", "",
             "| rule | members | views | " + " | ".join(SCORE_COLUMNS) + " | min sensitivity |",
             "|---|---|---|" + "---|" * (len(SCORE_COLUMNS) + 1)]
    for rule, size, views in itertools.product(report["rules"], sorted({len(row["members"]) for row in rows}),
                                               views_all):
        group = [row for row in rows if (row["rule"], len(row["members"]), row["views"]) == (rule, size, views)]
        cells = [f"{statistics.fmean(r[m] for r in group):.3f}"
                 + (f" ± {statistics.stdev(r[m] for r in group):.3f}" if len(group) > 1 else "")
                 for m in SCORE_COLUMNS]
        lowest = min(r["sensitivity"] for r in group)
        lines.append(f"| {rule} | {size} | {views} | " + " | ".join(cells) + f" | {lowest:.3f} |")
    seeds = sorted({seed for row in rows for seed in row["members"]})
    trained = [row for row in rows if row["views"] == 1 and len(row["members"]) > 1
               and row["members"] == list(range(row["members"][0], row["members"][0] + len(row["members"])))]
    if trained:
        lines += ["", f"As `train.ensemble_members: N` trains them (-S train.seed=S: members S, S + 1, ...), one "
                  f"view; the seeds whose members were all run ({', '.join(map(str, seeds))}):", "",
                  "| rule | members | " + " | ".join(SCORE_COLUMNS) + " |", "|---|---|" + "---|" * len(SCORE_COLUMNS)]
        lines += [f"| {row['rule']} | {', '.join(map(str, row['members']))} | "
                  + " | ".join(f"{row[m]:.3f}" for m in SCORE_COLUMNS) + " |" for row in trained]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, help="external_validity's --keep-models folder")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--rules", nargs="+", default=None,
                        help="threshold rules (default: params.yaml's evaluate.threshold)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--tables-only", action="store_true", help="no predictions: the .md from the existing .json")
    args = parser.parse_args(argv)
    if args.tables_only:
        report = json.loads((args.out / f"prediction_levers-{args.profile}.json").read_text())
        write_text(args.out / f"prediction_levers-{args.profile}.md", markdown(report))
        return
    if args.models is None:
        parser.error("--models is required, unless --tables-only")

    from pneumonia.config import load_params
    from pneumonia.data.external import SPLIT
    from pneumonia.models.augmentation import TEST_TIME_VIEWS
    from pneumonia.models.build import load_model

    rules = args.rules or [load_params(REPO / "params.yaml").evaluate.threshold]
    data = args.models / args.profile / "data"
    splits = {}
    for name, tfrecords, split in (("val", data / "tfrecords", "val"), ("external", data / "external", SPLIT)):
        labels, _, images = kept_split(tfrecords, split)
        splits[name] = (labels, images)
    seeds = kept_seeds(args.models, args.profile)
    probabilities = {}  # (seed, views) -> {split: probabilities}
    for seed in seeds:
        model = load_model(args.models / f"{args.profile}-{seed}.keras")
        for views in TEST_TIME_VIEWS:
            probabilities[seed, views] = {split: view_probabilities(model, images, views)
                                          for split, (_, images) in splits.items()}
    rows = []
    for rule, size in itertools.product(rules, sorted({1, 2, 3, len(seeds)} & set(range(1, len(seeds) + 1)))):
        for members in itertools.combinations(seeds, size):
            for views in TEST_TIME_VIEWS:
                mean = {split: np.mean([probabilities[seed, views][split] for seed in members], axis=0)
                        for split in splits}
                rows.append({"rule": str(rule), "members": list(members), "views": views,
                             **scores(splits["val"][0], mean["val"], splits["external"][0], mean["external"], rule)})
    report = {"profile": args.profile, "rules": [str(rule) for rule in rules], "views": list(TEST_TIME_VIEWS),
              "rows": rows}
    write_report(args.out, f"prediction_levers-{args.profile}", report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
