"""ConfusionMatrix against scikit-learn on random data with ignored pixels, accumulated over batches."""
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, jaccard_score, precision_score, recall_score

from trainables.metrics import ConfusionMatrix

K = 6  # class 4 appears only in predictions, class 5 nowhere: "macro over the classes present" matters


def _batch(generator: torch.Generator, shape=(3, 17, 19)) -> tuple[torch.Tensor, torch.Tensor]:
    targets = torch.randint(0, 4, shape, generator=generator)
    noise = torch.randint(0, 5, shape, generator=generator)
    preds = torch.where(torch.rand(shape, generator=generator) < 0.6, targets, noise)
    targets[torch.rand(shape, generator=generator) < 0.15] = 255  # VOC's void label
    return targets, preds


def _sklearn_pairs(batches):
    targets = torch.cat([t.flatten() for t, _ in batches]).numpy()
    preds = torch.cat([p.flatten() for _, p in batches]).numpy()
    keep = targets != 255
    return targets[keep], preds[keep]


@pytest.fixture
def batches():
    generator = torch.Generator().manual_seed(0)
    return [_batch(generator), _batch(generator, shape=(2, 11, 7))]


def test_matches_sklearn_over_two_batches(batches):
    matrix = ConfusionMatrix(K)
    for targets, preds in batches:
        matrix.update(targets, preds)
    y_true, y_pred = _sklearn_pairs(batches)
    assert set(np.unique(y_pred)) - set(np.unique(y_true)) == {4}
    assert torch.equal(matrix.matrix, torch.as_tensor(confusion_matrix(y_true, y_pred, labels=range(K))))
    assert matrix.matrix.dtype == torch.int64
    assert matrix.accuracy().item() == pytest.approx(accuracy_score(y_true, y_pred))
    macro = {"average": "macro", "zero_division": 0}
    assert matrix.mean_precision().item() == pytest.approx(precision_score(y_true, y_pred, **macro))
    assert matrix.mean_recall().item() == pytest.approx(recall_score(y_true, y_pred, **macro))
    assert matrix.miou().item() == pytest.approx(jaccard_score(y_true, y_pred, **macro))
    present = [0, 1, 2, 3]  # classes with targets and predictions, where every per-class ratio is defined
    np.testing.assert_allclose(matrix.precision()[present].numpy(),
                               precision_score(y_true, y_pred, labels=present, average=None))
    np.testing.assert_allclose(matrix.recall()[present].numpy(),
                               recall_score(y_true, y_pred, labels=present, average=None))
    np.testing.assert_allclose(matrix.iou()[:5].numpy(), jaccard_score(y_true, y_pred, labels=range(5), average=None))
    assert torch.isnan(matrix.iou()[5]) and torch.isnan(matrix.recall()[4])


def test_merge_and_reset_equal_one_matrix(batches):
    whole, first, second = ConfusionMatrix(K), ConfusionMatrix(K), ConfusionMatrix(K)
    for targets, preds in batches:
        whole.update(targets, preds)
    first.update(*batches[0])
    second.update(*batches[1])
    first.merge(second)
    assert torch.equal(first.matrix, whole.matrix)
    first.reset()
    assert first.matrix.sum() == 0 and first.matrix.shape == (K, K)


def test_out_of_range_labels_are_skipped():
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([0, 1, 2, 255, -1, 1]), torch.tensor([0, 2, 2, 1, 0, 7]))
    assert matrix.matrix.sum() == 3
    assert matrix.accuracy().item() == pytest.approx(2 / 3)


def test_shape_mismatch_and_merge_mismatch_raise():
    with pytest.raises(ValueError, match="same shape"):
        ConfusionMatrix(3).update(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match="merge"):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_cpu(batches):
    on_cpu, on_gpu = ConfusionMatrix(K), ConfusionMatrix(K)
    for targets, preds in batches:
        on_cpu.update(targets, preds)
        on_gpu.update(targets.cuda(), preds.cuda())
    assert on_gpu.matrix.is_cuda
    assert torch.equal(on_gpu.matrix.cpu(), on_cpu.matrix)
    assert on_gpu.miou().item() == pytest.approx(on_cpu.miou().item())
