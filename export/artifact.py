"""Export artifacts: a folder holding the graph (``model.onnx`` or ``model.engine``) and ``manifest.json``.

The manifest makes the folder self-describing, so a backend needs nothing else: the model's metadata (its card,
network config and diffusion schedule, from which a backend rebuilds the schedule the samplers need), the graph's
inputs and outputs, its precision and what it is for, how it was calibrated, the parity measured at export, the
command and library versions that made it, and the sha256 of each file.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from distill.checkpoint import file_sha256 as sha256  # noqa: F401  (the artifact modules' name for it)
from distill.errors import UsageError
from distill.rundir import staged_dir  # noqa: F401  (where the export modules take it from)

EXPORT_FORMAT = "distill.export/1"
MANIFEST = "manifest.json"
GRAPH_FILES = {"onnx": "model.onnx", "tensorrt": "model.engine"}


def library_versions() -> dict[str, str]:
    """Versions of what made or runs an artifact (absent libraries are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxconverter-common", "tensorrt",
                 "nvidia-modelopt"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def artifact_dir(path: Path | str) -> Path:
    """The artifact folder for a folder, its manifest, or its graph file."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def is_artifact(path: Path | str) -> bool:
    path = Path(path)
    return path.exists() and (artifact_dir(path) / MANIFEST).is_file() and (path.is_dir() or path.suffix in (
        ".onnx", ".engine", ".json"))


def read_manifest(path: Path | str) -> dict[str, Any]:
    """The manifest of an artifact folder (or of the graph file inside it); a one-line UsageError if unusable."""
    folder = artifact_dir(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise UsageError(f"{path}: no {MANIFEST} beside it; pass a folder written by 'distill export'")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{file}: unreadable manifest ({e}); export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise UsageError(f"{file}: not a distill export manifest (format {manifest.get('format')!r}); export the "
                         "model again with 'distill export'")
    graph = folder / manifest.get("graph", "")
    if not graph.is_file():
        raise UsageError(f"{folder}: the manifest names {manifest.get('graph')!r}, which is missing; export again")
    check_files(folder, manifest)
    manifest["path"] = str(graph)
    return manifest


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: each file hashed once per process


def _digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256(path)
    return _DIGESTS[key]


def check_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists (its ``files``: name -> sha256, recorded when the artifact was written) is
    there with those bytes; else a one-line UsageError. A damaged graph never reaches ONNX Runtime or TensorRT."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return  # written before manifests recorded their files
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise UsageError(f"{path}: missing, though {folder / MANIFEST} lists it; export again")
        if _digest(path) != digest:
            raise UsageError(f"{path}: its bytes differ from those {folder / MANIFEST} recorded (damaged or changed "
                             "after the export); export again")


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def check_export_out(out: Path, option: str = "--out", marker: str = MANIFEST, what: str = "an export") -> None:
    """Refuse an output folder holding anything but an earlier export (recognised by its ``marker`` file; the new
    one replaces it whole); hidden entries (a lock, a run's bookkeeping) do not count."""
    from distill.preflight import check_output_dir

    out = Path(out)
    check_output_dir(out, option)
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()) and not (out / marker).is_file():
        raise UsageError(f"{option} {out}: a non-empty folder that is not {what}; choose a new folder (an "
                         "earlier export's folder is replaced whole)")
