# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""What ``anomalib test`` and ``anomalib predict`` leave behind for each image: a verdict one can read and keep.

anomalib's ``ImageVisualizer`` writes each image with its anomaly map, but neither the score nor the verdict, and
nothing in a table. ResAD adds both, as Lightning callbacks (the model's defaults, :meth:`ResAD.configure_callbacks`):

* :class:`VerdictVisualizer` - anomalib's visualizer, the picture captioned with the image's score, verdict and the
  class it was scored as;
* :class:`PredictionsCsv` - ``predictions.csv`` in the run's folder: image path, score, verdict and class, one row per
  image, written at the end of ``anomalib predict`` / ``anomalib test``.

Scores are anomalib's post-processed ones: in ``[0, 1]``, ``0.5`` the class's own boundary (:mod:`.post_processor`).

Example:
    >>> caption({"pred_score": 0.8123, "pred_label": True}, "brick")
    'brick: score 0.812, anomalous'
"""

import csv
import logging
from pathlib import Path
from typing import Any

from anomalib.utils.path import generate_output_filename
from anomalib.visualization import ImageVisualizer
from anomalib.visualization.image.functional import add_text_to_image
from anomalib.visualization.image.item_visualizer import visualize_image_item
from lightning.pytorch import Callback, LightningModule, Trainer

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"


def caption(item: Any, class_name: str) -> str:
    """``<class>: score <s>, anomalous|normal`` of a predicted item (``pred_score`` in ``[0, 1]``)."""
    get = item.get if isinstance(item, dict) else lambda name: getattr(item, name, None)
    score, label = float(get("pred_score")), bool(get("pred_label"))
    return f"{class_name}: score {score:.3f}, {'anomalous' if label else 'normal'}"


def _class_of(module: LightningModule, path: str) -> str:
    class_of = getattr(module, "class_of", None)
    return class_of(path) if class_of is not None else ""


class VerdictVisualizer(ImageVisualizer):
    """anomalib's image visualizer, each picture captioned with its score, verdict and class."""

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Write each image of the batch with its maps and caption."""
        del outputs, batch_idx, dataloader_idx
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "images"
        datamodule = getattr(trainer, "datamodule", None)
        for item in batch:
            image = visualize_image_item(
                item,
                fields=self.fields,
                overlay_fields=self.overlay_fields,
                field_size=self.field_size,
                fields_config=self.fields_config,
                overlay_fields_config=self.overlay_fields_config,
                text_config=self.text_config,
            )
            if image is None:
                continue
            text_config = {name: value for name, value in self.text_config.items() if name != "enable"}
            if self.text_config.get("enable", True) and item.pred_score is not None and item.pred_label is not None:
                text = caption(item, _class_of(pl_module, str(item.image_path)))
                image = add_text_to_image(image, text, **{**text_config, "position": (10, image.height - 30)})
            filename = generate_output_filename(
                input_path=item.image_path or "",
                output_path=self.output_dir,
                dataset_name=getattr(datamodule, "name", None),
                category=getattr(datamodule, "category", None),
            )
            image.save(filename)


class PredictionsCsv(Callback):
    """``predictions.csv`` of ``anomalib predict`` / ``anomalib test``: image, score, verdict and class per row."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def _start(self) -> None:
        self.rows = []

    def _collect(self, module: LightningModule, outputs: Any) -> None:
        if outputs is None or getattr(outputs, "pred_score", None) is None:
            return
        labels = outputs.pred_label if outputs.pred_label is not None else [None] * len(outputs.pred_score)
        for path, score, label in zip(outputs.image_path, outputs.pred_score, labels, strict=True):
            self.rows.append(
                {
                    "image_path": str(path),
                    "class": _class_of(module, str(path)),
                    "score": round(float(score), 6),
                    "label": "" if label is None else int(bool(label)),
                }
            )

    def _write(self, trainer: Trainer) -> None:
        if not self.rows or not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / PREDICTIONS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        flagged = sum(1 for row in self.rows if row["label"] == 1)
        logger.warning("ResAD: %d image(s) scored, %d anomalous; written to %s", len(self.rows), flagged, path)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start a new table."""
        del trainer, pl_module
        self._start()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start a new table."""
        del trainer, pl_module
        self._start()

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        """Add the batch's rows (after the post-processor has set the verdicts)."""
        del trainer, batch, args
        self._collect(pl_module, outputs)

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        """Add the batch's rows (after the post-processor has set the verdicts)."""
        del trainer, batch, args
        self._collect(pl_module, outputs)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the table."""
        del pl_module
        self._write(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the table."""
        del pl_module
        self._write(trainer)
