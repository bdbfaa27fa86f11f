"""File names and format versions of everything ragsae writes to disk, in one place.

What changed between format versions is in CHANGELOG.md.
"""

INDEX_FORMAT_VERSION = 3
MANIFEST_FILE = "manifest.json"
CODES_FILE = "codes.npz"
LENGTHS_FILE = "lengths.npy"
IDF_FILE = "idf.npy"
DOCIDS_FILE = "docids.txt"
PASSAGES_FILE = "passages.jsonl"
FAISS_FILE = "faiss.index"
SAE_DIR = "sae"
CHECKED_FILES = (CODES_FILE, LENGTHS_FILE, IDF_FILE, DOCIDS_FILE, PASSAGES_FILE, FAISS_FILE)
"""Index files whose SHA-256 the manifest records and `Index.load` verifies."""

SAE_FORMAT_VERSION = 1
SAE_CONFIG_FILE = "config.json"
SAE_WEIGHTS_FILE = "model.safetensors"

CACHE_VALUES_FILE = "values.npy"
CACHE_OFFSETS_FILE = "offsets.npy"
CACHE_TIMING_FILE = "timing.json"
"""Files of one activation-cache entry; the offsets are written last and mark the entry complete."""
