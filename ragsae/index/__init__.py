"""Index stage: the build pipeline, the folder format and the search facade."""

from ..errors import IndexFolderError
from .build import BuiltCodes, encode_corpus
from .folder import occupied, read_manifest
from .hit import Hit
from .index import Index

__all__ = ["BuiltCodes", "Hit", "Index", "IndexFolderError", "encode_corpus", "occupied", "read_manifest"]
