"""Screening as a product: a classifier, any set of fitted detectors and their combination in
one file (`Screener`), calibrated on clean images, deciding per image."""

from frmap.engine.screening.combiner import Combiner
from frmap.engine.screening.screener import DECISIONS, Screener, ScreenResult

__all__ = ["DECISIONS", "Combiner", "ScreenResult", "Screener"]
