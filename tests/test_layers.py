"""The package is built in layers, each importing only from the layers below it (or its own): the params
schema is the ground floor, the tools around the pipeline are at the top. Read from the source (every
import, also inside functions); runs nothing of the package.

A new module of src/pneumonia is placed in LAYERS (a package's modules take the package's place).
"""

from pathlib import Path

import pytest

from conftest import SRC, imported_modules

# Bottom first; a module may import from its own layer and from every layer below it.
LAYERS = (
    ("the package root and the error type", {"pneumonia", "pneumonia.errors"}),
    ("plain helpers and the allowed values of params",
     {"pneumonia.atomic", "pneumonia.paths", "pneumonia.logs", "pneumonia.architectures", "pneumonia.threshold_rule",
      "pneumonia.plotting"}),
    ("the params schema, and the schema of a model's settings", {"pneumonia.config", "pneumonia.model_settings"}),
    ("data and models", {"pneumonia.data", "pneumonia.models", "pneumonia.distribute", "pneumonia.keras_compat"}),
    ("training, evaluation and tracking", {"pneumonia.training", "pneumonia.evaluation", "pneumonia.tracking",
                                           "pneumonia.ood"}),
    ("using a trained model", {"pneumonia.classifier", "pneumonia.engines", "pneumonia.inference",
                               "pneumonia.serving", "pneumonia.adaptation", "pneumonia.comparison"}),
    ("the command line", {"pneumonia.cli"}),
)


def module_name(file: Path) -> str:
    parts = file.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """The layer of `module`: its own entry, else that of the nearest package above it (not the root) listed."""
    parts = module.split(".")
    candidates = [module] + [".".join(parts[:depth]) for depth in range(len(parts) - 1, 1, -1)]
    for name in candidates:
        for index, (_, members) in enumerate(LAYERS):
            if name in members:
                return index
    return None


def upward_imports(module: str, file: Path) -> list[str]:
    """What `file`, the source of `module`, imports from the layers above the module's."""
    own = layer_of(module)
    return sorted(f"{imported} ({LAYERS[layer_of(imported)][0]})" for imported in imported_modules(file)
                  if layer_of(imported) > own)


MODULES = {module_name(file): file for file in sorted((SRC / "pneumonia").rglob("*.py"))}


def test_every_module_has_a_layer():
    assert not [module for module in MODULES if layer_of(module) is None], "place these in LAYERS"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_layer_above_it(module):
    upward = upward_imports(module, MODULES[module])
    assert not upward, f"{module} ({LAYERS[layer_of(module)][0]}) imports from a layer above it: {upward}"


def test_an_upward_import_is_caught(tmp_path):
    """What the check rests on: config importing the model architectures from the models package, as it
    once did, is found; also an import inside a function."""
    source = (SRC / "pneumonia" / "config.py").read_text()
    for added in ("from pneumonia.models.build import build_model",
                  "def late():\n    from pneumonia import training"):
        changed = tmp_path / "config.py"
        changed.write_text(f"{source}\n\n{added}\n")
        assert upward_imports("pneumonia.config", changed), added
