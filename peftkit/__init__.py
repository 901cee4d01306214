"""peftkit: parameter-efficient fine-tuning of Hugging Face encoders from one YAML file."""

from peftkit.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
