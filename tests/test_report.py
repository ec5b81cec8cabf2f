"""The HTML evaluation report: self-contained (every image an embedded PNG), complete, and
rendered by a real browser (headless Chromium) with every image loaded."""

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from browser import assert_not_blank, open_in_chromium
from pneumonia.config import Params
from pneumonia.evaluation.figures import draw_figures, read_history
from pneumonia.evaluation.predictions import Predictions
from pneumonia.evaluation.report import render
from pneumonia.evaluation.scores import (
    AT_DEFAULT,
    CI_METRICS,
    ScoredSplit,
    curves,
    evaluation_scores,
    external_scores,
    pick_cases,
)
from pneumonia.evaluation.threshold import threshold_on_validation

SPLIT_FIGURES = {"confusion_matrix.png", "roc.png", "precision_recall.png", "calibration.png", "gradcam.png"}
FIGURE_FILES = {"training_curves.png", "test_images.png", "external_images.png", *SPLIT_FIGURES,
                *(f"external_{name}" for name in SPLIT_FIGURES)}
BORDER = {"border_share": 0.31, "border_band": 0.12, "border_share_if_uniform": 0.4224, "border_audit_images": 300}
DATA = {"images": {"train": {"NORMAL": 900, "PNEUMONIA": 2700}, "val": {"NORMAL": 160, "PNEUMONIA": 480},
                   "test": {"NORMAL": 117, "PNEUMONIA": 183}},
        "patients": {"train": 2000, "val": 350, "test": 250}, "dropped_as_in_test": 3}
TRAINING = {"best_epoch": 2, "best_val_auc": 0.93, "epochs_trained": 3}
MODEL_SUMMARY = 'Model: "custom_cnn"\n<layer> conv2d (Conv2D)  (None, 48, 48, 16)'


def predictions(n: int, seed: int) -> Predictions:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.6).astype(int)
    probabilities = 1 / (1 + np.exp(-(2.5 * (2 * labels - 1) + rng.normal(0, 1.5, n))))
    return Predictions([f"image-{seed}-{i}.jpeg" for i in range(n)], labels, probabilities)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report from made-up predictions, images and heat maps, written as the evaluate stage does."""
    root = tmp_path_factory.mktemp("report")
    params = Params()
    val, test, external = predictions(120, seed=1), predictions(300, seed=2), predictions(90, seed=3)
    config = params.evaluate
    threshold = threshold_on_validation(val, config.threshold)
    scores = {**evaluation_scores(val, test, threshold, config.threshold, config.bootstrap_samples, config.seed),
              **BORDER}
    other_site = {**external_scores(external, threshold, config.threshold, config.external, {"patients": 70},
                                    config.bootstrap_samples, config.seed), **BORDER, "border_share": 0.47}
    rng = np.random.default_rng(0)

    def scored(name, split_scores, split_predictions):
        cases = pick_cases(split_predictions, scores["threshold"], params.evaluate.images_per_outcome, seed=0)
        return ScoredSplit(name, split_scores, split_predictions, curves(split_predictions), cases,
                           rng.integers(0, 255, (len(cases), 48, 48, 3), dtype=np.uint8),
                           rng.random((len(cases), 48, 48)))

    history_csv = root / "train_history.csv"
    history_csv.write_text("epoch,loss,val_loss,accuracy,val_accuracy,auc,val_auc\n"
                           "1,0.6,0.55,0.7,0.72,0.8,0.82\n2,0.4,0.45,0.8,0.79,0.9,0.88\n3,0.3,0.42,0.86,0.8,0.94,0.9\n")
    figures = draw_figures(root / "figures", read_history(history_csv),
                           [scored("test", scores, test), scored("external", other_site, external)], "conv2d_7")
    page = root / "evaluation.html"
    page.write_text(render(scores=scores, external=other_site, figures=figures, params=params.model_dump(),
                           data=DATA, training=TRAINING, model_summary=MODEL_SUMMARY))
    return page, scores


class Resources(HTMLParser):
    """Every image source and every other reference to something outside the page."""

    def __init__(self):
        super().__init__()
        self.images, self.external = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag in ("script", "link", "iframe") or attrs.get("href") or attrs.get("src"):
            self.external.append((tag, attrs))


def test_report_is_self_contained_with_every_figure_as_png(report):
    page, _ = report
    resources = Resources()
    resources.feed(page.read_text())
    assert resources.external == []
    assert len(resources.images) == len(FIGURE_FILES)
    for source in resources.images:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        image = Image.open(io.BytesIO(base64.b64decode(source[len(prefix):], validate=True)))
        assert image.format == "PNG" and min(image.size) > 100
    assert {path.name for path in (page.parent / "figures").iterdir()} == FIGURE_FILES


def test_report_shows_metrics_intervals_data_params_and_model(report):
    page, scores = report
    html = page.read_text()
    text = re.sub(r"<[^>]+>", " ", html)
    assert f"p(pneumonia) &ge; {scores['threshold']:.3f}" in html
    for key in CI_METRICS:
        interval = scores["ci95"][key]
        assert f"{interval['low']:.3f} &ndash; {interval['high']:.3f}" in html, key
    assert f"{scores['sensitivity']:.3f}" in text and f"{scores[AT_DEFAULT]['specificity']:.3f}" in text
    for phrase in ("Sensitivity", "Specificity", "ROC AUC", "Expected calibration error", "Brier",
                   "threshold: sensitivity@0.93", "bootstrap_samples: 1000", "2700", "best_val_auc", "Grad-CAM"):
        assert phrase in text, phrase
    assert "&lt;layer&gt; conv2d (Conv2D)" in html  # the model summary, escaped
    assert "31.0% of the Grad-CAM evidence lies in the outer" in text


def test_report_has_a_section_for_the_external_set(report):
    page, scores = report
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.read_text()))
    section = text[text.index("External set: another site"):text.index(" Data ", text.index("External set"))]
    assert "90 images of another acquisition" in section and "70 patients" in section
    assert f"same threshold {scores['threshold']:.3f}" in section
    assert "Border share of Grad-CAM evidence 0.470" in section


@pytest.mark.slow
def test_report_opens_in_chromium_with_every_image_loaded(report, tmp_path):
    page, _ = report
    screenshot = tmp_path / "report.png"
    loaded, total = open_in_chromium(page, screenshot)
    assert loaded == total == len(FIGURE_FILES)
    assert_not_blank(screenshot)
