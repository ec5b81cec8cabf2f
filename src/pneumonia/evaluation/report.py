"""One self-contained HTML page per evaluation: metrics with confidence intervals, every figure
(embedded as base64 PNG), data counts, training summary, params and the model's layers.

Nothing is fetched when it opens: no scripts, styles or images from elsewhere, so it can be mailed,
archived in MLflow or opened offline.
"""

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from pneumonia import CLASS_NAMES, SPLITS
from pneumonia.evaluation.scores import AT_DEFAULT

# (key in a split's scores, reports/evaluation/test.json, what a reader calls it)
METRIC_ROWS = (
    ("sensitivity", "Sensitivity (recall): pneumonia cases found"),
    ("specificity", "Specificity: normal cases recognised"),
    ("precision", "Precision (positive predictive value)"),
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("f1", "F1"),
    ("roc_auc", "ROC AUC"),
    ("pr_auc", "PR AUC (average precision)"),
    ("brier", "Brier score (lower is better)"),
    ("ece", "Expected calibration error (lower is better)"),
)
COUNT_ROWS = (("tp", "True positives"), ("fn", "False negatives"), ("tn", "True negatives"),
              ("fp", "False positives"), ("n", "Images"))


@dataclass(frozen=True)
class Figure:
    title: str
    path: Path
    caption: str = ""

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.path.read_bytes()).decode("ascii")


TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Pneumonia classifier evaluation: {{ model_name }}</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
  table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
  th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
  th:first-child, td:first-child { text-align: left; }
  thead th { background: #eef2f7; }
  figure { margin: 1em 0 2em; }
  figure img { max-width: 100%; border: 1px solid #ddd; }
  figcaption { color: #555; font-size: 0.9em; }
  pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
  .headline { font-size: 1.1em; background: #f3f8f3; padding: 0.6em 1em; border-left: 4px solid #4a4; }
</style>
</head>
<body>
<h1>Pneumonia classifier evaluation: {{ model_name }}</h1>
<p class="headline">
  At the operating point chosen on the validation split ({{ rule }}: predict pneumonia when
  p(pneumonia) &ge; {{ fmt(scores.threshold) }}), the model finds
  <b>{{ pct(scores.sensitivity) }}</b> of pneumonia cases (sensitivity) and recognises
  <b>{{ pct(scores.specificity) }}</b> of normal cases (specificity) on {{ scores.n }} test images.
</p>

<h2 id="model-card">Model card</h2>
{% for heading, items in model_card %}
<h3>{{ heading }}</h3>
<ul>{% for item in items %}<li>{{ item }}</li>{% endfor %}</ul>
{% endfor %}

<h2>Test metrics</h2>
<table>
<thead><tr><th>metric</th><th>at threshold {{ fmt(scores.threshold) }}</th><th>95% CI</th>
<th>at threshold 0.5</th><th>validation, at {{ fmt(scores.threshold) }}</th></tr></thead>
<tbody>
{% for key, label in metric_rows %}
<tr><td>{{ label }}</td><td>{{ fmt(scores[key]) }}</td>
<td>{% if key in scores.ci95 %}{{ fmt(scores.ci95[key].low) }} &ndash; {{ fmt(scores.ci95[key].high) }}{% endif %}</td>
<td>{{ fmt(scores[at_default][key]) }}</td>
<td>{% if key in scores.validation %}{{ fmt(scores.validation[key]) }}{% endif %}</td></tr>
{% endfor %}
{% for key, label in count_rows %}
<tr><td>{{ label }}</td><td>{{ scores[key] }}</td><td></td><td>{{ scores[at_default][key] }}</td>
<td>{% if key in scores.validation %}{{ scores.validation[key] }}{% endif %}</td></tr>
{% endfor %}
</tbody>
</table>
<p>Confidence intervals: stratified percentile bootstrap over the test images
({{ bootstrap_samples }} resamples). The threshold is chosen on validation only; test is used for
nothing but these numbers. The test split comes from the same source as the training data
(in-distribution); the external set below, if any, from another site.</p>
<p>Shortcut audit: {{ pct(scores.border_share) }} of the Grad-CAM evidence lies in the outer
{{ pct(scores.border_band) }} of the image ({{ scores.border_audit_images }} test images; evenly
spread evidence would give {{ pct(scores.border_share_if_uniform) }}). Markers, corners and
collimation edges live there, not lungs.</p>
{% if "ood_flagged_share" in scores %}
<p>Out-of-distribution flag: {{ pct(scores.ood_flagged_share) }} of the test images are flagged as unlike the
training X-rays (threshold {{ fmt(scores.ood.threshold) }}, set to flag {{ pct(ood_flagged) }} of validation
images).</p>
{% endif %}
{% if "mirror" in scores %}
<p>Mirror check: {{ pct(scores.mirror_flagged_share) }} of the test images are flagged as mirrored left to right;
the same images mirrored, {{ pct(scores.mirror.flagged_once_mirrored / scores.mirror.images) }} would be.</p>
{% endif %}
{% if "detail" in scores %}
<p>Detail check: {{ pct(scores.detail_flagged_share) }} of the test images are flagged as blurred
({{ scores.detail.blurred }}) or noisy ({{ scores.detail.noisy }}) beyond the training X-rays.</p>
{% endif %}

{% if external %}
<h2 id="external">External set: another site</h2>
<p class="headline">
  On {{ external.n }} images of another acquisition ({{ external.source }}, {{ external.patients }} patients),
  at the same threshold {{ fmt(external.threshold) }}: sensitivity <b>{{ pct(external.sensitivity) }}</b>,
  specificity <b>{{ pct(external.specificity) }}</b>, ROC AUC <b>{{ fmt(external.roc_auc) }}</b>.
  This is what to expect at a hospital whose X-rays the model has never seen; the test split above
  only says how well it does on images like its training set.
</p>
<table>
<thead><tr><th>metric</th><th>at threshold {{ fmt(external.threshold) }}</th><th>95% CI</th>
<th>at threshold 0.5</th><th>test, at {{ fmt(scores.threshold) }}</th></tr></thead>
<tbody>
{% for key, label in metric_rows %}
<tr><td>{{ label }}</td><td>{{ fmt(external[key]) }}</td>
<td>
{%- if key in external.ci95 %}{{ fmt(external.ci95[key].low) }} &ndash; {{ fmt(external.ci95[key].high) }}{% endif -%}
</td>
<td>{{ fmt(external[at_default][key]) }}</td><td>{{ fmt(scores[key]) }}</td></tr>
{% endfor %}
{% for key, label in count_rows %}
<tr><td>{{ label }}</td><td>{{ external[key] }}</td><td></td><td>{{ external[at_default][key] }}</td>
<td>{{ scores[key] }}</td></tr>
{% endfor %}
<tr><td>Border share of Grad-CAM evidence</td><td>{{ fmt(external.border_share) }}</td><td></td><td></td>
<td>{{ fmt(scores.border_share) }}</td></tr>
{% if "ood_flagged_share" in external %}
<tr><td>Flagged out of distribution</td><td>{{ pct(external.ood_flagged_share) }}</td><td></td><td></td>
<td>{{ pct(scores.ood_flagged_share) }}</td></tr>
{% endif %}
{% if "mirror" in external %}
<tr><td>Flagged mirrored (as stored / once mirrored)</td><td>{{ pct(external.mirror_flagged_share) }} /
{{ pct(external.mirror.flagged_once_mirrored / external.mirror.images) }}</td><td></td><td></td>
<td>{{ pct(scores.mirror_flagged_share) }}</td></tr>
{% endif %}
{% if "detail" in external %}
<tr><td>Flagged blurred or noisy</td><td>{{ pct(external.detail_flagged_share) }}</td><td></td><td></td>
<td>{{ pct(scores.detail_flagged_share) }}</td></tr>
{% endif %}
</tbody>
</table>
{% if external.input_checks and external.input_checks.outside_intended_use %}
<p>Images outside the intended use by their headers ({{ external.input_checks.policy }}):
{% for reason, count in external.input_checks.reasons.items() %}
{{ count }} {{ reason }}{% if not loop.last %}; {% endif %}
{% endfor %}.</p>
{% endif %}
{% endif %}

<h2>Data</h2>
<table>
<thead><tr><th>split</th>{% for name in class_names %}<th>{{ name }}</th>{% endfor %}<th>patients</th></tr></thead>
<tbody>
{% for split in splits if split in data.images %}
<tr><td>{{ split }}</td>{% for name in class_names %}<td>{{ data.images[split][name] }}</td>{% endfor %}
<td>{{ data.get("patients", {}).get(split, "") }}</td></tr>
{% endfor %}
</tbody>
</table>
{% if "dropped_as_in_test" in data %}
<p>Training and validation images also found in test (dropped): {{ data.dropped_as_in_test }}.</p>
{% endif %}

<h2>Figures</h2>
{% for figure in figures %}
<figure>
<h3>{{ figure.title }}</h3>
<img src="{{ figure.data_uri() }}" alt="{{ figure.title }}">
{% if figure.caption %}<figcaption>{{ figure.caption }}</figcaption>{% endif %}
</figure>
{% endfor %}

<h2>Training</h2>
<table>
<tbody>
{% for key, value in training.items() %}<tr><td>{{ key }}</td><td>{{ fmt(value) }}</td></tr>
{% endfor %}
</tbody>
</table>

<h2>Parameters</h2>
<pre>{{ params_yaml }}</pre>

<h2>Model</h2>
<pre>{{ model_summary }}</pre>
</body>
</html>
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"  # undefined, e.g. ROC AUC with one class
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def render(scores: dict[str, Any], figures: list[Figure], params: dict[str, Any], data: dict[str, Any],
           training: dict[str, Any], model_summary: str, external: dict[str, Any] | None = None,
           model_card: list[tuple[str, list[str]]] = ()) -> str:
    """The page; `scores`: the test split's (reports/evaluation/test.json); `external`: the external set's
    when one was scored; `model_card`: evaluation.model_card's sections."""
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(TEMPLATE).render(
        model_name=params["model"]["name"], rule=scores["threshold_rule"], scores=scores, external=external,
        at_default=AT_DEFAULT, metric_rows=METRIC_ROWS, count_rows=COUNT_ROWS,
        bootstrap_samples=params["evaluate"]["bootstrap_samples"], ood_flagged=params["evaluate"]["ood_flagged"],
        data=data, splits=SPLITS, class_names=CLASS_NAMES, figures=figures, training=training,
        params_yaml=yaml.safe_dump(params, sort_keys=False), model_summary=model_summary, model_card=model_card,
        fmt=_fmt, pct=_pct,
    )
