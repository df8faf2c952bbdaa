# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""`resad serve` under load: N concurrent HTTP clients (N = 1, 4, 16) next to the in-process inferencer.

Starts a real server (``resad serve``, LitServe) on this machine, adds a class over HTTP from k normal images, then
for each N runs N client threads that each send ``--requests`` single-image ``POST /predict`` requests (cycling over
the query images), and prints one markdown table: requests answered, throughput, p50 / p95 latency, and the largest
difference between a served score and the in-process ``ReferenceConditionedInferencer``'s score of the same image
(same deployment, references made in-process from the same k files). The first row is that in-process inferencer
alone, one image after another (``predict(path)``: reading the file included), timed before the server starts.

Fails (exit 1) when a request is not answered 200 or a served score differs from the in-process one by more than
1e-5. The CPU (``lscpu``'s model name and this project's ISA summary) is printed above the table.

    python benchmarks/bench_serving.py --deployment deploy/           # a `resad export` folder
    python benchmarks/bench_serving.py --checkpoint model.ckpt        # exports one to a temporary folder first
    python benchmarks/bench_serving.py --deployment deploy/ --clients 1 4 16 --requests 16 \
        --references ../shared/data/deeppcb/pcb_12300/train/good --queries ../shared/data/deeppcb/pcb_12300/test
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
BOARDS = REPO.parent / "shared" / "data" / "deeppcb" / "pcb_12300"
TOLERANCE = 1e-5


def lscpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
    except OSError:
        return "lscpu not available"
    names = [line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"


def images_in(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})


def percentile(values: list[float], share: float) -> float:
    return float(np.percentile(np.asarray(values), share))


def in_process(deployment: Path, references: list[Path], queries: list[Path], k: int, rounds: int) -> dict:
    """The in-process inferencer: each query's score, and sequential latencies over ``rounds`` passes."""
    from anomalib_resad.deploy import ReferenceConditionedInferencer, make_references

    with tempfile.TemporaryDirectory() as folder:
        for index, path in enumerate(references[:k]):  # the same k files, in the order the server gets them
            (Path(folder) / f"{index:04d}_{path.name}").write_bytes(path.read_bytes())
        npz = make_references(deployment, folder, Path(folder) / "class.npz", k=k, class_name="bench")
        inferencer = ReferenceConditionedInferencer(deployment)
        inferencer.add_class("bench", npz)
    scores = {
        path.name: float(inferencer.predict(path, class_name="bench").pred_score.reshape(-1)[0]) for path in queries
    }
    latencies = []
    start = time.perf_counter()
    for _ in range(rounds):
        for path in queries:
            begin = time.perf_counter()
            inferencer.predict(path, class_name="bench")
            latencies.append(time.perf_counter() - begin)
    return {"scores": scores, "latencies": latencies, "seconds": time.perf_counter() - start}


class Server:
    def __init__(self, deployment: Path, classes: Path, workers: int) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = classes.parent / "server.log"
        command = [str(Path(sys.executable).parent / "resad"), "serve", "--deployment", str(deployment),
                   "--classes_dir", str(classes), "--port", str(self.port), "--workers", str(workers)]  # fmt: skip
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.stop()
        sys.exit("server not ready in 300 s")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


def load(url: str, queries: list[tuple[str, bytes]], clients: int, per_client: int) -> dict:
    """``clients`` threads, each sending ``per_client`` requests: latencies, statuses and scores."""

    def client(index: int) -> list[tuple[str, int, float, float | None]]:
        results = []
        with requests.Session() as session:
            for step in range(per_client):
                name, data = queries[(index * per_client + step) % len(queries)]
                begin = time.perf_counter()
                try:
                    response = session.post(f"{url}/predict", data={"class_name": "bench"},
                                            files=[("image", (name, data))], timeout=600)  # fmt: skip
                    status = response.status_code
                    score = response.json()["predictions"][0]["score"] if status == 200 else None
                except requests.RequestException:
                    status, score = 0, None
                results.append((name, status, time.perf_counter() - begin, score))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [item for batch in pool.map(client, range(clients)) for item in batch]
    return {"results": results, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployment", type=Path, help="a `resad export` folder")
    parser.add_argument("--checkpoint", type=Path, help="or a checkpoint to export first")
    parser.add_argument("--references", type=Path, default=BOARDS / "train" / "good", help="normal images of the class")
    parser.add_argument("--queries", type=Path, default=BOARDS / "test", help="images to score (searched recursively)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max_queries", type=int, default=8, help="distinct query images used")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per client")
    parser.add_argument("--workers", type=int, default=1, help="the server's predict workers")
    arguments = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from anomalib_resad.cpu_info import describe

    with tempfile.TemporaryDirectory() as scratch:
        deployment = arguments.deployment
        if deployment is None:
            if arguments.checkpoint is None:
                parser.error("give --deployment or --checkpoint")
            from anomalib_resad.deploy import export_deployment

            deployment = export_deployment(arguments.checkpoint, Path(scratch) / "deploy")
        references = images_in(arguments.references)[: arguments.k]
        all_queries = images_in(arguments.queries)
        step = max(1, len(all_queries) // arguments.max_queries)
        queries = all_queries[::step][: arguments.max_queries]  # spread over the folder: normal and defective
        local = in_process(deployment, references, queries, arguments.k, rounds=arguments.requests)
        server = Server(deployment, Path(scratch) / "classes", arguments.workers)
        try:
            files = [("images", (path.name, path.read_bytes())) for path in references]
            added = requests.post(f"{server.url}/classes", data={"name": "bench", "k": str(arguments.k)},
                                  files=files, timeout=600)  # fmt: skip
            if added.status_code != 200:
                sys.exit(f"adding the class failed: {added.status_code} {added.text}")
            payload = [(path.name, path.read_bytes()) for path in queries]
            load(server.url, payload, 1, len(payload))  # warm-up: the worker reads the class once
            runs = {clients: load(server.url, payload, clients, arguments.requests) for clients in arguments.clients}
        finally:
            server.stop()

    print(f"lscpu model name: {lscpu_model()}\n{describe()}")
    print(f"deployment: {deployment}; k = {arguments.k}; {len(queries)} query images from {arguments.queries}; "
          f"server workers: {arguments.workers}\n")  # fmt: skip
    print("| runner | concurrent clients | requests | answered (200) | throughput (images/s) | p50 latency (ms) "
          "| p95 latency (ms) | max abs(score - in-process) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    latencies = local["latencies"]
    print(f"| in-process inferencer | 1 (sequential) | {len(latencies)} | - | {len(latencies) / local['seconds']:.2f} "
          f"| {percentile(latencies, 50) * 1e3:.0f} | {percentile(latencies, 95) * 1e3:.0f} | 0 |")  # fmt: skip
    failures = []
    for clients, run in runs.items():
        results = run["results"]
        answered = [item for item in results if item[1] == 200]
        differences = [abs(score - local["scores"][name]) for name, _, _, score in answered]
        worst = max(differences) if differences else float("nan")
        times = [item[2] for item in results]
        print(f"| resad serve (HTTP) | {clients} | {len(results)} | {len(answered)} "
              f"| {len(answered) / run['seconds']:.2f} | {percentile(times, 50) * 1e3:.0f} "
              f"| {percentile(times, 95) * 1e3:.0f} | {worst:.1e} |")  # fmt: skip
        if len(answered) != len(results):
            failures.append(f"{clients} clients: {len(results) - len(answered)} request(s) not answered 200")
        if not worst <= TOLERANCE:
            failures.append(f"{clients} clients: a served score differs from in-process by {worst:.2e}")
    print(f"\nmedian in-process latency {statistics.median(latencies) * 1e3:.0f} ms; every served score within "
          f"{TOLERANCE:g} of the in-process one: {not failures}")  # fmt: skip
    if failures:
        sys.exit("; ".join(failures))


if __name__ == "__main__":
    main()
