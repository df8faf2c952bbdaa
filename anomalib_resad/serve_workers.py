# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""The LitServe APIs of ``resad serve`` (:mod:`anomalib_resad.serve`): ``POST /predict`` and ``POST /classes``.

LitServe runs each API in worker processes of its own, started with ``spawn``: the API objects are pickled there, so
they live at module level and hold only paths until :meth:`setup` builds the model in the worker. This module imports
``litserve`` (``pip install 'anomalib-resad[serve]'``); :mod:`anomalib_resad.serve` imports it only to start a server.

Example:
    >>> api = PredictAPI("deploy/", "deploy/classes")
    >>> api.api_path
    '/predict'
"""

import tempfile
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi import Request
from PIL import Image

from .errors import ResADError
from .serve import (
    MIN_K,
    UPLOAD_PREFIX,
    ClassStore,
    ServeError,
    decode_image,
    encode_map_png,
    form_field,
    form_files,
    form_flag,
    form_k,
    one_line,
    refusals_as_http,
)

Images = list[tuple[str, np.ndarray]]


class PredictAPI(ls.LitAPI):
    """``POST /predict``: score one or more images against a class's references.

    Args:
        deployment (str | Path): The reference-conditioned deployment folder (``resad export``).
        classes_dir (str | Path): The classes' references files.
        threads (int | None): OpenVINO threads. Defaults to ``None`` (OpenVINO's choice).
    """

    def __init__(self, deployment: str | Path, classes_dir: str | Path, threads: int | None = None) -> None:
        super().__init__(api_path="/predict")
        self.deployment, self.classes_dir, self.threads = str(deployment), str(classes_dir), threads

    def setup(self, device: str) -> None:
        """Compile the deployment's conditioned model once per worker (OpenVINO, f32)."""
        del device
        from .deploy import ReferenceConditionedInferencer

        config = {"INFERENCE_NUM_THREADS": self.threads} if self.threads else None
        self.inferencer = ReferenceConditionedInferencer(self.deployment, config=config)
        self.store = ClassStore(self.classes_dir)
        self.versions: dict[str, tuple[int, int, int]] = {}

    def _use_class(self, name: str) -> None:
        """Score against the class's current file: read it when new here or changed since it was read."""
        path = self.store.existing(name)
        status = path.stat()
        version = (status.st_ino, status.st_mtime_ns, status.st_size)
        if self.versions.get(name) != version:
            self.inferencer.add_class(name, path)
            self.versions[name] = version

    def decode_request(self, request: Request) -> tuple[str, Images]:
        """Class name and images from the form; every file must be an image (400 otherwise).

        LitServe reads the annotation ``Request`` to parse the body as a form; ``request`` is that parsed form.
        """

        def decode() -> tuple[str, Images]:
            name = form_field(request, "class_name")
            if not name:
                raise ServeError(400, "Missing field 'class_name': the class to inspect against.")
            self.store.path(str(name))  # a valid name
            files = form_files(request, "image")
            if not files:
                raise ServeError(400, "Missing field 'image': upload one or more image files (-F image=@x.png).")
            return str(name), [(file_name, decode_image(data, file_name)) for file_name, data in files]

        return refusals_as_http(decode)

    def predict(self, request: tuple[str, Images]) -> dict[str, Any]:
        """Score every image against the class's references (404 for an unknown class)."""
        name, images = request

        def score() -> dict[str, Any]:
            self._use_class(name)
            results = []
            for file_name, image in images:
                prediction = self.inferencer.predict(image, class_name=name)
                results.append(
                    {
                        "image": file_name,
                        "score": float(np.asarray(prediction.pred_score).reshape(-1)[0]),
                        "label": bool(np.asarray(prediction.pred_label).reshape(-1)[0]),
                        "anomaly_map": encode_map_png(np.asarray(prediction.anomaly_map)),
                    }
                )
            return {"class": name, "predictions": results}

        return refusals_as_http(score)

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        """The JSON body: ``{"class": ..., "predictions": [{"image", "score", "label", "anomaly_map"}, ...]}``."""
        return output


class AddClassAPI(ls.LitAPI):
    """``POST /classes``: make a class's references file from k images and store it.

    Args:
        deployment (str | Path): The reference-conditioned deployment folder (its OpenVINO encoder and calibrator
            make the references).
        classes_dir (str | Path): The classes' references files.
        image_root (str | Path | None): Folder under which a ``folder`` field may point. Defaults to ``None``
            (uploads only).
    """

    def __init__(self, deployment: str | Path, classes_dir: str | Path, image_root: str | Path | None = None) -> None:
        super().__init__(api_path="/classes")
        self.deployment, self.classes_dir = str(deployment), str(classes_dir)
        self.image_root = str(image_root) if image_root is not None else None

    def setup(self, device: str) -> None:
        """The class folder (ResAD compiles the deployment's encoder and calibrator for each class it makes)."""
        del device
        self.store = ClassStore(self.classes_dir)

    def decode_request(self, request: Request) -> dict[str, Any]:
        """Name, k, replace, and the uploaded images or the server folder (400 for anything unusable).

        LitServe reads the annotation ``Request`` to parse the body as a form; ``request`` is that parsed form.
        """

        def decode() -> dict[str, Any]:
            name = form_field(request, "name")
            if not name:
                raise ServeError(400, "Missing field 'name': the class to add.")
            self.store.path(str(name))
            k = form_k(form_field(request, "k"))
            files = form_files(request, "images")
            folder = form_field(request, "folder")
            if bool(files) == bool(folder):
                msg = "Give the class's normal images either as uploads (-F images=@a.png ...) or as folder=<path>."
                raise ServeError(400, msg)
            if files:
                needed = max(len(files) if k is None else k, MIN_K)
                if len(files) < needed:
                    msg = f"{len(files)} image(s) uploaded: this class needs at least {needed} normal images."
                    raise ServeError(400, msg)
                for file_name, data in files:
                    decode_image(data, file_name)  # 400 for a file that is not an image
            return {
                "name": str(name),
                "k": k,
                "files": files,
                "folder": self._folder(str(folder)) if folder else None,
                "replace": form_flag(form_field(request, "replace"), "replace"),
            }

        return refusals_as_http(decode)

    def _folder(self, folder: str) -> Path:
        if self.image_root is None:
            msg = "This server reads no folders (start it with --image_root <folder>); upload the images instead."
            raise ServeError(400, msg)
        root = Path(self.image_root).resolve()
        path = (root / folder).resolve()
        if not path.is_relative_to(root):
            raise ServeError(400, f"Folder '{folder}' is outside the server's image root.")
        if not path.is_dir():
            raise ServeError(400, f"Folder '{folder}' does not exist under the server's image root.")
        return path

    def predict(self, request: dict[str, Any]) -> dict[str, Any]:
        """Make the references file (uploads go to a temporary folder), check that it calibrates, store it."""
        from .deploy import make_references

        name, k = request["name"], request["k"]

        def add() -> dict[str, Any]:
            with tempfile.TemporaryDirectory(prefix=UPLOAD_PREFIX) as upload:
                duplicates: list[tuple[str, str]] = []
                folder = request["folder"]
                if folder is None:
                    folder = Path(upload)
                    seen: dict[bytes, str] = {}
                    for index, (file_name, data) in enumerate(request["files"][: k or None]):
                        # the decoded pixels, losslessly, whatever the upload's format; numbered: the references are
                        # the uploads in the order sent (make_references sorts)
                        pixels = decode_image(data, file_name)
                        rgb = np.round(pixels * 255).astype(np.uint8)
                        Image.fromarray(rgb).save(folder / f"{index:04d}_{Path(file_name).stem}.png")
                        key = rgb.tobytes() + str(rgb.shape).encode()
                        if key in seen:
                            duplicates.append((seen[key], file_name))
                        seen[key] = file_name

                def build(path: Path) -> None:
                    try:  # e.g. blank frames, copies of one image, fewer than k images in the folder
                        make_references(self.deployment, folder, path, k=k, class_name=name)
                    except ResADError as error:
                        same = f" (identical uploads: {', '.join(f'{a} = {b}' for a, b in duplicates)})"
                        msg = f"These images cannot make class '{name}': {one_line(error)}{same if duplicates else ''}"
                        raise ServeError(422, msg) from error

                self.store.write(name, build, replace=request["replace"])
            return self.store.describe(name)

        return refusals_as_http(add)

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        """The JSON body: the class as ``GET /classes`` lists it."""
        return output
