"""train.distillation_teachers: N teachers (ensemble members 1 to N, seeds train.seed + k), then one model of
the configured size trained on targets mixed from the labels and the teachers' mean probability of each
training image, its class weights by label."""

import numpy as np
import pytest
import tensorflow as tf

from pneumonia.config import parse_params
from pneumonia.data import dataset
from pneumonia.errors import PipelineError
from pneumonia.models.build import NO_AUGMENTATION, load_model, members_of
from pneumonia.training import fit
from pneumonia.training.backup import TrainingBackup

SIZE = 48  # the synthetic TFRecords' image size


def params_with(**train):
    return parse_params({"data": {"image_size": SIZE}, "model": {"crop": 0.08},
                         "train": {"epochs": 1, "batch_size": 8, "augment": NO_AUGMENTATION.model_dump(), **train}})


def decoded_batch(labels: list[int], names: list[str]) -> dict[str, tf.Tensor]:
    return {"image": tf.zeros((len(labels), 4, 4, 3), tf.uint8),
            "label": tf.constant(labels, tf.float32)[:, tf.newaxis], "file_name": tf.constant(names)}


def test_distilled_targets_mix_label_and_teachers_by_the_weight_and_weigh_each_image_by_its_labelled_class():
    teachers = {dataset.image_key(0, "a.png"): 0.2, dataset.image_key(1, "a.png"): 0.6,
                dataset.image_key(1, "b.png"): 0.9}
    targets = dataset.distilled_targets(teachers, 0.25, {0: 3.0, 1: 0.5})
    # "a.png" in both class folders: two images, each with its own teachers' probability
    images, soft, weights = targets(decoded_batch([0, 1, 1], ["a.png", "a.png", "b.png"]))
    np.testing.assert_allclose(soft.numpy()[:, 0], [0.25 * 0.2, 0.75 + 0.25 * 0.6, 0.75 + 0.25 * 0.9], rtol=1e-6)
    np.testing.assert_allclose(weights.numpy(), [3.0, 0.5, 0.5])
    assert images.shape == (3, 4, 4, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="the teachers did not score"):
        targets(decoded_batch([0], ["b.png"]))


def test_a_softmax_head_gets_soft_targets_as_two_columns_and_keeps_the_sample_weights():
    batches = tf.data.Dataset.from_tensors((tf.zeros((2, 4, 4, 3)), tf.constant([[0.2], [1.0]]),
                                            tf.constant([1.0, 2.0])))
    _, labels, weights = next(iter(fit.labelled_for("softmax", batches)))
    np.testing.assert_allclose(labels.numpy(), [[0.8, 0.2], [0.0, 1.0]])
    np.testing.assert_allclose(weights.numpy(), [1.0, 2.0])


@pytest.mark.parametrize(("train", "message"), [
    ({"distillation_teachers": 2, "ensemble_members": 2}, "set one of them"),
    ({"distillation_teachers": 1, "augment": {"mixup": 0.2}}, "both replace the labels"),
    ({"distillation_teachers": 1, "augment": {"cutmix": 1.0}}, "augment.cutmix = 1.0: both replace the labels"),
    ({"distillation_teachers": 2, "seed": 2**32 - 2}, "teacher k trains with seed train.seed \\+ k"),
    ({"distillation_weight": 0}, "distillation_weight"),
])
def test_settings_distillation_cannot_train_are_refused_naming_the_keys(train, message):
    with pytest.raises(PipelineError, match=message):
        parse_params({"train": train})


def weights_equal(first, second) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights(), strict=True))


@pytest.mark.slow
def test_a_distilled_model_is_one_model_taught_by_its_teachers_and_resumes_keeping_them(synthetic_data, tmp_path,
                                                                                         monkeypatch):
    """One model of the single model's size, its cost the teachers' and its own; stopped while the model trains
    (on the teachers' probabilities, after both teachers), the teachers are kept and the model trained again
    comes out as the uninterrupted one."""
    tfrecords, weights = synthetic_data / "data/tfrecords", {0: 1.0, 1: 1.0}
    params = params_with(distillation_teachers=2)
    distilled = fit.train(params.model, params.train, tfrecords, weights, tmp_path / "distilled.keras")

    model = load_model(tmp_path / "distilled.keras")
    assert members_of(model) == [] and model.count_params() == fit.build_model(params.model, SIZE).count_params()
    metrics = distilled.metrics()
    assert len(distilled.members) == 3 and metrics["member_0_best_epoch"] == metrics["best_epoch"]
    assert {"member_1_best_val_auc", "member_2_best_val_auc"} <= metrics.keys()
    assert metrics["train_seconds"] == pytest.approx(sum(member.seconds for member in distilled.members), abs=0.1)
    assert distilled.headline().keys() == {"best_epoch", "epochs_trained", "train_seconds"}

    fit_model, fitted = fit.fit_model, []

    def stopped_at_the_model(model_config, config, *args, teacher_probabilities=None, **kwargs):
        fitted.append(config.seed)
        if teacher_probabilities:
            raise KeyboardInterrupt  # as a kill: nothing after it runs
        return fit_model(model_config, config, *args, **kwargs)

    monkeypatch.setattr(fit, "fit_model", stopped_at_the_model)
    backup = TrainingBackup(tmp_path / "backup", "fingerprint")
    assert not backup.open()
    with pytest.raises(KeyboardInterrupt):
        fit.train(params.model, params.train, tfrecords, weights, tmp_path / "model.keras", backup=backup)
    assert fitted == [43, 44, 42] and not (tmp_path / "model.keras").exists()

    fitted.clear()
    monkeypatch.setattr(fit, "fit_model", lambda model_config, config, *args, **kwargs: (
        fitted.append(config.seed), fit_model(model_config, config, *args, **kwargs))[1])
    backup = TrainingBackup(tmp_path / "backup", "fingerprint")
    assert backup.open()
    fit.train(params.model, params.train, tfrecords, weights, tmp_path / "model.keras", backup=backup)
    assert fitted == [42]  # the teachers kept, not trained again
    assert weights_equal(load_model(tmp_path / "model.keras"), model)


def test_teacher_probabilities_are_the_teachers_predictions_on_every_training_image(synthetic_data, tmp_path):
    tfrecords = synthetic_data / "data/tfrecords"
    teacher = fit.build_model(params_with().model, SIZE)
    probabilities = fit.teacher_probabilities(teacher, tfrecords, 8)
    labels, names = dataset.labels_and_names(tfrecords, "train")
    assert list(probabilities) == [dataset.image_key(label, name) for label, name in zip(labels, names)]
    images = np.stack([example["image"] for example in dataset.records(tfrecords, "train").as_numpy_iterator()])
    np.testing.assert_allclose(list(probabilities.values()), teacher.predict(images, verbose=0)[:, 0], rtol=1e-4)


def test_training_images_of_one_class_sharing_a_name_are_refused_before_any_teacher_trains(
        monkeypatch, synthetic_data, tmp_path):
    tfrecords = synthetic_data / "data/tfrecords"
    labels, names = dataset.labels_and_names(tfrecords, "train")
    monkeypatch.setattr(dataset, "labels_and_names", lambda *_: (labels, [names[0]] * len(names)))
    fitted = []
    monkeypatch.setattr(fit, "fit_model", lambda *args, **kwargs: fitted.append(args))
    params = params_with(distillation_teachers=2)
    with pytest.raises(PipelineError, match="share a file name"):
        fit.train(params.model, params.train, tfrecords, {0: 1.0, 1: 1.0}, tmp_path / "model.keras")
    assert fitted == [] and not (tmp_path / "model.keras").exists()
