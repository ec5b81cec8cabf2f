"""The one error type the pipeline raises for problems a user can fix."""


class PipelineError(Exception):
    """Bad input or environment: the message says what was wrong and what to do.

    Stage scripts turn it into a message on stderr and a non-zero exit, without a traceback.
    """


NOT_A_ZIP = "not a whole zip archive, as .keras are"


def damaged_model(model, why: str) -> PipelineError:
    """The error of a .keras file that is not a whole model (`why`: what is wrong with it): one Keras cannot load
    (models.build.load_model), or one its settings' digest does not know that is no zip (model_settings)."""
    return PipelineError(f"{model} is damaged or not a Keras model file ({why}): copy it again, restore the "
                         "pipeline's model with `dvc checkout` or train it again with `dvc repro`")
