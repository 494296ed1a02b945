"""The on-disk cache of decoded image trees: an uncompressed ``.npz`` per source in ``cache_dir`` (else
``$MIMKIT_CACHE``, else ``~/.cache/mimkit``), written atomically, named by a hash of the source's key.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mimkit.data.sources.common import (
    LogFn,
    describe_conversions,
    report_skipped,
    unreadable_error,
)
from mimkit.data.sources.decode import _Decoded

_CACHE_VERSION = "1"  # bump when the cache layout or decoding changes


def default_cache_dir() -> Path:
    """``$MIMKIT_CACHE`` if set, else ``~/.cache/mimkit``."""
    env = os.environ.get("MIMKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mimkit"


def _cache_file(cache_dir: str | os.PathLike | None, kind: str, key: str) -> Path:
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{kind}|{key}".encode()).hexdigest()[:20]
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"{kind}-{digest}.npz"


def _save_cache(path: Path, d: _Decoded, log: LogFn) -> bool:
    """Write ``d`` to ``path`` atomically (temporary file + os.replace); False when not writable."""
    arrays: dict[str, np.ndarray] = {"train_images": d.train_images}
    for k in ("train_labels", "test_images", "test_labels"):
        if getattr(d, k) is not None:
            arrays[k] = getattr(d, k)
    if d.classes is not None:
        arrays["classes"] = np.array(d.classes, dtype=str)
    arrays["skipped"] = np.array([f"{n}\t{r}" for n, r in d.skipped], dtype=str).reshape(-1)
    arrays["converted"] = np.array([f"{m}\t{n}" for m, n in d.converted.items()], dtype=str).reshape(-1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)  # uncompressed: loads in well under a second
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log(f"could not write the data cache {path} ({e}); continuing without it")
        return False
    return True


def _load_cache(path: Path, log: LogFn) -> _Decoded | None:
    """The cached arrays at ``path``, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        return _Decoded(
            train_images=a["train_images"],
            train_labels=a.get("train_labels"),
            test_images=a.get("test_images"),
            test_labels=a.get("test_labels"),
            classes=[str(c) for c in a["classes"]] if "classes" in a else None,
            skipped=[tuple(s.split("\t", 1)) for s in a["skipped"].tolist()],  # type: ignore[misc]
            converted={m: int(n) for m, n in (c.split("\t", 1) for c in a["converted"].tolist())}
            if "converted" in a else {},  # caches written before the count existed: unknown
        )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        log(f"ignoring unreadable data cache {path} ({e})")
        return None


def _cached_decode(
    kind: str, key: str, source: Path, decode: Callable[[], _Decoded], *, cache_dir, strict: bool, log: LogFn
) -> _Decoded:
    """Return the cached arrays for ``key`` or run ``decode`` and cache its result."""
    path = _cache_file(cache_dir, kind, key)
    start = time.perf_counter()
    d = _load_cache(path, log)
    if d is not None:
        n = len(d.train_images) + (0 if d.test_images is None else len(d.test_images))
        log(f"loaded {n} decoded images of {source} from the cache {path} in {time.perf_counter() - start:.1f} s")
    else:
        d = decode()
        n = len(d.train_images) + (0 if d.test_images is None else len(d.test_images))
        saved = _save_cache(path, d, log)
        log(
            f"decoded {n} images from {source} in {time.perf_counter() - start:.1f} s"
            + (f" (cached at {path})" if saved else "")
        )
    if strict and d.skipped:
        raise unreadable_error(*d.skipped[0])
    report_skipped(d.skipped, log)
    conversions = describe_conversions(d.converted, "grey (L)" if d.train_images.shape[1] == 1 else "RGB")
    if conversions:
        log(f"{conversions} while decoding {source}")
    return d


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

