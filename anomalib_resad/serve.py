# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""``resad serve``: an inspection server for a reference-conditioned deployment, on LitServe.

One exported model (``resad export``) inspects any number of classes, each defined by k normal images. The server
is Lightning's `LitServe <https://github.com/Lightning-AI/LitServe>`_ (FastAPI + uvicorn, inference in worker
processes); nothing here speaks HTTP itself. Endpoints:

* ``POST /classes`` (multipart): add a class from k uploaded images (``images``) or from a folder on the server
  (``folder``, inside ``--image_root``); ``name``, optional ``k`` (the first k) and ``replace``;
* ``GET /classes``: the classes with their k and reference images; ``DELETE /classes/{name}``: remove one;
* ``POST /predict`` (multipart): ``class_name`` and one or more ``image`` files -> per image the score and label as
  :class:`~anomalib_resad.deploy.ReferenceConditionedInferencer` gives them (normalised: 0.5 is the class's own
  threshold), the class, and the anomaly map as a 16-bit grayscale PNG (base64; pixel / 65535 = the normalised map).

Each class is one references file, ``<classes_dir>/<name>.npz`` - the file ``resad references --output`` writes, so
files made elsewhere can be dropped in. Files are written atomically (a temporary file, then a rename); the predict
workers read a class's file when they first need it and again whenever it changes, so classes survive restarts and
every worker sees the same classes. Bad input is answered with a 4xx and a one-line ``detail``: 400 (not an image,
k < 2, a bad name or field), 404 (unknown class), 409 (the class exists; send ``replace=true``), 422 (references
that cannot calibrate: duplicates, blank frames).

Example:
    >>> import tempfile
    >>> store = ClassStore(tempfile.mkdtemp())
    >>> store.path("board_a").name, store.names()
    ('board_a.npz', [])
    >>> try:
    ...     store.path("../board_a")
    ... except ServeError as error:
    ...     print(error.status)
    400
"""

import base64
import io
import json
import logging
import os
import re
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ResADConfigurationError, ResADError, ResADInputError
from .images import pil_to_rgb

logger = logging.getLogger(__name__)

CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUFFIX = ".npz"
MIN_K = 2  # a class's threshold is set leave-one-out from its references
UPLOAD_PREFIX = "resad-serve-upload-"  # temporary folder of a class's uploaded images


class ServeError(Exception):
    """A request the server refuses: an HTTP status and a one-line message (becomes a FastAPI ``HTTPException``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def one_line(error: BaseException) -> str:
    r"""An error's message on one line (some of ResAD's list files on several lines).

    Example:
        >>> one_line(ValueError("2 files cannot be read:\n  a.png\n  b.png"))
        '2 files cannot be read: a.png b.png'
    """
    return " ".join(str(error).split())


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Image file bytes -> ``(H, W, 3)`` float array in ``[0, 1]``, scaled by its bit depth (:mod:`.images`).

    Example:
        >>> buffer = io.BytesIO()
        >>> Image.new("L", (4, 3), 255).save(buffer, format="PNG")
        >>> decode_image(buffer.getvalue()).shape
        (3, 4, 3)
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            return pil_to_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        reason = type(error).__name__ if isinstance(error, UnidentifiedImageError) else one_line(error)
        msg = f"'{name}' is not an image file that can be read ({reason})."
        raise ServeError(400, msg) from error


def encode_map_png(anomaly_map: np.ndarray) -> str:
    """A normalised anomaly map (values in ``[0, 1]``) as a base64 16-bit grayscale PNG.

    Example:
        >>> values = np.array([[0.0, 0.5], [0.25, 1.0]])
        >>> bool(np.abs(decode_map_png(encode_map_png(values)) - values).max() < 1e-4)
        True
    """
    values = np.asarray(anomaly_map, dtype=np.float64).squeeze()
    pixels = np.round(np.clip(values, 0.0, 1.0) * 65535).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_map_png(encoded: str) -> np.ndarray:
    """Inverse of :func:`encode_map_png`: the map as floats in ``[0, 1]``."""
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        return np.asarray(image, dtype=np.float64) / 65535.0


class ClassStore:
    """The server's classes: one references file per class, ``<directory>/<name>.npz``.

    Args:
        directory (str | Path): Folder of the references files (created if missing).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        """The references file of class ``name`` (the name is checked: it becomes a file name)."""
        if not isinstance(name, str) or not CLASS_NAME.match(name):
            msg = (
                f"Class name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', starting with a "
                "letter or digit."
            )
            raise ServeError(400, msg)
        return self.directory / f"{name}{SUFFIX}"

    def existing(self, name: str) -> Path:
        """The references file of a class that exists; 404 naming the known classes otherwise."""
        path = self.path(name)
        if not path.is_file():
            msg = f"Unknown class '{name}'; known classes: {self.names()}. Add it with POST /classes."
            raise ServeError(404, msg)
        return path

    def names(self) -> list[str]:
        """The classes, sorted (temporary files of a class being written are not classes yet)."""
        return sorted(
            path.name[: -len(SUFFIX)]
            for path in self.directory.glob(f"*{SUFFIX}")
            if path.is_file() and CLASS_NAME.match(path.name[: -len(SUFFIX)])
        )

    def describe(self, name: str) -> dict[str, Any]:
        """What a class's file says about it: k, the reference images and where they came from."""
        path = self.existing(name)
        try:
            with np.load(path, allow_pickle=False) as content:
                metadata = json.loads(str(content["metadata"]))
        except (OSError, KeyError, ValueError) as error:
            return {"name": name, "error": f"unreadable references file ({one_line(error)})"}
        selection = metadata.get("selection", {})
        return {
            "name": name,
            "k": int(metadata.get("k", 0)),
            "images": [Path(image).name for image in selection.get("paths", [])],
            "source": "upload" if UPLOAD_PREFIX in selection.get("source", "") else selection.get("source", ""),
            "file": path.name,
        }

    def remove(self, name: str) -> None:
        """Delete a class's references file (404 if there is none)."""
        self.existing(name).unlink()

    def write(self, name: str, build: Callable[[Path], Any], replace: bool = False) -> Path:
        """Write a class's file atomically: ``build(temporary path)``, then rename it into place.

        Readers see the old file or the new one, never a part of one; nothing is left behind when ``build`` fails.
        """
        path = self.path(name)
        if path.exists() and not replace:
            msg = f"Class '{name}' exists; send replace=true to replace its references, or DELETE /classes/{name}."
            raise ServeError(409, msg)
        temporary = self.directory / f".{name}.{uuid.uuid4().hex}{SUFFIX}.partial"
        try:
            build(temporary)
            if path.exists() and not replace:  # another request added it meanwhile
                msg = f"Class '{name}' was added by another request meanwhile; send replace=true to replace it."
                raise ServeError(409, msg)
            temporary.replace(path)
        finally:
            temporary.unlink(missing_ok=True)
        return path


def form_field(form: Any, key: str) -> Any:
    """A form field (the last one of that name), or ``None``; a JSON body is refused."""
    if not hasattr(form, "getlist"):
        msg = "Send the request as multipart/form-data (curl -F ...), not JSON."
        raise ServeError(400, msg)
    values = form.getlist(key)
    return values[-1] if values else None


def form_files(form: Any, key: str) -> list[tuple[str, bytes]]:
    """The uploaded files of a form field, as ``(file name, bytes)``; a plain text value is refused."""
    if not hasattr(form, "getlist"):
        msg = "Send the request as multipart/form-data (curl -F ...), not JSON."
        raise ServeError(400, msg)
    files = []
    for index, item in enumerate(form.getlist(key)):
        if not hasattr(item, "read") and not hasattr(item, "file"):
            msg = f"Field '{key}' must be a file upload (curl -F '{key}=@file.png'), got text."
            raise ServeError(400, msg)
        name = getattr(item, "filename", None) or f"{key}_{index}"
        item.file.seek(0)
        files.append((Path(name).name, item.file.read()))
    return files


def form_flag(value: Any, key: str) -> bool:
    """A yes/no form field (absent: no)."""
    if value is None or value == "":
        return False
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    msg = f"Field '{key}' must be true or false, got {value!r}."
    raise ServeError(400, msg)


def form_k(value: Any) -> int | None:
    """The ``k`` form field: ``None`` (all images given) or a whole number of at least 2."""
    if value is None or value == "":
        return None
    try:
        k = int(str(value).strip())
    except ValueError as error:
        msg = f"k must be a whole number, got {value!r}."
        raise ServeError(400, msg) from error
    if k < MIN_K:
        msg = (
            f"k={k} is too small: a class's threshold is set from its references scored against each other, which "
            f"needs k >= {MIN_K} normal images."
        )
        raise ServeError(400, msg)
    return k


def _http(error: ServeError) -> Exception:
    from fastapi import HTTPException

    return HTTPException(status_code=error.status, detail=str(error))


def refusals_as_http(function: Callable[..., Any], *arguments: Any) -> Any:
    """Call ``function``; the server's own refusals and ResAD's input errors become HTTP 4xx, one line each."""
    try:
        return function(*arguments)
    except ServeError as error:
        raise _http(error) from None
    except ResADError as error:
        raise _http(ServeError(400, one_line(error))) from None


def add_class_routes(app: Any, store: ClassStore) -> None:
    """``GET /classes`` and ``DELETE /classes/{name}`` on LitServe's FastAPI app (files only, no model)."""
    from fastapi import HTTPException

    def describe(name: str) -> dict[str, Any] | None:
        try:
            return store.describe(name)
        except ServeError:  # removed while listing
            return None

    def list_classes() -> dict[str, Any]:
        return {"classes": [entry for entry in map(describe, store.names()) if entry is not None]}

    def remove_class(name: str) -> dict[str, Any]:
        try:
            store.remove(name)
        except ServeError as error:
            raise HTTPException(status_code=error.status, detail=str(error)) from None
        return {"removed": name, "classes": store.names()}

    app.add_api_route("/classes", list_classes, methods=["GET"])
    app.add_api_route("/classes/{name}", remove_class, methods=["DELETE"])


def _stop_on_sigterm() -> None:
    """SIGTERM (and SIGINT) stop the server like Ctrl+C: LitServe then ends its worker processes too."""
    main = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        del signum, frame
        if os.getpid() == main:
            raise KeyboardInterrupt
        raise SystemExit(0)  # a forked API-server process, after uvicorn's own shutdown

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def serve(
    deployment: str,
    classes_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    image_root: str | None = None,
    workers: int = 1,
    threads: int | None = None,
    timeout: float = 120.0,
) -> None:
    """``resad serve``: inspect images of any class of a reference-conditioned deployment over HTTP (LitServe).

    Args:
        deployment (str): The folder ``resad export --checkpoint ... --export_root`` wrote.
        classes_dir (str): Folder of the classes' references files (``<name>.npz``); created if missing, kept
            across restarts.
        host (str): ``127.0.0.1`` (this machine only), ``0.0.0.0`` or ``::`` (every interface). Defaults to
            ``"127.0.0.1"``.
        port (int): Defaults to ``8000``.
        image_root (str | None): Folder under which ``POST /classes`` may read a ``folder`` of images on the
            server. Defaults to ``None`` (uploads only).
        workers (int): Predict worker processes, each with its own compiled model. Defaults to ``1``.
        threads (int | None): OpenVINO threads per predict worker. Defaults to ``None`` (OpenVINO's choice: all
            cores).
        timeout (float): Seconds a request may wait for a worker before it is answered 504. Defaults to ``120``.

    Example:
        $ resad serve --deployment deploy/ --classes_dir deploy/classes --port 8000
    """
    try:
        import litserve as ls

        from .serve_workers import AddClassAPI, PredictAPI
    except ImportError as error:
        msg = f"resad serve needs LitServe ({error}): pip install 'anomalib-resad[serve]'."
        raise ResADConfigurationError(msg) from error
    from .deploy import ReferenceConditionedInferencer

    folder = Path(deployment).resolve()
    ReferenceConditionedInferencer(folder)  # refuse a folder that is not a deployment now, in one line
    root = Path(image_root).resolve() if image_root else None
    if root is not None and not root.is_dir():
        msg = f"--image_root '{image_root}' is not a folder."
        raise ResADInputError(msg)
    store = ClassStore(classes_dir)
    for partial in store.directory.glob(f".*{SUFFIX}.partial"):  # left by a server killed while writing
        partial.unlink(missing_ok=True)
    classes = store.directory.resolve()
    server = ls.LitServer(
        [PredictAPI(folder, classes, threads), AddClassAPI(folder, classes, root)],
        accelerator="cpu",
        workers_per_device={"/predict": workers, "/classes": 1},
        timeout=timeout,
        model_metadata={"deployment": str(folder), "classes_dir": str(classes)},
    )
    add_class_routes(server.app, store)
    print(f"resad serve: {folder} on http://{host}:{port}, classes {store.names()} from {classes}", flush=True)
    _stop_on_sigterm()
    server.run(host=host, port=port, generate_client_file=False, num_api_servers=1, log_level="warning")
