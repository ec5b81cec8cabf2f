"""A narrow fix that lets Keras 3 `Model.fit` train under `MultiWorkerMirroredStrategy`.

Keras 3 (seen with 3.8 to 3.15 on TensorFlow 2.21) fails there with "Attempt to convert a value
(PerReplica:...)" or "Invalid reduction dimension 0 for input with 0 dimensions":
https://github.com/keras-team/keras/issues/20585 (open). Two private functions of
`keras.src.backend.tensorflow.trainer` reduce over workers what must not be reduced:

1. `TensorFlowTrainer._maybe_symbolic_build` averages a *data batch* over the replicas just to
   learn its shapes; we take this worker's first shard instead.
2. `reduce_per_replica` asks for `axis=0` when averaging *scalar* step outputs (loss, metrics)
   over workers; we average over the replicas (`axis=None`), as Keras does for every other strategy.

`apply()` is called only when the strategy is multi-worker, and both replacements defer to the
originals for any other strategy, so default, mirrored and TPU training run stock Keras.
Drop this module when keras-team/keras#20585 is fixed in the Keras range pinned in pyproject.toml
(tests/test_distribute.py trains on two workers: without this module it passes only once Keras is fixed).
"""

import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer

_original_reduce_per_replica = trainer.reduce_per_replica
_original_maybe_symbolic_build = trainer.TensorFlowTrainer._maybe_symbolic_build


def _multi_worker(strategy) -> bool:
    return strategy is not None and trainer._collective_all_reduce_multi_worker(strategy)


def _this_worker_shard(strategy, value):
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    if not _multi_worker(self._distribute_strategy):
        return _original_maybe_symbolic_build(self, iterator=iterator, data_batch=data_batch)
    if iterator is not None:
        for _, _, batches in iterator:
            data_batch = tree.map_structure(lambda v: _this_worker_shard(self.distribute_strategy, v), next(batches))
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _reduce_per_replica(values, strategy, reduction):
    if reduction == "auto" and _multi_worker(strategy):
        return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
    return _original_reduce_per_replica(values, strategy, reduction)


def apply() -> None:
    """Install the fix (idempotent)."""
    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer.reduce_per_replica = _reduce_per_replica
