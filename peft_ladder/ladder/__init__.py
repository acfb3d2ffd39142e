from .config import LadderSideConfig
from .model import LadderSideModel

__all__ = ["LadderSideConfig", "LadderSideModel"]
