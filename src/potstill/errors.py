"""The errors a user can fix; the CLI prints them as one line instead of a traceback.

A leaf module: it imports nothing of potstill, so every layer can raise these without pulling in
another. Each message names the key, file or command that fixes it.
"""


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key and what to do."""


class DataError(ValueError):
    """A data problem the user can fix; the message says where it is and what to do."""


class ModelLoadError(ValueError):
    """A model or tokenizer could not be found, loaded or built as asked; the message says
    what to do."""


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers cannot share token-level logits."""


class NonFiniteLoss(RuntimeError):
    """The loss or gradient became NaN/inf; training stopped before the bad update was applied."""


class RunStopped(RuntimeError):
    """A method's guard stopped the run (e.g. the student's samples collapsed); the message names
    what was seen and the knobs to turn. The last checkpoint is left as it was."""


class GenerationError(RuntimeError):
    """Generation failed in a way the user can act on; the message says what to do."""


class VerifyError(ValueError):
    """Verification cannot run as asked (unknown mode, missing package); the message says why."""


class OutOfDisk(RuntimeError):
    """The disk cannot hold what a run writes, or ran out while it wrote; the message says how
    much it needs, what was kept, and what to do."""


USER_ERRORS = (
    RecipeError,
    DataError,
    ModelLoadError,
    TokenizerMismatchError,
    NonFiniteLoss,
    RunStopped,
    GenerationError,
    VerifyError,
    OutOfDisk,
)
