# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Bookkeeping of a long evaluation grid: resumable result files, progress lines, the AUROC-vs-k plot.

A grid cell of ``resad evaluate`` is one (model, category, k, draw). Its row is appended to ``results.csv`` as soon as
it is finished (the file is rewritten atomically), so an interrupted run loses at most the cell in progress; started
again with the same ``output_dir`` and configuration, the run reads the file back and skips every finished cell.
``run_config.json`` records the settings that change a cell's numbers (data, model, training, seed ...); a run whose
settings differ refuses to mix its rows with the old ones. Settings that only add cells (more ``shots``, ``draws`` or
``baselines``) may change between runs.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> store = CsvStore(folder / "results.csv", keys=("model", "k"))
    >>> store.add({"model": "ResAD", "k": 2, "image_AUROC": 0.9})
    >>> CsvStore(folder / "results.csv", keys=("model", "k")).done("ResAD", 2)
    True
"""

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from lightning.pytorch import Callback, LightningModule, Trainer

from ..errors import ResADConfigurationError

logger = logging.getLogger(__name__)

CELL_KEYS = ("model", "category", "k", "draw")


def _key_value(value: object) -> object:
    """Cell-key values compare equal whether they come from Python or back from a CSV file."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value.item() if hasattr(value, "item") else value


class CsvStore:
    """Rows of finished cells, kept in a CSV file that is rewritten (atomically) after every new row.

    Args:
        path (str | Path): The CSV file.
        keys (Sequence[str]): Columns that identify a cell.
        resume (bool): Read the rows already in the file (``False``: start empty, the file is overwritten).
            Defaults to ``True``.
    """

    def __init__(self, path: str | Path, keys: Sequence[str] = CELL_KEYS, resume: bool = True) -> None:
        self.path = Path(path)
        self.keys = tuple(keys)
        self.rows: list[dict[str, Any]] = []
        if resume and self.path.is_file() and self.path.stat().st_size:
            self.rows = pd.read_csv(self.path).to_dict("records")
        self._done = {self._key(row) for row in self.rows}

    def _key(self, row: Mapping[str, Any]) -> tuple:
        return tuple(str(_key_value(row[key])) for key in self.keys)

    def done(self, *values: object) -> bool:
        """Whether the cell with these key values (in the order of ``keys``) is finished."""
        return tuple(str(_key_value(value)) for value in values) in self._done

    def add(self, row: Mapping[str, Any]) -> None:
        """Record a finished cell and rewrite the file."""
        self.add_all([row])

    def add_all(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Record several rows and rewrite the file once."""
        for row in rows:
            self.rows.append(dict(row))
            self._done.add(self._key(row))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
        self.frame().to_csv(temporary, index=False)
        temporary.replace(self.path)

    def frame(self) -> pd.DataFrame:
        """All finished rows."""
        return pd.DataFrame(self.rows)


def check_run_config(
    path: str | Path,
    config: Mapping[str, Any],
    resume: bool = True,
    guarded: Sequence[str] = ("results.csv",),
) -> None:
    """Record the settings of a run; refuse to resume a run whose recorded settings differ or are unknown.

    Args:
        path (str | Path): ``run_config.json`` in the output folder.
        config (Mapping[str, Any]): The settings that change a cell's numbers (JSON-serialisable).
        resume (bool): ``False`` overwrites the record (the run starts over). Defaults to ``True``.
        guarded (Sequence[str]): Result files beside ``path`` that must not be resumed without a record.
            Defaults to ``("results.csv",)``.

    Raises:
        ResADConfigurationError: ``resume`` and the folder holds a run with other settings, or results without a
            record of their settings.
    """
    path = Path(path)
    current = json.loads(json.dumps(config, default=str))
    unrecorded = [name for name in guarded if (path.parent / name).is_file()] if not path.is_file() else []
    if resume and unrecorded:
        msg = (
            f"'{path.parent}' holds {', '.join(unrecorded)} but no {path.name}: results of a run whose settings are "
            "unknown (an older version). Use another output_dir, or resume: false to start over there."
        )
        raise ResADConfigurationError(msg)
    if resume and path.is_file():
        recorded = json.loads(path.read_text())
        changed = sorted(key for key in set(recorded) | set(current) if recorded.get(key) != current.get(key))
        if changed:
            msg = (
                f"'{path.parent}' holds results of a run with other settings ({', '.join(changed)} differ): "
                "use another output_dir, or resume: false to start over there."
            )
            raise ResADConfigurationError(msg)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")


class Progress:
    """One log line per finished cell: its number, what it was, elapsed time and an estimate of the time left.

    Args:
        total (int): Cells in the grid.
        done (int): Cells already finished (skipped on resume). Defaults to ``0``.
    """

    def __init__(self, total: int, done: int = 0) -> None:
        self.total = total
        self.done = done
        self._computed = 0
        self._start = time.perf_counter()
        if done:
            logger.info("Resuming: %d of %d cells already finished, not recomputed.", done, total)

    def finished(self, description: str) -> None:
        """Log that one more cell is finished."""
        self.done += 1
        self._computed += 1
        elapsed = time.perf_counter() - self._start
        left = elapsed / self._computed * (self.total - self.done)
        logger.info("[%d/%d] %s (%.0f s elapsed, about %.0f s left)", self.done, self.total, description, elapsed, left)


class EpochProgress(Callback):
    """One log line per training epoch (losses, time, an estimate of the time left) for logs written to a file.

    Lightning's progress bar redraws one terminal line: sent to a file it writes nothing readable until training
    ends, hours later on a real setting. ``resad evaluate`` uses this callback instead when its output is not a
    terminal.
    """

    def __init__(self) -> None:
        self._start = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the clock."""
        del trainer, pl_module
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the finished epoch."""
        del pl_module
        done, total = trainer.current_epoch + 1, trainer.max_epochs
        elapsed = time.perf_counter() - self._start
        metrics = trainer.callback_metrics
        losses = ", ".join(f"{name} {float(value):.4g}" for name, value in metrics.items() if name.startswith("train_"))
        left = f", about {elapsed / done * (total - done):.0f} s left" if total and total > 0 else ""
        logger.info("Training epoch %d/%s: %s (%.0f s elapsed%s)", done, total, losses or "-", elapsed, left)


def plot_auroc_vs_k(summary: pd.DataFrame, path: str | Path) -> Path | None:
    """Image AUROC (mean over categories) against k, one line per model, error bars = std over reference draws.

    Args:
        summary (pd.DataFrame): The run's summary (rows with ``category == "mean"`` are plotted; skipped models and
            rows without an image AUROC are left out).
        path (str | Path): PNG file to write.

    Returns:
        Path | None: The file, or ``None`` when there is nothing to plot.
    """
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary[(summary.category == "mean") & summary.image_AUROC.notna()]
    if "status" in rows:
        rows = rows[rows.status.fillna("ok") == "ok"]
    if rows.empty:
        return None
    figure, axes = plt.subplots(figsize=(5.5, 4))
    for model, unsorted in rows.groupby("model", sort=False):
        points = unsorted.sort_values("k")
        errors = points.image_AUROC_std.fillna(0) if "image_AUROC_std" in points else None
        axes.errorbar(
            points.k,
            100 * points.image_AUROC,
            yerr=None if errors is None else 100 * errors,
            marker="o",
            capsize=4,
            label=str(model),
        )
    shots = sorted(rows.k.unique())
    axes.set_xticks(shots)
    axes.set_xlabel("k (reference images per class)")
    axes.set_ylabel("image AUROC (%), mean over target categories")
    axes.set_title("Unseen classes: image AUROC vs k (bars: std over draws)", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
