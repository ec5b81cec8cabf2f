"""Where training runs (a TPU, several GPUs, a multi-worker cluster or one device) and at which
numeric precision, chosen from `train.accelerator` and `train.precision`."""

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from pneumonia.errors import PipelineError

log = logging.getLogger(__name__)

TPU_VM_DEVICE = Path("/dev/accel0")  # present on Cloud TPU VMs


@dataclass(frozen=True)
class Placement:
    strategy: tf.distribute.Strategy
    strategy_name: str  # tpu | multi_worker_mirrored | mirrored | default
    device: str  # tpu | gpu | cpu
    precision: str  # float32 | mixed_float16 | mixed_bfloat16

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def is_chief(self) -> bool:
        """Only the chief writes outputs and logs to MLflow; other workers just compute."""
        resolver = getattr(self.strategy, "cluster_resolver", None)
        if self.strategy_name != "multi_worker_mirrored" or resolver is None:
            return True
        task_type, task_id = resolver.task_type, resolver.task_id
        return task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in
                                        resolver.cluster_spec().as_dict())

    @property
    def worker_name(self) -> str:
        """This process's task in a cluster ("worker-1"), for the scratch files of non-chief workers."""
        resolver = getattr(self.strategy, "cluster_resolver", None)
        if self.strategy_name != "multi_worker_mirrored" or resolver is None:
            return "chief"
        return f"{resolver.task_type}-{resolver.task_id}"

    def describe(self) -> dict[str, str | int]:
        """What the MLflow run records about where it trained."""
        return {"placement.strategy": self.strategy_name, "placement.replicas": self.replicas,
                "placement.device": self.device, "placement.precision": self.precision}


def cluster_workers() -> int:
    """Machines named in TF_CONFIG (0 without a cluster)."""
    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def _connect_tpu() -> tf.distribute.Strategy | None:
    for name in (os.environ.get("TPU_NAME"), "local" if TPU_VM_DEVICE.exists() else None):
        if name is None:
            continue
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=name)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return tf.distribute.TPUStrategy(resolver)
        except (ValueError, tf.errors.OpError) as exc:
            log.warning("no TPU at %r: %s", name, exc)
    return None


def cpu_has_bfloat16() -> bool:
    """Native bfloat16 arithmetic (Intel AMX or AVX-512 BF16), which oneDNN uses for bfloat16 convolutions."""
    cpuinfo = Path("/proc/cpuinfo")
    return bool(cpuinfo.exists() and re.search(r"\b(amx_bf16|avx512_bf16)\b", cpuinfo.read_text()))


def select_precision(requested: str, device: str, backbone: bool = False) -> str:
    """train.precision: auto picks the fast path where the hardware has it. On a CPU that is bfloat16
    for the pretrained backbones (compute-bound: 1.3x for resnet50v2 here), not for custom_cnn, whose
    small layers are memory-bound: 1.1x at most, not worth leaving the float32 profile that was validated
    on the external set (benchmarks/results.md, target 6)."""
    if requested != "auto":
        return requested
    if device == "tpu" or (device == "cpu" and backbone and cpu_has_bfloat16()):
        return "mixed_bfloat16"
    if device == "gpu":
        capabilities = [tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
                        for gpu in tf.config.list_physical_devices("GPU")]
        # Tensor cores (compute capability 7.0+) are what make float16 pay off.
        if capabilities and min(capabilities) >= (7, 0):
            return "mixed_float16"
    return "float32"


def select_strategy(accelerator: str) -> tuple[tf.distribute.Strategy, str, str]:
    """(strategy, strategy name, device) for train.accelerator, or a PipelineError when the asked-for
    accelerator is not there: never a silent fall-back to the CPU."""
    if accelerator in ("tpu", "auto"):
        tpu = _connect_tpu() if accelerator == "tpu" or os.environ.get("TPU_NAME") or TPU_VM_DEVICE.exists() else None
        if tpu is not None:
            return tpu, "tpu", "tpu"
        if accelerator == "tpu":
            raise PipelineError(
                "train.accelerator = 'tpu' but no TPU is reachable: set TPU_NAME to your TPU's name "
                "(or run on a Cloud TPU VM) with TensorFlow's TPU build installed "
                "(docs/accelerators.md), or set train.accelerator to 'auto' or 'cpu'."
            )
    if accelerator == "cpu":
        tf.config.set_visible_devices([], "GPU")
    gpus = tf.config.list_physical_devices("GPU") if accelerator != "cpu" else []
    if accelerator == "gpu" and not gpus:
        raise PipelineError(
            "train.accelerator = 'gpu' but TensorFlow sees no GPU. Install the GPU extra "
            "(pip install -e '.[gpu]', i.e. tensorflow[and-cuda]) and check `nvidia-smi`, "
            "or set train.accelerator to 'auto' or 'cpu'."
        )
    device = "gpu" if gpus else "cpu"
    if cluster_workers() > 1:
        from pneumonia import keras_compat

        keras_compat.apply()  # Keras 3 fit under this strategy needs it (keras-team/keras#20585)
        return tf.distribute.MultiWorkerMirroredStrategy(), "multi_worker_mirrored", device
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(), "mirrored", device
    return tf.distribute.get_strategy(), "default", device


def place(accelerator: str, precision: str, backbone: bool = False) -> Placement:
    """Choose and activate the strategy and the global Keras precision policy (`backbone`: model.backbone)."""
    strategy, name, device = select_strategy(accelerator)
    chosen = select_precision(precision, device, backbone)
    keras.mixed_precision.set_global_policy(chosen)
    placement = Placement(strategy, name, device, chosen)
    log.info("training on %s with %s strategy, %d replica(s), %s", device, name, placement.replicas, chosen)
    return placement
