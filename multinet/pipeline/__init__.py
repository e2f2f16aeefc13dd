"""The compression pipeline: trace -> calibrate -> select -> reconstruct -> cut, group by group."""
from .compression import CompressResult, compress

__all__ = ["CompressResult", "compress"]
