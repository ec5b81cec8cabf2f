"""Fine-tuning strategies: which layers of a pretrained backbone train.

  frozen   the backbone is a fixed feature extractor; only the head trains (transfer learning)
  partial  the last `layers` layers of the backbone train with the head
  full     every layer trains

Batch-norm layers of a pretrained backbone stay frozen under every strategy, which in Keras 3
also keeps them in inference mode (their ImageNet statistics, not the batch's): calling the
backbone with training=False does not hold through `fit` (keras-team/keras#20285).
The custom CNN has no backbone: it always trains whole; so does a backbone trained from scratch.
"""

import keras

from pneumonia.errors import PipelineError
from pneumonia.models.backbones import BACKBONE_LAYER


def backbone_of(model: keras.Model) -> keras.Model | None:
    names = {layer.name for layer in model.layers}
    return model.get_layer(BACKBONE_LAYER) if BACKBONE_LAYER in names else None


def set_trainable(model: keras.Model, strategy: str, layers: int, pretrained: bool) -> None:
    """Make the backbone of `model` trainable per `strategy`; the head always trains.

    Changing trainable flags takes effect at the next `compile`."""
    backbone = backbone_of(model)
    if backbone is None:
        return
    if strategy == "partial" and layers > len(backbone.layers):
        raise PipelineError(
            f"train.fine_tune_layers = {layers} is more than the {len(backbone.layers)} layers of "
            f"{model.name}'s backbone; lower it, or use train.fine_tune: full."
        )
    first_trainable = {"frozen": len(backbone.layers), "partial": len(backbone.layers) - layers, "full": 0}[strategy]
    backbone.trainable = strategy != "frozen"
    # Every layer explicitly: with TensorFlow, assigning a flag its current value is skipped, so
    # `backbone.trainable = True` alone would leave layers a previous strategy froze still frozen.
    for index, layer in enumerate(backbone.layers):
        keeps_statistics = pretrained and isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = index >= first_trainable and not keeps_statistics
