"""The one error type the pipeline raises for problems a user can fix."""


class PipelineError(Exception):
    """Bad input or environment: the message says what was wrong and what to do.

    Stage scripts turn it into a message on stderr and a non-zero exit, without a traceback.
    """
