"""What crosses the package boundary: model files (save/load), export, built-in data, atomic writes."""
from . import data
from .export import EXPORT_FORMATS, export
from .modelfile import ModelFileError, from_bytes, load, save, to_bytes

__all__ = ["EXPORT_FORMATS", "ModelFileError", "data", "export", "from_bytes", "load", "save", "to_bytes"]
