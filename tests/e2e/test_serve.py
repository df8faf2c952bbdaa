# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""`resad serve` through real HTTP: a LitServe server process, classes from ../shared/data, restarts, bad input."""

import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_resad.deploy import ReferenceConditionedInferencer, export_deployment, load_references, make_references
from anomalib_resad.offline_weights import LITE0_BACKBONE, LITE0_LAYERS

requests = pytest.importorskip("requests")
pytest.importorskip("litserve")
pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

RESAD = Path(sys.executable).parent / "resad"
CLASS = "pcb_12300"  # never trained on: the model learns pcb_12000 only
K = 4
SCORE_TOLERANCE = 1e-4  # the same compiled f32 graph on references made in another process (they agree to ~5e-5)
MAP_TOLERANCE = 1 / 65535 + 1e-6  # the map travels as a 16-bit PNG


@pytest.fixture(scope="module")
def deployment(shared_data: Path, lite0_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ResAD trained one epoch on one DeepPCB board group, exported with references as inputs."""
    from anomalib.engine import Engine

    from anomalib_resad import ResAD
    from anomalib_resad.data import MultiClassDataModule

    root = tmp_path_factory.mktemp("serve_train")
    boards = str(shared_data / "deeppcb")
    datamodule = MultiClassDataModule(
        sources=[{"datamodule": "MVTecAD", "root": boards, "categories": ["pcb_12000"]}],
        targets=[{"datamodule": "MVTecAD", "root": boards, "categories": [CLASS]}],
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
    )
    model = ResAD(backbone=LITE0_BACKBONE, layers=list(LITE0_LAYERS), pre_trained=str(lite0_weights), image_size=128,
                  coupling_layers=2, pos_embed_dim=16, first_stage_epochs=0, lr=1e-3, visualizer=False)  # fmt: skip
    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=root, logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    return export_deployment(next(root.rglob("*.ckpt")), root / "deploy")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`resad serve` in a process of its own, started and stopped as a person would (SIGTERM = Ctrl+C)."""

    def __init__(self, deployment: Path, classes: Path, image_root: Path, log: Path) -> None:
        self.arguments = ["--deployment", str(deployment), "--classes_dir", str(classes),
                          "--image_root", str(image_root)]  # fmt: skip
        self.classes, self.log, self.process, self.port = classes, log, None, free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [str(RESAD), "serve", *self.arguments, "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited: {self.log.read_text()[-3000:]}"
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        pytest.fail(f"server not ready in 180 s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail("server did not stop within 60 s of SIGTERM")

    def add_class(self, name: str, images: list[Path] | None = None, **fields: str) -> requests.Response:
        files = [("images", (path.name, path.read_bytes())) for path in images or []]
        return requests.post(f"{self.url}/classes", data={"name": name, **fields}, files=files or None, timeout=300)

    def predict(self, class_name: str, images: list[tuple[str, bytes]]) -> requests.Response:
        files = [("image", (name, data)) for name, data in images]
        return requests.post(f"{self.url}/predict", data={"class_name": class_name}, files=files, timeout=300)


@pytest.fixture(scope="module")
def server(deployment: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    root = tmp_path_factory.mktemp("serve")
    running = Server(deployment, root / "classes", shared_data, root / "server.log")
    running.start()
    yield running
    running.stop()
    assert running.process.returncode is not None


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


BLACK = png(np.zeros((256, 256, 3), np.uint8))


def query_name(path: Path) -> str:
    """The name an image is uploaded under: good/000.png and defect/000.png both exist."""
    return f"{path.parent.name}_{path.name}"


@pytest.fixture(scope="module")
def queries(shared_data: Path) -> list[tuple[str, bytes]]:
    """Two normal and two defective test images of the class, and a black frame."""
    test = shared_data / "deeppcb" / CLASS / "test"
    paths = sorted((test / "good").glob("*.png"))[:2] + sorted((test / "defect").glob("*.png"))[:2]
    return [(query_name(path), path.read_bytes()) for path in paths] + [("black.png", BLACK)]


@pytest.fixture(scope="module")
def in_process(deployment: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The same class made and scored in this process: (references file, image -> (score, label, map))."""
    folder = shared_data / "deeppcb" / CLASS / "train" / "good"
    references = make_references(deployment, folder, tmp_path_factory.mktemp("local") / f"{CLASS}.npz", k=K)
    inferencer = ReferenceConditionedInferencer(deployment)
    inferencer.add_class(CLASS, references)
    test = shared_data / "deeppcb" / CLASS / "test"
    paths = sorted((test / "good").glob("*.png"))[:2] + sorted((test / "defect").glob("*.png"))[:2]
    images = {query_name(path): path for path in paths}
    images["black.png"] = np.zeros((256, 256, 3))
    expected = {}
    for name, image in images.items():
        prediction = inferencer.predict(image, class_name=CLASS)
        expected[name] = (float(prediction.pred_score.reshape(-1)[0]), bool(prediction.pred_label.reshape(-1)[0]),
                          np.asarray(prediction.anomaly_map, dtype=np.float64).squeeze())  # fmt: skip
    return references, expected


@pytest.fixture(scope="module")
def board_class(server: Server, shared_data: Path) -> dict:
    """The class added over HTTP from its first K normal training images, uploaded."""
    images = sorted((shared_data / "deeppcb" / CLASS / "train" / "good").glob("*.png"))[:K]
    response = server.add_class(CLASS, images)
    assert response.status_code == 200, response.text
    return response.json()


def scores_of(response: requests.Response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    return {item["image"]: item["score"] for item in response.json()["predictions"]}


def test_a_class_added_from_uploads_scores_as_in_process(
    server: Server, board_class: dict, in_process: tuple[Path, dict], queries: list[tuple[str, bytes]]
) -> None:
    from anomalib_resad.serve import decode_map_png

    assert board_class["name"] == CLASS and board_class["k"] == K
    assert len(board_class["images"]) == K
    # the server's references file is the one made in-process from the same K files
    local, expected = in_process
    served, _ = load_references(server.classes / f"{CLASS}.npz")
    made, _ = load_references(local)
    served_arrays = [*served.levels, *served.scoring.tensors().values()]
    for a, b in zip(served_arrays, [*made.levels, *made.scoring.tensors().values()], strict=True):
        # features of magnitude ~10 made in two processes (thread counts differ) agree to ~5e-5
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
    response = server.predict(CLASS, queries)  # one batch request: normal, defective, black
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["class"] == CLASS
    assert [item["image"] for item in body["predictions"]] == [name for name, _ in queries]
    for item in body["predictions"]:
        score, label, anomaly_map = expected[item["image"]]
        assert abs(item["score"] - score) <= SCORE_TOLERANCE, item["image"]
        assert item["label"] == label, item["image"]
        served_map = decode_map_png(item["anomaly_map"])
        assert served_map.shape == anomaly_map.shape
        assert np.abs(served_map - np.clip(anomaly_map, 0, 1)).max() <= MAP_TOLERANCE, item["image"]
    labels = {item["image"]: item["label"] for item in body["predictions"]}
    assert labels["black.png"], "a dead camera's frame must be flagged against circuit-board references"
    assert not any(labels[name] for name, _ in queries[:2]), labels  # the class's normal images pass its threshold


def test_classes_are_listed_and_a_server_folder_makes_one_too(server: Server, board_class: dict) -> None:
    del board_class
    response = server.add_class("board_folder", folder="deeppcb/pcb_12000/train/good", k="3")
    assert response.status_code == 200, response.text
    assert response.json()["k"] == 3
    assert response.json()["images"] == ["000.png", "001.png", "002.png"]  # the first k, sorted
    listed = requests.get(f"{server.url}/classes", timeout=30).json()["classes"]
    assert [entry["name"] for entry in listed] == ["board_folder", CLASS]
    assert scores_of(server.predict("board_folder", [("black.png", BLACK)]))
    removed = requests.delete(f"{server.url}/classes/board_folder", timeout=30)
    assert removed.status_code == 200 and removed.json()["classes"] == [CLASS]
    assert server.predict("board_folder", [("black.png", BLACK)]).status_code == 404  # the workers see it gone
    assert requests.delete(f"{server.url}/classes/board_folder", timeout=30).status_code == 404


def test_bad_input_gets_a_4xx_with_one_line_and_the_server_keeps_serving(
    server: Server, board_class: dict, shared_data: Path, tmp_path: Path, queries: list[tuple[str, bytes]]
) -> None:
    del board_class
    before = scores_of(server.predict(CLASS, queries[:1]))
    good = sorted((shared_data / "deeppcb" / "pcb_12000" / "train" / "good").glob("*.png"))
    (tmp_path / "notes.png").write_text("not an image")
    black = tmp_path / "black.png"
    black.write_bytes(BLACK)
    refused = {
        "not an image": (server.predict(CLASS, [("notes.png", b"not an image")]), 400, "'notes.png' is not an image"),
        "unknown class": (server.predict("no_such_class", queries[:1]), 404, "Unknown class 'no_such_class'"),
        "k too small": (server.add_class("tiny", good[:3], k="1"), 400, "k=1 is too small"),
        "one image": (server.add_class("tiny", good[:1]), 400, "1 image(s) uploaded"),
        "text for an image": (server.add_class("x", [tmp_path / "notes.png", good[0]]), 400, "is not an image"),
        "duplicates": (server.add_class("twins", [good[0], good[0]]), 422, "identical"),
        # a blank frame beside references that show the part (an all-uniform class is a uniform product: accepted)
        "blank frame": (server.add_class("dark", [black, *good[:2]]), 422, "blank"),
        "bad name": (server.add_class("../escape", good[:2]), 400, "is not allowed"),
        "exists": (server.add_class(CLASS, good[:2]), 409, "exists"),
        "outside root": (server.add_class("etc", folder="../../etc"), 400, "outside"),
        "no images": (server.add_class("empty"), 400, "either as uploads"),
        "json body": (requests.post(f"{server.url}/predict", json={"class_name": CLASS}, timeout=30), 400, "multipart"),
    }
    for case, (response, status, message) in refused.items():
        assert response.status_code == status, f"{case}: {response.status_code} {response.text}"
        detail = response.json()["detail"]
        assert message in detail and "\n" not in detail, f"{case}: {detail}"
    listed = [entry["name"] for entry in requests.get(f"{server.url}/classes", timeout=30).json()["classes"]]
    assert listed == [CLASS]  # nothing half-made was left behind
    assert not list(server.classes.glob(".*"))
    assert scores_of(server.predict(CLASS, queries[:1])) == before


def test_sixteen_concurrent_requests_all_succeed_with_the_sequential_scores(
    server: Server, board_class: dict, queries: list[tuple[str, bytes]]
) -> None:
    del board_class
    sequential = {name: scores_of(server.predict(CLASS, [(name, data)]))[name] for name, data in queries}
    requests_16 = [queries[index % len(queries)] for index in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda query: server.predict(CLASS, [query]), requests_16))
    assert [response.status_code for response in responses] == [200] * 16
    for (name, _), response in zip(requests_16, responses, strict=True):
        assert abs(scores_of(response)[name] - sequential[name]) <= 1e-6, name


def test_classes_survive_a_restart_with_identical_scores(
    server: Server, board_class: dict, queries: list[tuple[str, bytes]]
) -> None:
    del board_class
    before = scores_of(server.predict(CLASS, queries))
    server.stop()
    assert server.process.returncode is not None
    server.start()
    listed = requests.get(f"{server.url}/classes", timeout=30).json()["classes"]
    assert [(entry["name"], entry["k"]) for entry in listed] == [(CLASS, K)]
    assert scores_of(server.predict(CLASS, queries)) == before
