"""Adapting kept models to the external site from its unlabelled X-rays (`pneumonia adapt`'s methods),
measured honestly on the models external_validity kept (`--keep-models DIR`):

    python -m benchmarks.site_adaptation --models DIR --profile per_image
    python -m benchmarks.site_adaptation --models DIR --profile default --gamma 0.5   # a site of another tone curve

For each seed's model, the run's threshold is chosen on validation with the pipeline's rule
(evaluate.threshold), as the evaluate stage chose it. Each adaptation (batch-norm statistics, the class
prior, self-training) is fitted on the unlabelled images of a random half of the external patients and
scored on the other half at that threshold, both ways, ADAPT_HALVINGS halvings
(external_validity.adaptation_scores, which external_validity's runs use too); the model unadapted is
scored on the same halves. The labels only score: nothing is chosen on them. With --gamma G, every external image
(the model's input, as kept) goes through the gamma curve 255 (x / 255)^G first: a site whose window or look-up table
differs (benchmarks/tone_curves.py). Results go to <out>/site_adaptation-<profile>.json and .md
(site_adaptation-<profile>-gamma_<G>.* with --gamma).
"""

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import REPO, load_during, measured_on
from benchmarks.external_validity import ADAPT_HALVINGS, adaptation_scores
from benchmarks.prediction_levers import kept_seeds, kept_split, view_probabilities
from benchmarks.run_all import machine
from benchmarks.tone_curves import gamma_curve
from pneumonia.atomic import write_json, write_text

# the operating point first: what adaptation moves (ROC AUC it barely does)
ADAPTATION_COLUMNS = ("sensitivity", "specificity", "accuracy", "roc_auc")
ADAPTATIONS = {"unadapted": "none", "batch_norm_adapted": "batch-norm statistics (AdaBN)",
               "prior_adjusted": "class prior (EM)", "self_trained": "self-training (AdaBN, then pseudo-labels)"}


def seed_scores(model_path: Path, data: Path, rule, halvings: int, gamma: float = 1.0) -> dict:
    """One kept model: its threshold on validation and the adaptations' scores on the external set (its images
    through the gamma curve)."""
    from pneumonia.data.external import SPLIT
    from pneumonia.data.prepare import patient_id
    from pneumonia.evaluation.threshold import choose_threshold
    from pneumonia.models.build import load_model

    model = load_model(model_path)
    val_labels, _, val_images = kept_split(data / "tfrecords", "val")
    threshold = choose_threshold(val_labels, view_probabilities(model, val_images, 1), rule)
    labels, names, images = kept_split(data / "external", SPLIT)
    images = images if gamma == 1 else gamma_curve(gamma)[images]
    started = time.perf_counter()
    found = adaptation_scores(model, threshold, labels, images, [patient_id(name) for name in names], halvings)
    return {"threshold": threshold, **found, "seconds": round(time.perf_counter() - started, 1)}


def markdown(report: dict) -> str:
    seeds = report["seeds"]

    def cell(name: str, metric: str) -> str:
        values = [found[name][metric] for found in seeds.values() if found[name] is not None]
        if not values:
            return "n/a"
        return f"{statistics.fmean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")

    toned = "" if report["gamma"] == 1 else f", every external image through the gamma curve {report['gamma']:g}"
    lines = [f"Profile {report['profile']}, seeds {', '.join(seeds)}, rule {report['rule']}{toned}. External set: each "
             "adaptation fitted on the unlabelled images of a random half of the patients and scored on the other "
             f"half at the run's threshold (chosen on validation), {report['halvings']} halvings, both ways; mean ± "
             "sd over seeds of each seed's mean over the halves.", "",
             "| adaptation | " + " | ".join(metric.replace("_", " ") for metric in ADAPTATION_COLUMNS) + " |",
             "|---|" + "---|" * len(ADAPTATION_COLUMNS)]
    lines += [f"| {label} | " + " | ".join(cell(name, metric) for metric in ADAPTATION_COLUMNS) + " |"
              for name, label in ADAPTATIONS.items()]
    lines += ["", "Each seed (sensitivity / specificity / accuracy / ROC AUC):", "",
              "| seed | threshold | " + " | ".join(ADAPTATIONS.values()) + " | self-training refused | seconds a "
              "self-training |", "|---|---|" + "---|" * (len(ADAPTATIONS) + 2)]
    for seed, found in seeds.items():
        points = [" / ".join(f"{found[name][metric]:.3f}" for metric in ADAPTATION_COLUMNS) if found[name] else "n/a"
                  for name in ADAPTATIONS]
        took = f"{found['self_training_seconds']:.1f}" if found["self_training_seconds"] else "n/a"
        lines.append(f"| {seed} | {found['threshold']:.3f} | " + " | ".join(points)
                     + f" | {found['self_training_refused']} of {2 * report['halvings']} | {took} |")
    lines += ["", measured_on(report)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="external_validity's --keep-models folder")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--rule", default=None, help="threshold rule (default: params.yaml's evaluate.threshold)")
    parser.add_argument("--halvings", type=int, default=ADAPT_HALVINGS)
    parser.add_argument("--gamma", type=float, default=1.0, help="the external images through this gamma curve")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args(argv)
    if not args.gamma > 0:
        parser.error(f"--gamma {args.gamma:g}: a gamma curve's exponent is above 0 (e.g. 0.5 or 2; 1: as they are)")

    from pneumonia.config import load_params

    rule = args.rule or load_params(REPO / "params.yaml").evaluate.threshold
    seeds = kept_seeds(args.models, args.profile)
    if not seeds:
        parser.error(f"no {args.profile}-<seed>.keras in {args.models}")
    name = f"site_adaptation-{args.profile}" + ("" if args.gamma == 1 else f"-gamma_{args.gamma:g}")
    report = {"profile": args.profile, "rule": str(rule), "halvings": args.halvings, "gamma": args.gamma, "seeds": {},
              "command": f"python -m benchmarks.site_adaptation --models DIR --profile {args.profile}"
                         + ("" if args.gamma == 1 else f" --gamma {args.gamma:g}")
                         + ("" if args.halvings == ADAPT_HALVINGS else f" --halvings {args.halvings}"),
              "date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine()}
    with load_during(report):
        for seed in seeds:
            report["seeds"][str(seed)] = seed_scores(args.models / f"{args.profile}-{seed}.keras",
                                                     args.models / args.profile / "data", rule, args.halvings,
                                                     args.gamma)
            print(json.dumps({"seed": seed, **report["seeds"][str(seed)]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{name}.json", report, sort_keys=False)
    table = markdown(report)
    write_text(args.out / f"{name}.md", table)
    print(table)


if __name__ == "__main__":
    main()
