"""The errors a user can fix; the CLI prints them as one line instead of a traceback."""

from potstill.data import DataError
from potstill.generation.base import GenerationError
from potstill.models import ModelLoadError, TokenizerMismatchError
from potstill.recipe import RecipeError
from potstill.train import NonFiniteLoss
from potstill.verify import VerifyError

USER_ERRORS = (
    RecipeError,
    DataError,
    ModelLoadError,
    TokenizerMismatchError,
    NonFiniteLoss,
    GenerationError,
    VerifyError,
)
