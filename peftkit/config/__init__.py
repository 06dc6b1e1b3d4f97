"""One config system: typed, ranged sections (base.py, schema.py) and the loader for every recipe kind."""

from peftkit.config.base import Section, option
from peftkit.config.schema import MethodArgs, TrainArgs

__all__ = ["MethodArgs", "Section", "TrainArgs", "option"]
