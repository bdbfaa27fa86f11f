"""The index folder format: what `Index` writes and reads, with every check.

A folder holds `manifest.json` (the commit point: format version, generation, LLM id and hash,
layer, configs, SAE versions with their lineage, the segments with each file's SHA-256 and their
tombstone files, counts, library versions, drift history file, sanitisation audit and salt
fingerprint, and for an index served by Milvus its `serving` record), `sae/vN/` (one folder per SAE
version), `segments/NNNNNN/` (written once, never changed), `history/` and, for a hash-mode index
without `salt_env`, `sanitize.salt` (owner-only, never named by the manifest, never replaced). The
Milvus Lite store of a Milvus-served index (`milvus.db`) changes in place: no manifest checksum covers
it. A change writes new files under new names, then replaces the manifest (flushed to disk): a crash
at any moment leaves the old manifest or the new one, each naming only complete files. Files no
manifest names are removed after the commit and by the next writer (`collect_garbage`). File names
and the format version are in `layout.py`.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..config import BuildConfig
from ..errors import IndexFolderError, RagsaeError, SaeLoadError
from ..latents import LATENTS_FILE, LatentCatalog
from ..layout import (
    HISTORY_DIR,
    INDEX_FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST_FILE,
    SAE_FILES,
    SAE_VERSIONS_DIR,
    SEGMENT_FILES,
    SEGMENTS_DIR,
)
from ..retrieval.backends.milvus import check_record
from ..retrieval.scoring import CorpusStatistics
from ..sae import SparseAutoencoder, load_sae
from ..storage import file_sha256, json_checksum, read_versioned_json, recover_folder, write_json_atomic
from ..text import Audit
from .segment import Segment, read_segment, verify_file

T = TypeVar("T")

SEGMENT_NAME = re.compile(r"^segments/\d{6}$")
DELETES_NAME = re.compile(r"^segments/\d{6}/deleted-\d{6}\.npy$")
SAE_FOLDER_NAME = re.compile(r"^sae/v\d+$")
HISTORY_NAME = re.compile(r"^history/drift-\d{6}\.jsonl$")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def occupied(path: str | Path) -> bool:
    """True when `path` exists and is not an empty folder (an empty folder may be built into)."""
    path = Path(path)
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


def is_index_folder(path: str | Path) -> bool:
    """True for a folder with a manifest that says it is a ragsae index (of any format version)."""
    manifest = Path(path) / MANIFEST_FILE
    try:
        return Path(path).is_dir() and "format_version" in json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def check_writable(path: str | Path, overwrite: bool, protected: Path | None = None) -> None:
    """IndexFolderError unless an index may be written at `path`: nothing there, an empty folder, or
    (with `overwrite`) an index folder. `overwrite` never replaces a file or a folder that is not an
    index, nor a folder holding `protected` (the corpus being indexed)."""
    path = Path(path)
    if protected is not None:
        target, source = path.resolve(), protected.resolve()
        if target == source or target in source.parents:
            raise IndexFolderError(f"{path}: holds the corpus {protected}; choose another output folder")
    if not occupied(path):
        return
    if not overwrite:
        raise IndexFolderError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    if not is_index_folder(path):
        raise IndexFolderError(f"{path}: exists and is not a ragsae index folder; refusing to replace it")


def sae_files(root: Path, folder: str) -> dict[str, str]:
    return {name: file_sha256(root / folder / name) for name in SAE_FILES}


def current_sae_version(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's record of the SAE version the index uses (`read_manifest` checked it exists)."""
    return next(v for v in manifest["sae"]["versions"] if v["version"] == manifest["sae"]["current"])


def write_catalog(root: Path, folder: str, catalog: LatentCatalog | None) -> dict[str, str] | None:
    """Write an SAE version's latent catalog into its folder; the manifest's record of it (None: none)."""
    if catalog is None:
        return None
    (name,) = catalog.save(root / folder)
    return {"file": f"{folder}/{name}", "sha256": file_sha256(root / folder / name)}


def load_catalog(path: str | Path, num_latents: int, manifest: dict[str, Any] | None = None) -> LatentCatalog | None:
    """The current SAE version's latent catalog, checked against the manifest; None when it has none."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    current = current_sae_version(manifest)
    record = current.get("latents")
    if record is None:
        return None
    file = path / record["file"]
    verify_file(file, record["sha256"])
    return LatentCatalog.load(file.parent, num_latents)


def build_manifest(
    *,
    created: str,
    generation: int,
    llm: dict[str, Any],
    config: dict[str, Any],
    sae_versions: list[dict[str, Any]],
    current_sae: int,
    segments: list[Segment],
    history: dict[str, Any] | None,
    library_versions: dict[str, str],
    sanitize_audit: dict[str, Any] | None = None,
    salt_fingerprint: str | None = None,
    serving: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of an index whose files are all written; its checksum covers every field.

    `sanitize_audit` is what sanitisation replaced over every build and add (counts per entity type,
    never values; None when it is off), `salt_fingerprint` names the hash-mode salt without revealing
    it (the salt itself is never in the manifest). `serving` names the Milvus collection that serves the
    index (`retrieval/backends/milvus.py`; absent for an index served from its segments): it changes in
    place, so no checksum of it is kept."""
    live = [p for s in segments for p in (s.passages[i] for i in s.live)]
    manifest: dict[str, Any] = {
        "format_version": INDEX_FORMAT_VERSION,
        "created": created,
        "updated": now(),
        "generation": generation,
        "versions": library_versions,
        "llm": llm,
        "layer": config["capture"]["layer"],
        "config": config,
        "sae": {"current": current_sae, "versions": sae_versions},
        "segments": [
            {"name": s.name, "sae_version": s.sae_version, "rows": s.rows, "files": s.files, "deleted": s.deletes}
            for s in segments
        ],
        "counts": {
            "passages": len(live),
            "documents": len({p.doc_id for p in live}),
            "rows": sum(s.rows for s in segments),
            "segments": len(segments),
            "deleted": sum(int(s.deleted.sum()) for s in segments),
            "nonzeros": sum(int(s.codes.nnz) for s in segments),
        },
        "history": history,
        "sanitize_audit": sanitize_audit,
        "salt_fingerprint": salt_fingerprint,
    }
    if serving is not None:
        manifest["serving"] = serving
    manifest["checksum"] = json_checksum(manifest)
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """The commit point of every change: replace the manifest atomically, flushed to disk."""
    write_json_atomic(root / MANIFEST_FILE, manifest, durable=True)


def referenced_paths(manifest: dict[str, Any]) -> set[str]:
    """Every file and folder (relative to the index) a manifest names."""
    names = {MANIFEST_FILE, LOCK_FILE, SEGMENTS_DIR, SAE_VERSIONS_DIR, HISTORY_DIR}
    for version in manifest["sae"]["versions"]:
        if version.get("folder"):
            names.add(version["folder"])
            names.update(f"{version['folder']}/{file}" for file in version["files"])
            if version.get("latents"):
                names.add(version["latents"]["file"])
    for segment in manifest["segments"]:
        names.add(segment["name"])
        names.update(f"{segment['name']}/{file}" for file in segment["files"])
        if segment["deleted"] is not None:
            names.add(segment["deleted"]["file"])
    if manifest.get("history"):
        names.add(manifest["history"]["file"])
    return names


def collect_garbage(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Remove what the manifest does not name (older tombstones, merged segments, files of a change
    that crashed before its commit); what was removed. Only a writer holding the lock calls this;
    a reader that loses a file to it retries from the newer manifest (`read_index_folder`)."""
    keep = referenced_paths(manifest)
    removed = []
    for area in (SEGMENTS_DIR, SAE_VERSIONS_DIR, HISTORY_DIR):
        folder = root / area
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            name = f"{area}/{entry.name}"
            if name not in keep:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(name)
            elif area == SEGMENTS_DIR and entry.is_dir():
                for file in sorted(entry.iterdir()):
                    if f"{name}/{file.name}" not in keep:
                        file.unlink(missing_ok=True)
                        removed.append(f"{name}/{file.name}")
    return removed


def next_segment_number(root: Path) -> int:
    """One more than every segment folder present, committed or left by a crash."""
    folder = root / SEGMENTS_DIR
    numbers = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(numbers, default=0) + 1


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an index folder, checked: format version, its own checksum (which covers the
    configs, the SAE versions, the segments and their file checksums), and the type of every field
    the loader reads."""
    path = Path(path)
    recover_folder(path)
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = read_versioned_json(
            manifest_path, INDEX_FORMAT_VERSION, IndexFolderError, "a ragsae index", checksummed_from=4
        )
    except IndexFolderError as error:
        if "format_version 4" in str(error) or "format_version 3" in str(error):
            raise IndexFolderError(
                f"{error}. Rebuild it with this version; its SAE can be reused without retraining: "
                f"ragsae build CORPUS -o NEW --sae {path / 'sae'}"
            ) from None
        raise

    def field(value: Any, dotted: str, kind: type | tuple[type, ...]) -> Any:
        for key in dotted.split("."):
            if not isinstance(value, dict) or key not in value:
                raise IndexFolderError(f"{manifest_path}: missing field {dotted!r}")
            value = value[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise IndexFolderError(f"{manifest_path}: field {dotted!r} has the wrong type ({type(value).__name__})")
        return value

    for dotted, kind in (
        ("generation", int),
        ("created", str),
        ("llm.model_id", str),
        ("llm.model_hash", str),
        ("layer", int),
        ("config", dict),
        ("sae.current", int),
        ("sae.versions", list),
        ("segments", list),
        ("counts.passages", int),
    ):
        field(manifest, dotted, kind)
    versions = {}
    for i, version in enumerate(manifest["sae"]["versions"]):
        where = f"sae.versions[{i}]"
        number = field(version, "version", int)
        folder = version.get("folder")
        if folder is not None and (not isinstance(folder, str) or not SAE_FOLDER_NAME.match(folder)):
            raise IndexFolderError(f"{manifest_path}: field '{where}.folder' is not an SAE version folder name")
        if folder is not None and set(field(version, "files", dict)) != set(SAE_FILES):
            raise IndexFolderError(f"{manifest_path}: field '{where}.files' must list {', '.join(SAE_FILES)}")
        latents = version.get("latents")
        if latents is not None and (
            not isinstance(latents, dict)
            or not isinstance(latents.get("sha256"), str)
            or latents.get("file") != f"{folder}/{LATENTS_FILE}"
        ):
            raise IndexFolderError(f"{manifest_path}: field '{where}.latents' does not name the version's catalog")
        versions[number] = version
    current = manifest["sae"]["current"]
    if current not in versions or not versions[current].get("folder"):
        raise IndexFolderError(f"{manifest_path}: field 'sae.current' names no stored SAE version")
    for i, segment in enumerate(manifest["segments"]):
        where = f"segments[{i}]"
        if not SEGMENT_NAME.match(str(field(segment, "name", str))):
            raise IndexFolderError(f"{manifest_path}: field '{where}.name' is not a segment folder name")
        if field(segment, "sae_version", int) != current:
            raise IndexFolderError(f"{manifest_path}: field '{where}.sae_version' is not the current SAE version")
        if field(segment, "rows", int) < 1:
            raise IndexFolderError(f"{manifest_path}: field '{where}.rows' must be >= 1")
        if set(field(segment, "files", dict)) != set(SEGMENT_FILES):
            raise IndexFolderError(f"{manifest_path}: field '{where}.files' must list {', '.join(SEGMENT_FILES)}")
        deleted = segment.get("deleted")
        if deleted is not None:
            if not DELETES_NAME.match(str(field(deleted, "file", str))) or not deleted["file"].startswith(
                segment["name"] + "/"
            ):
                raise IndexFolderError(f"{manifest_path}: field '{where}.deleted.file' is not a tombstone file name")
            field(deleted, "sha256", str)
            if not 0 <= field(deleted, "count", int) <= segment["rows"]:
                raise IndexFolderError(f"{manifest_path}: field '{where}.deleted.count' out of range")
    if not manifest["segments"]:
        raise IndexFolderError(f"{manifest_path}: field 'segments' is empty")
    history = manifest.get("history")
    if history is not None:
        if not HISTORY_NAME.match(str(field(history, "file", str))):
            raise IndexFolderError(f"{manifest_path}: field 'history.file' is not a history file name")
        field(history, "sha256", str)
    if manifest.get("sanitize_audit") is not None:
        try:
            Audit.from_dict(manifest["sanitize_audit"])
        except IndexFolderError as error:
            raise IndexFolderError(f"{manifest_path}: field 'sanitize_audit': {error}") from None
    fingerprint = manifest.get("salt_fingerprint")
    if fingerprint is not None and not (isinstance(fingerprint, str) and re.fullmatch(r"[0-9a-f]{16}", fingerprint)):
        raise IndexFolderError(f"{manifest_path}: field 'salt_fingerprint' is not 16 hex digits")
    if manifest.get("serving") is not None and (fault := check_record(manifest["serving"])) is not None:
        raise IndexFolderError(f"{manifest_path}: field 'serving' {fault}")
    return manifest


@dataclass
class IndexContents:
    """Everything an index folder holds, checked against its manifest."""

    manifest: dict[str, Any]
    config: BuildConfig
    sae: SparseAutoencoder
    segments: list[Segment]
    history: list[dict[str, Any]]


def read_index_folder(path: str | Path, attempts: int = 5) -> IndexContents:
    """Read an index folder, verifying every file's checksum, shapes and values against the manifest
    (the LLM is checked by the caller, which has it). Nothing is unpickled.

    A writer may commit a change while this reads, and then remove files the older manifest named: the
    read starts again from the new manifest (up to `attempts` times), so a reader always sees one
    committed state whole."""
    path = Path(path)
    for attempt in range(attempts):
        manifest = read_manifest(path)
        try:
            return read_contents(path, manifest)
        except (IndexFolderError, OSError) as error:
            if attempt + 1 == attempts or read_manifest(path)["generation"] == manifest["generation"]:
                if isinstance(error, IndexFolderError):
                    raise
                raise IndexFolderError(
                    f"{path}: could not read {error.filename or 'a file'} ({error.strerror})"
                ) from None
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def read_contents(path: Path, manifest: dict[str, Any]) -> IndexContents:
    manifest_path = path / MANIFEST_FILE
    try:
        config = BuildConfig.from_dict(manifest["config"])
    except RagsaeError as error:
        raise IndexFolderError(f"{manifest_path}: field 'config': {error}") from None
    if config.capture.layer != manifest["layer"]:
        raise IndexFolderError(f"{manifest_path}: 'layer' disagrees with 'config.capture.layer'")
    current = current_sae_version(manifest)
    sae_folder = path / current["folder"]
    for name, digest in current["files"].items():
        verify_file(sae_folder / name, digest)
    latents = current.get("latents")
    if latents is not None:  # read on first use (`Index.catalog`), checked now like every file
        verify_file(path / latents["file"], latents["sha256"])
    try:
        sae = load_sae(sae_folder)  # verifies the weights against its own header
    except SaeLoadError as error:
        raise IndexFolderError(str(error)) from None
    try:
        CorpusStatistics.from_json(sae.metadata.get("reference"), sae.num_latents)
    except ValueError as error:
        raise IndexFolderError(f"{sae_folder / SAE_FILES[0]}: metadata 'reference': {error}") from None
    segments = [read_segment(path, record, sae.num_latents, sae.d_model) for record in manifest["segments"]]
    seen: set[str] = set()
    for segment in segments:
        for row in segment.live:
            pid = segment.passages[row].passage_id
            if pid in seen:
                raise IndexFolderError(f"{path / segment.name}: live passage id {pid!r} appears twice")  # type: ignore[operator]
            seen.add(pid)
    if len(seen) != manifest["counts"]["passages"]:
        raise IndexFolderError(
            f"{manifest_path}: counts.passages is {manifest['counts']['passages']}, found {len(seen)}"
        )
    return IndexContents(manifest, config, sae, segments, read_history(path, manifest.get("history")))


def read_history(root: Path, record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The drift reports, oldest first."""
    if record is None:
        return []
    path = root / record["file"]
    verify_file(path, record["sha256"])
    reports = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            report = json.loads(line)
        except json.JSONDecodeError as error:
            raise IndexFolderError(f"{path}:{number}: not a JSON report ({error.msg})") from None
        if not isinstance(report, dict):
            raise IndexFolderError(f"{path}:{number}: not a JSON object")
        reports.append(report)
    return reports


def verify_index_folder(path: str | Path) -> dict[str, Any]:
    """Check everything in an index folder that can be checked without the LLM (`read_index_folder`);
    a summary of what was checked, or IndexFolderError naming the first fault."""
    contents = read_index_folder(path)
    manifest = contents.manifest
    return {
        "path": str(path),
        "format_version": manifest["format_version"],
        "generation": manifest["generation"],
        "passages": manifest["counts"]["passages"],
        "documents": manifest["counts"]["documents"],
        "segments": len(contents.segments),
        "files_checked": 1
        + len(SAE_FILES)
        + sum(len(s.files) + (s.deletes is not None) for s in contents.segments)
        + (manifest.get("history") is not None),
        "llm": manifest["llm"]["model_id"],
    }


def unchanged_on_os_error(action: Callable[[], T], path: Path) -> T:
    """`action()`, with an OSError (disk full, permissions, ...) turned into an IndexFolderError that
    names the file and says that the index at `path` is as it was."""
    try:
        return action()
    except OSError as error:
        reason = "disk full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise IndexFolderError(
            f"{path}: could not write the index ({reason}: {error.filename or path}); "
            "whatever was at this path before is unchanged"
        ) from error
