"""Locate, verify and (opt-in) download the Fashion-MNIST IDX files.

Search order (first directory holding all four files wins):

1. ``root`` if given (``root`` itself, then ``root/fashion-mnist``); when ``root`` is given no
   other place is searched, so an explicit data directory is never silently overridden.
2. ``$ULR_DATA_DIR`` (itself, then ``$ULR_DATA_DIR/fashion-mnist``).
3. ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``).
4. The user cache, ``$XDG_CACHE_HOME/ulr/fashion-mnist`` (default ``~/.cache/ulr/fashion-mnist``).

Each file may be gzip-compressed (``*.gz``, as distributed) or already gunzipped.

Checksums are SHA-256 digests of the *decompressed* IDX content. The Debian package re-gzips the
files, so its ``.gz`` bytes differ from upstream's, but the decompressed content is identical:
the digests below were computed from the Debian files, and their MD5 equivalents match the
raw-file MD5s published alongside the upstream ``.gz`` MD5s (8d4fb7e6..., 25c81989...,
bef4ecab..., bb300cfd...), which torchvision and others also use.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from .idx import parse_idx, read_idx_bytes

__all__ = [
    "APT_PACKAGE",
    "ENV_VAR",
    "MIRRORS",
    "SYSTEM_DIR",
    "default_cache_dir",
    "download",
    "find_files",
    "load_arrays",
    "search_dirs",
]

logger = logging.getLogger(__name__)

APT_PACKAGE = "dataset-fashion-mnist"
ENV_VAR = "ULR_DATA_DIR"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRRORS: tuple[str, ...] = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)

# key -> (file name without ".gz", SHA-256 of the decompressed IDX content)
FILES: dict[str, tuple[str, str]] = {
    "train_images": (
        "train-images-idx3-ubyte",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train_labels": (
        "train-labels-idx1-ubyte",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "test_images": (
        "t10k-images-idx3-ubyte",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "test_labels": (
        "t10k-labels-idx1-ubyte",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}

_NETWORK_ERRORS = (OSError, http.client.HTTPException)


def default_cache_dir() -> Path:
    """Return the per-user download directory for Fashion-MNIST."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ulr" / "fashion-mnist"


def search_dirs(root: str | Path | None = None) -> list[Path]:
    """Return the directories searched for the four files, in order (see module docstring)."""
    if root is not None:
        return [Path(root), Path(root) / "fashion-mnist"]
    dirs: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        dirs += [Path(env), Path(env) / "fashion-mnist"]
    return [*dirs, SYSTEM_DIR, default_cache_dir()]


def _find_in(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for key, (stem, _) in FILES.items():
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                found[key] = candidate
                break
    return found


def find_files(root: str | Path | None = None) -> dict[str, Path] | None:
    """Find a complete set of the four files.

    Args:
        root: Explicit data directory; if given, only it (and ``root/fashion-mnist``) is searched.

    Returns:
        Mapping ``{"train_images", "train_labels", "test_images", "test_labels"} -> path`` from
        the first directory that holds all four, or ``None``.
    """
    for directory in search_dirs(root):
        found = _find_in(directory)
        if len(found) == len(FILES):
            return found
    return None


def _help_text(root: str | Path | None) -> str:
    names = ", ".join(f"{stem}.gz" for stem, _ in FILES.values())
    searched = "\n".join(f"  - {d}" for d in search_dirs(root))
    return (
        f"Fashion-MNIST files ({names}) were not found. Searched:\n{searched}\n"
        "Fix one of:\n"
        f"  - Debian/Ubuntu: sudo apt-get install {APT_PACKAGE}  (installs into {SYSTEM_DIR})\n"
        f"  - put the four files in a directory and pass root=... or set {ENV_VAR}\n"
        f"  - call load('fashion-mnist', download=True) (or ulr.data.download_fashion_mnist()) "
        f"to fetch them from {MIRRORS[0]} into {Path(root) if root else default_cache_dir()}"
    )


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to ``dest`` (overwritten). Raises ``OSError`` on network failure."""
    with urllib.request.urlopen(url, timeout=timeout) as response, dest.open("wb") as f:
        shutil.copyfileobj(response, f)


def _sha256_of_content(path: Path) -> str:
    return hashlib.sha256(read_idx_bytes(path)).hexdigest()


def download(dest: str | Path | None = None, *, force: bool = False, timeout: float = 60.0) -> Path:
    """Download the four official Fashion-MNIST ``.gz`` files, verifying their checksums.

    Each file is written to a temporary file in ``dest``, its decompressed SHA-256 is checked,
    and only then is it renamed into place, so an interrupted or corrupt download never leaves a
    file that looks complete. Files already present (and valid) are kept unless ``force``.

    Args:
        dest: Target directory; defaults to :func:`default_cache_dir`.
        force: Re-download files that already exist.
        timeout: Per-request timeout in seconds.

    Returns:
        The directory holding the four files.

    Raises:
        ValueError: If a downloaded file fails its checksum on every mirror.
        ConnectionError: If a file cannot be fetched from any mirror (e.g. no network); the
            message says where to put the files manually and which apt package provides them.
    """
    dest = Path(dest) if dest is not None else default_cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for stem, sha256 in FILES.values():
        target = dest / f"{stem}.gz"
        if target.is_file() and not force:
            try:
                if _sha256_of_content(target) == sha256:
                    continue
            except ValueError:
                pass
        network_errors: list[str] = []
        bad_checksums: list[str] = []
        for mirror in MIRRORS:
            url = mirror + f"{stem}.gz"
            fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.part-", suffix=".gz", dir=dest)
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                logger.info("downloading %s", url)
                try:
                    _fetch(url, tmp, timeout)
                except _NETWORK_ERRORS as e:
                    network_errors.append(f"{url}: {e}")
                    continue
                try:
                    digest = _sha256_of_content(tmp)
                except ValueError as e:
                    bad_checksums.append(f"{url}: {e}")
                    continue
                if digest != sha256:
                    bad_checksums.append(f"{url}: sha256 {digest}, expected {sha256}")
                    continue
                os.replace(tmp, target)
                break
            finally:
                tmp.unlink(missing_ok=True)
        else:
            if bad_checksums:
                raise ValueError(
                    f"checksum mismatch for {stem}.gz (decompressed SHA-256):\n  "
                    + "\n  ".join(bad_checksums)
                    + f"\nNothing was written to {target}. Install the apt package "
                    f"{APT_PACKAGE} or copy verified files into {dest}."
                )
            raise ConnectionError(
                f"could not download {stem}.gz:\n  "
                + "\n  ".join(network_errors)
                + f"\nOffline fix: sudo apt-get install {APT_PACKAGE} (files land in "
                f"{SYSTEM_DIR}), or copy the four .gz files into {dest} or into a directory "
                f"named by root=... / ${ENV_VAR}."
            )
    return dest


_download_files = download  # `load_arrays` shadows the name with its flag


def _load_verified(path: Path, sha256: str) -> np.ndarray:
    data = read_idx_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(
            f"{path}: not the official Fashion-MNIST file (decompressed SHA-256 {digest}, "
            f"expected {sha256}). Delete it and re-download, or reinstall {APT_PACKAGE}."
        )
    return parse_idx(data, source=str(path))


def load_arrays(
    root: str | Path | None = None, *, download: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load the raw Fashion-MNIST arrays, downloading them first only if asked to.

    Args:
        root: Explicit data directory (only it is searched; downloads go there).
        download: If the files are not found, fetch them (into ``root`` or the user cache).
            With ``False`` (default) the network is never touched.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: ``uint8`` arrays of shapes ``[60000, 28, 28]``,
        ``[60000]``, ``[10000, 28, 28]``, ``[10000]``; labels in ``0..9``.

    Raises:
        FileNotFoundError: Files missing and ``download`` is false; the message lists the
            directories searched and the fixes.
        ValueError: A file is corrupt, truncated or fails its checksum (the message names it).
        ConnectionError: ``download=True`` but the files cannot be fetched.
    """
    paths = find_files(root)
    if paths is None:
        if not download:
            raise FileNotFoundError(_help_text(root))
        _download_files(root)
        paths = find_files(root)
        if paths is None:  # pragma: no cover - download() guarantees the files
            raise FileNotFoundError(_help_text(root))
    arrays = {key: _load_verified(paths[key], sha) for key, (_, sha) in FILES.items()}
    x_train, y_train = arrays["train_images"], arrays["train_labels"]
    x_test, y_test = arrays["test_images"], arrays["test_labels"]
    for images, labels, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {split} files disagree: images {images.shape}, labels "
                f"{labels.shape} ({paths[f'{split}_images']})"
            )
    return x_train, y_train, x_test, y_test
