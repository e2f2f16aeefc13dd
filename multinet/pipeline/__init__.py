"""The compression pipeline: trace -> calibrate -> select -> reconstruct -> cut, group by group."""
from .compress import CompressResult, compress

__all__ = ["CompressResult", "compress"]
