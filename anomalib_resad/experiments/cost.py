# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""What a model costs per image: latency, throughput, peak memory and multiply-adds, measured the same way for all.

``resad evaluate`` calls :func:`measure_cost` on every model's pure torch module (``model.model``, eval mode, its
references / memory bank already set) right after scoring, so the cost columns come from the same run, weights and
reference banks as the accuracy columns. Inputs are random tensors of the model's own pre-processed input size:
pre-processing, image decoding and data loading are not timed (they are the same for every model).

* **latency**: median wall time of ``repeats`` forward passes after ``warmup`` passes, eager PyTorch under
  ``torch.no_grad()`` (CUDA synchronised), as ms per image at batch 1 and images per second at batch 16;
* **peak memory**: on CUDA, ``torch.cuda.max_memory_allocated`` during one batch-16 pass minus the memory allocated
  before it; on Linux CPUs, the growth of the process's peak resident set (``VmHWM`` in ``/proc/self/status``, reset
  through ``/proc/self/clear_refs`` after freed heap memory is returned with ``malloc_trim``) during that pass: the
  working memory of the pass (activations and temporaries; the weights are already resident). NaN elsewhere;
* **multiply-adds per image**: ``torch.utils.flop_counter.FlopCounterMode`` (part of PyTorch) on a batch-1 pass,
  halved (it counts a multiply-add as 2 FLOPs). It counts matrix products and convolutions (``mm``, ``addmm``,
  ``bmm``, ``convolution``, scaled-dot-product attention ...), which dominate all these models; element-wise
  operations, sorting and top-k are not counted;
* **OpenVINO f32** (:func:`measure_openvino_cost`): the same latency and throughput for the model exported the anomalib
  way (``to_openvino``: pre- and post-processing and the class's references inside the graph), compiled for the CPU in
  f32 (what matches PyTorch) with as many threads as PyTorch uses.

Example:
    >>> import torch
    >>> count_macs(torch.nn.Linear(4, 3), torch.zeros(1, 4))
    12
    >>> cost = measure_cost(torch.nn.Conv2d(3, 8, 3), (16, 16), repeats=2, warmup=1)
    >>> cost.macs_per_image == 8 * 3 * 3 * 3 * 14 * 14
    True
"""

import contextlib
import ctypes
import gc
import logging
import math
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..export_output import quiet_export

logger = logging.getLogger(__name__)

# The column names of a cost row (``resad evaluate`` writes them to ``cost.csv`` and the summary).
COST_COLUMNS = ("ms_per_image_b1", "images_per_s_b16", "peak_mem_MiB_b16", "GMACs_per_image")
OPENVINO_COST_COLUMNS = ("openvino_ms_per_image_b1", "openvino_images_per_s_b16")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class ModelCost:
    """Per-image cost of one model.

    Attributes:
        ms_per_image_b1 (float): Milliseconds per image at batch size 1.
        images_per_s_b16 (float): Images per second at batch size 16.
        peak_mem_MiB_b16 (float): Peak working memory of a batch-16 pass in MiB (NaN where not measurable).
        macs_per_image (int): Multiply-adds per image (matrix products and convolutions).
    """

    ms_per_image_b1: float
    images_per_s_b16: float
    peak_mem_MiB_b16: float  # noqa: N815 - the unit's spelling
    macs_per_image: int

    def as_row(self) -> dict[str, float]:
        """The cost as a table row (:data:`COST_COLUMNS`; multiply-adds in units of 10^9)."""
        row = asdict(self)
        row["GMACs_per_image"] = row.pop("macs_per_image") / 1e9
        return row


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def count_macs(module: nn.Module | Callable[[torch.Tensor], object], inputs: torch.Tensor) -> int:
    """Multiply-adds of one call ``module(inputs)``, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    Args:
        module (nn.Module | Callable): The model (or any callable running torch operations).
        inputs (torch.Tensor): Its input.

    Returns:
        int: Multiply-adds (FLOPs / 2) of matrix products and convolutions.

    Example:
        >>> count_macs(torch.nn.Conv2d(1, 1, 3, bias=False), torch.zeros(1, 1, 5, 5))
        81
    """
    with FlopCounterMode(display=False) as counter:
        module(inputs)
    return int(counter.get_total_flops()) // 2


@torch.no_grad()
def time_call(function: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time in seconds of ``function()`` over ``repeats`` calls, after ``warmup`` untimed calls.

    Example:
        >>> time_call(lambda: None, torch.device("cpu"), repeats=3, warmup=0) >= 0
        True
    """
    for _ in range(warmup):
        function()
    _synchronize(device)
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        function()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kib(field: str) -> float | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return float(match.group(1)) if match else None


def _release_free_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed memory may stay resident, reads low
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@torch.no_grad()
def peak_memory_mib(function: Callable[[], object], device: torch.device) -> float:
    """Peak memory ``function()`` needs beyond what is allocated before it, in MiB (NaN where not measurable).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: growth of the peak resident set size (Linux ``VmHWM``, reset
    through ``/proc/self/clear_refs``).

    Example:
        >>> peak_memory_mib(lambda: torch.ones(16, 1024, 1024), torch.device("cpu")) > 48  # 64 MiB
        True
    """
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        function()
        _synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _release_free_heap()
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        return math.nan
    before = _status_kib("VmRSS")
    function()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return math.nan
    return max(peak - before, 0.0) / 1024


def measure_cost(
    module: nn.Module,
    image_size: tuple[int, int],
    batch_sizes: tuple[int, int] = (1, 16),
    repeats: int = 5,
    warmup: int = 2,
) -> ModelCost:
    """Latency at batch 1, throughput and peak memory at batch 16, and multiply-adds per image of ``module``.

    Args:
        module (nn.Module): The pure torch model (``anomalib_model.model``); put in eval mode for the measurement.
        image_size (tuple[int, int]): The model's pre-processed input size ``(H, W)``.
        batch_sizes (tuple[int, int]): Latency batch and throughput batch. Defaults to ``(1, 16)``.
        repeats (int): Timed passes per batch size (median taken). Defaults to ``5``.
        warmup (int): Untimed passes before timing. Defaults to ``2``.

    Returns:
        ModelCost: The measurements.
    """
    device = _device_of(module)
    was_training = module.training
    module.eval()
    small, large = batch_sizes
    generator = torch.Generator().manual_seed(0)
    single = torch.randn(small, 3, *image_size, generator=generator).to(device)
    batch = torch.randn(large, 3, *image_size, generator=generator).to(device)
    try:
        latency = time_call(lambda: module(single), device, repeats, warmup)
        throughput = time_call(lambda: module(batch), device, repeats, min(warmup, 1))
        memory = peak_memory_mib(lambda: module(batch), device)
        macs = count_macs(module, single[:1])
    finally:
        module.train(was_training)
    return ModelCost(
        ms_per_image_b1=1000 * latency / small,
        images_per_s_b16=large / throughput,
        peak_mem_MiB_b16=memory,
        macs_per_image=macs,
    )


def _compile_for_batch(core: object, xml: Path, shape: tuple[int, ...], options: dict, name: str) -> object | None:
    """The exported graph compiled for inputs of ``shape`` (reshaped if needed); ``None``, logged, if it cannot be."""
    import openvino as ov

    try:
        graph = core.read_model(xml)
        if not graph.input(0).get_partial_shape().compatible(ov.PartialShape(list(shape))):
            graph.reshape({graph.input(0).get_any_name(): ov.PartialShape(list(shape))})
        return core.compile_model(graph, "CPU", options)
    except RuntimeError as error:
        reason = next((line for line in str(error).splitlines()[::-1] if line.strip()), "")
        logger.warning("OpenVINO cost of %s at batch %d not measured: its exported graph does not run it (%s)",
                       name, shape[0], reason)  # fmt: skip
        return None


def measure_openvino_cost(
    model: nn.Module,
    image_size: tuple[int, int],
    batch_sizes: tuple[int, int] = (1, 16),
    repeats: int = 5,
    warmup: int = 2,
) -> dict[str, float]:
    """Latency at batch 1 and throughput at batch 16 of ``model`` exported to OpenVINO and run in f32 on the CPU.

    The model is exported as ``anomalib export --export_type openvino`` does (its ``to_openvino``, on the CPU, with
    whatever references or memory bank it holds), then compiled with ``INFERENCE_PRECISION_HINT=f32`` and
    ``torch.get_num_threads()`` threads, so the figures compare with :func:`measure_cost`'s eager ones. Inputs are
    random images in ``[0, 1]`` at ``image_size`` (the graph's pre-processing runs on them, as in deployment).

    Args:
        model (nn.Module): An anomalib model (``AnomalibModule``) ready to predict.
        image_size (tuple[int, int]): Input size ``(H, W)``.
        batch_sizes (tuple[int, int]): Latency batch and throughput batch. Defaults to ``(1, 16)``.
        repeats (int): Timed inferences per batch size (median taken). Defaults to ``5``.
        warmup (int): Untimed inferences before timing. Defaults to ``2``.

    Returns:
        dict[str, float]: :data:`OPENVINO_COST_COLUMNS`; NaN (with one logged line saying why) when the model cannot
        be exported or OpenVINO is missing. A graph exported with a fixed batch size (anomalib's PatchCore export
        fixes the batch it was traced with) is reshaped to each measured batch, as a deployment would.
    """
    nan = dict.fromkeys(OPENVINO_COST_COLUMNS, math.nan)
    try:
        import openvino as ov
    except ImportError:
        logger.warning("OpenVINO cost not measured: openvino is not installed (pip install openvino).")
        return nan
    device = _device_of(model)
    was_training = model.training
    model.cpu().eval()
    rng = np.random.default_rng(0)
    small, large = batch_sizes
    inputs = {
        "openvino_ms_per_image_b1": rng.random((small, 3, *image_size), dtype=np.float32),
        "openvino_images_per_s_b16": rng.random((large, 3, *image_size), dtype=np.float32),
    }
    options = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    core = ov.Core()
    cost = dict(nan)
    with tempfile.TemporaryDirectory() as root:
        try:
            with quiet_export():
                xml = model.to_openvino(root, input_size=tuple(image_size))
        except Exception as error:  # a model that cannot be exported gets NaN columns (logged), not a failed grid
            logger.warning("OpenVINO cost of %s not measured: export failed (%s)", type(model).__name__, error)
            return nan
        finally:
            model.to(device).train(was_training)
        # some anomalib exports fix the batch size they were traced with (PatchCore: 2): each measured batch gets
        # the graph reshaped to it, as a deployment would; a graph that cannot be reshaped gets NaN for that column
        graphs = {column: _compile_for_batch(core, xml, images.shape, options, type(model).__name__)
                  for column, images in inputs.items()}  # fmt: skip
    cpu = torch.device("cpu")
    for column, compiled in graphs.items():
        if compiled is None:
            continue
        images = inputs[column]
        warm = warmup if len(images) == small else min(warmup, 1)
        seconds = time_call(lambda c=compiled, x=images: c(x), cpu, repeats, warm)
        cost[column] = 1000 * seconds / len(images) if column.endswith("b1") else len(images) / seconds
    return cost
