"""File names and format versions of everything ragsae writes to disk, in one place.

What changed between format versions is in CHANGELOG.md.
"""

INDEX_FORMAT_VERSION = 5
MANIFEST_FILE = "manifest.json"
LOCK_FILE = "write.lock"
"""Held (flock) by the one process that may change an index at a time; not part of the index's content."""
SALT_FILE = "sanitize.salt"
"""The hash-mode sanitisation salt (`text/sanitize.py`) of an index that does not take it from the
environment: random bytes, readable by the owner only, never named in the manifest (which holds only its
fingerprint) and never replaced."""
PRIVATE_FILES = (SALT_FILE,)
"""Files that stay readable by their owner only when a folder gets the umask's permissions
(`storage.apply_umask`)."""
SAE_VERSIONS_DIR = "sae"
"""One folder per SAE version, `sae/v1`, `sae/v2`, ... (`sae_version_folder`)."""
SEGMENTS_DIR = "segments"
"""One folder per segment, `segments/000001`, ...: written once, never changed."""
HISTORY_DIR = "history"
"""Drift reports, `history/drift-GENERATION.jsonl` (a new file per change, the old one removed after)."""

CODES_FILE = "codes.npz"
DROPPED_FILE = "dropped.npz"
LENGTHS_FILE = "lengths.npy"
DOCIDS_FILE = "docids.txt"
PASSAGES_FILE = "passages.jsonl"
FAISS_FILE = "faiss.index"
SEGMENT_FILES = (CODES_FILE, DROPPED_FILE, LENGTHS_FILE, DOCIDS_FILE, PASSAGES_FILE, FAISS_FILE)
"""Every file of a segment folder, each with its SHA-256 in the manifest, all verified on load; the
manifest itself carries a checksum of its own content (configs and the SAE versions included)."""
MILVUS_LITE_FILE = "milvus.db"
"""The Milvus Lite store of an index served by Milvus (`retrieval/backends/milvus.py`), inside its folder by
default: a folder that changes in place, so not named in the manifest's file checks."""

SAE_FORMAT_VERSION = 2
SAE_READABLE_VERSIONS = (1, 2)
"""Version 1 folders (no checksum of config.json) still load."""
SAE_CONFIG_FILE = "config.json"
SAE_WEIGHTS_FILE = "model.safetensors"
SAE_FILES = (SAE_CONFIG_FILE, SAE_WEIGHTS_FILE)


def sae_version_folder(version: int) -> str:
    return f"{SAE_VERSIONS_DIR}/v{version}"


def segment_folder(number: int) -> str:
    return f"{SEGMENTS_DIR}/{number:06d}"


def deletes_file(segment: str, generation: int) -> str:
    """Tombstones of a segment as of a generation: the sorted rows deleted from it (int64 .npy)."""
    return f"{segment}/deleted-{generation:06d}.npy"


def history_file(generation: int) -> str:
    return f"{HISTORY_DIR}/drift-{generation:06d}.jsonl"


CACHE_VALUES_FILE = "values.npy"
CACHE_OFFSETS_FILE = "offsets.npy"
CACHE_TIMING_FILE = "timing.json"
"""Files of one activation-cache entry; the offsets are written last and mark the entry complete."""
