"""Index stage: the build pipeline, the folder format and the search facade."""

from ..errors import IndexFolderError
from .build import BuiltCodes, encode_corpus
from .folder import check_writable, occupied, read_index_folder, read_manifest, verify_index_folder
from .hit import Hit
from .index import Index
from .segment import Segment

__all__ = [
    "BuiltCodes",
    "Hit",
    "Index",
    "IndexFolderError",
    "Segment",
    "check_writable",
    "encode_corpus",
    "occupied",
    "read_index_folder",
    "read_manifest",
    "verify_index_folder",
]
