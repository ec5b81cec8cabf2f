"""The model card of a run (Mitchell et al., "Model Cards for Model Reporting", 2019): what the model is for
and not for, its data, its metrics with confidence intervals on the test split and on the external set,
its operating point, its known limits and its input checks. Made from the run's settings and scores, as
sections of short lines: the evaluate stage writes them as docs/model_card.md and as a section of the
HTML report.
"""

from typing import Any

from pneumonia.model_settings import ModelSettings

Sections = list[tuple[str, list[str]]]  # (heading, lines: a line is a bullet)


def _interval(scores: dict[str, Any], key: str) -> str:
    value = scores.get(key)
    if value is None:
        return "n/a"
    interval = scores.get("ci95", {}).get(key)
    if not interval or None in interval.values():
        return f"{value:.3f}"
    return f"{value:.3f} (95% CI {interval['low']:.3f} to {interval['high']:.3f})"


def _metrics(scores: dict[str, Any]) -> str:
    return ", ".join(f"{name} {_interval(scores, key)}" for key, name in
                     (("roc_auc", "ROC AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                      ("accuracy", "accuracy"), ("ece", "calibration error (ECE)")))


def sections(settings: ModelSettings, test: dict[str, Any], external: dict[str, Any] | None,
             images: dict[str, dict[str, int]]) -> Sections:
    use = settings.intended_use
    low, high = use.age_years
    data = settings.training_data
    counts = "; ".join(f"{split} {sum(classes.values())} ({', '.join(f'{n} {c}' for c, n in classes.items())})"
                       for split, classes in images.items())
    performance = [f"Test split ({test['n']} images, same hospital and acquisition as training: in-distribution): "
                   f"{_metrics(test)}."]
    if external:
        performance.append(f"External set ({external['n']} images of another acquisition, "
                           f"{external.get('source') or 'evaluate.external'}; never trained or tuned on): "
                           f"{_metrics(external)}. Expect these, not the test split's, at a new site.")
    else:
        performance.append("No external set was scored in this run (evaluate.external): how it does at another "
                           "site is unknown from this run alone; see docs/results.md.")
    shares = [f"test {100 * test['ood_flagged_share']:.1f}%" if test.get("ood_flagged_share") is not None else None,
              f"external {100 * external['ood_flagged_share']:.1f}%" if external and
              external.get("ood_flagged_share") is not None else None]
    return [
        ("Intended use", [use.purpose, f"Population: {use.population}",
                          *(f"Not for: {item}." for item in use.not_for)]),
        ("Model", [f"{settings.model_name}, {settings.image_size} px input ({settings.input_norm} input "
                   f"normalisation), {settings.tta_views} test-time view(s).",
                   f"Git commit {settings.git_commit or 'unknown'}; settings travel with the model "
                   "(model.json, model.ood.npz and model.onnx beside model.keras)."
                   + (f" Adapted: {settings.adapted}." if settings.adapted else "")]),
        ("Training data", [f"Source: {data.source}; images per split: {counts}.",
                           f"Archive sha256 {data.archive_sha256 or 'n/a'}; split manifests sha256 "
                           f"{data.manifests_sha256}.",
                           "Kermany et al. 2018 (CC BY 4.0): the Kaggle chest-xray-pneumonia dataset, re-split "
                           "by patient; validation drawn from the training patients."]),
        ("Operating point", [f"PNEUMONIA when p(pneumonia) >= {settings.threshold:.4f}, chosen on the validation "
                             f"split by the rule {settings.threshold_rule} (never on test or external images)."]),
        ("Performance", performance),
        ("Known limits", [
            "Adults and older children: never seen in training; on adult X-rays it calls most normal images "
            "pneumonia. Lateral and other views, other body parts: not frontal chest X-rays, outside its use.",
            ("Other sites: the external set's figures above, not the test split's, are what to expect"
             if external else "Other sites: expect less than the test split's figures (docs/results.md measures "
             "another acquisition)") + "; the probability is not calibrated for another acquisition.",
            f"Shortcut share: {_interval(test, 'border_share')} of the Grad-CAM evidence on test images lies in "
            "the image border (markers, collimation), not the lungs"
            + (f"; {_interval(external, 'border_share')} on the external set." if external else "."),
        ]),
        ("Input checks", [
            f"DICOM header (evaluate.input_checks: {settings.input_checks}): body part other than the chest, a view "
            f"other than AP/PA, or a patient age outside {low}-{high} years is flagged with its reason "
            "(refuse: the image is refused; ignore: not checked). No header value is ever quoted.",
            f"Image size (the same policy): an image smaller than the model's {settings.image_size} px input, in any "
            "format, is flagged with its size: enlarged, its blur reads as opacity.",
            f"Every image: an out-of-distribution score ({settings.ood.method}); above {settings.ood.threshold:.2f} "
            f"the prediction is flagged 'out of distribution' ({100 * settings.ood.validation_flagged:.1f}% of "
            "validation images" + "".join(f", {share}" for share in shares if share) + " flagged).",
            "Every image: a mirror check (a linear discriminant on the layout's left-right asymmetry, fitted on the "
            "training images against their mirror images) flags one whose left and right look swapped (a flipped "
            "export, a film scanned from the back, dextrocardia): " + _mirror(test, "test")
            + (f"; {_mirror(external, 'external')}" if external and external.get("mirror") else "") + ".",
            "Every image: a detail check (the fine detail of the model's input relative to its contrast, against the "
            "training images' median plus or minus 3 robust standard deviations) flags one blurred (enlarged from a "
            "smaller image, out of focus: blur reads as opacity) or noisy beyond them: " + _detail(test, "test")
            + (f"; {_detail(external, 'external')}" if external and external.get("detail") else "") + ".",
        ]),
    ]


def _mirror(scores: dict[str, Any], name: str) -> str:
    """What the mirror check flags of a split, as stored and mirrored."""
    counts = scores.get("mirror")
    if not counts:
        return f"not run on the {name} images"
    return (f"{100 * counts['flagged'] / counts['images']:.1f}% of {name} images flagged as stored, "
            f"{100 * counts['flagged_once_mirrored'] / counts['images']:.1f}% once mirrored")


def _detail(scores: dict[str, Any], name: str) -> str:
    """What the detail check flags of a split."""
    counts = scores.get("detail")
    if not counts:
        return f"not run on the {name} images"
    return (f"{100 * (counts['blurred'] + counts['noisy']) / counts['images']:.1f}% of {name} images flagged "
            f"({counts['blurred']} blurred, {counts['noisy']} noisy)")


def markdown(card: Sections, title: str) -> str:
    lines = [f"# {title}", "", "<!-- generated by the evaluate stage (pneumonia.evaluation.model_card): "
             "do not edit; `dvc repro` rewrites it -->"]
    for heading, items in card:
        lines += ["", f"## {heading}", "", *(f"- {item}" for item in items)]
    return "\n".join(lines) + "\n"
