from .config import TheseusConfig
from .model import TheseusModel

__all__ = ["TheseusConfig", "TheseusModel"]
