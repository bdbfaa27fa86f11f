"""File names and format versions of everything ragsae writes to disk, in one place.

What changed between format versions is in CHANGELOG.md.
"""

INDEX_FORMAT_VERSION = 4
MANIFEST_FILE = "manifest.json"
CODES_FILE = "codes.npz"
LENGTHS_FILE = "lengths.npy"
IDF_FILE = "idf.npy"
DOCIDS_FILE = "docids.txt"
PASSAGES_FILE = "passages.jsonl"
FAISS_FILE = "faiss.index"
SAE_DIR = "sae"

SAE_FORMAT_VERSION = 2
SAE_READABLE_VERSIONS = (1, 2)
"""Version 1 folders (no checksum of config.json) still load."""
SAE_CONFIG_FILE = "config.json"
SAE_WEIGHTS_FILE = "model.safetensors"

CHECKED_FILES = (
    CODES_FILE,
    LENGTHS_FILE,
    IDF_FILE,
    DOCIDS_FILE,
    PASSAGES_FILE,
    FAISS_FILE,
    f"{SAE_DIR}/{SAE_CONFIG_FILE}",
    f"{SAE_DIR}/{SAE_WEIGHTS_FILE}",
)
"""Every file of an index folder, each with its SHA-256 in the manifest, all verified on load; the
manifest itself carries a checksum of its own content (configs included)."""

CACHE_VALUES_FILE = "values.npy"
CACHE_OFFSETS_FILE = "offsets.npy"
CACHE_TIMING_FILE = "timing.json"
"""Files of one activation-cache entry; the offsets are written last and mark the entry complete."""
