from .callback import TheseusCallback
from .config import TheseusConfig
from .model import TheseusModel

__all__ = ["TheseusCallback", "TheseusConfig", "TheseusModel"]
