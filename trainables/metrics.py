"""One confusion matrix from which every classification and segmentation metric is read."""
from __future__ import annotations

import torch
from torch import Tensor


class ConfusionMatrix:
    """Counts (target, prediction) pairs with one `bincount`; rows = target, cols = prediction."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, targets: Tensor, preds: Tensor) -> None:
        """Add a batch; pairs whose target or prediction lies outside [0, K) (e.g. VOC's 255) are skipped."""
        if targets.shape != preds.shape:
            raise ValueError(f"targets and preds must have the same shape; got {tuple(targets.shape)} "
                             f"and {tuple(preds.shape)}")
        k = self.num_classes
        targets = targets.reshape(-1).long()
        preds = preds.reshape(-1).long().to(targets.device)
        # Skipping out-of-range predictions too keeps bincount's index inside K*K (same as sklearn's `labels=`).
        keep = (targets >= 0) & (targets < k) & (preds >= 0) & (preds < k)
        counts = torch.bincount(targets[keep] * k + preds[keep], minlength=k * k).reshape(k, k)
        # The matrix follows the batches' device, so a CUDA loop never syncs on a CPU copy per batch.
        self.matrix = self.matrix.to(counts.device) + counts

    def reset(self) -> None:
        """Zero the counts, keeping the device."""
        self.matrix = torch.zeros_like(self.matrix)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix's counts (e.g. from another worker)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        self.matrix = self.matrix + other.matrix.to(self.matrix.device)

    # Every metric below is one formula on the matrix; float64 so large pixel counts stay exact.
    def _diag(self) -> Tensor:
        return self.matrix.diagonal().double()

    def _target_counts(self) -> Tensor:
        return self.matrix.sum(dim=1).double()

    def _pred_counts(self) -> Tensor:
        return self.matrix.sum(dim=0).double()

    def _macro(self, per_class: Tensor) -> Tensor:
        # Macro over the classes present in targets or predictions; an undefined ratio counts as 0 (sklearn's rule).
        present = (self._target_counts() + self._pred_counts()) > 0
        return torch.nan_to_num(per_class[present], nan=0.0).mean()

    def accuracy(self) -> Tensor:
        """Share of counted pairs predicted correctly (pixel accuracy)."""
        return self._diag().sum() / self.matrix.sum().double()

    def precision(self) -> Tensor:
        """Per-class precision (K,); NaN for a class never predicted."""
        return self._diag() / self._pred_counts()

    def recall(self) -> Tensor:
        """Per-class recall (K,); NaN for a class absent from the targets."""
        return self._diag() / self._target_counts()

    def iou(self) -> Tensor:
        """Per-class intersection over union (K,); NaN for a class absent from both."""
        return self._diag() / (self._target_counts() + self._pred_counts() - self._diag())

    def mean_precision(self) -> Tensor:
        """Macro precision over the classes present (the report's "precision")."""
        return self._macro(self.precision())

    def mean_recall(self) -> Tensor:
        """Macro recall over the classes present."""
        return self._macro(self.recall())

    def miou(self) -> Tensor:
        """Mean IoU over the classes present."""
        return self._macro(self.iou())
