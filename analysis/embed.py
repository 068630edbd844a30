"""2-D views of saved features (report sections II, III, IV and V-E): t-SNE and PCA with scikit-learn."""
from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

METHODS = ("tsne", "pca")
# Which taps to compare, in reading order (input before latent, encoder before decoder); others follow.
TAP_ORDER = ("logits", "input", "mu", "encoder_out", "decoder_mid",
             "decoder_block1", "decoder_block2", "decoder_block3", "decoder_block4", "decoder_block5")


def default_perplexity(n: int) -> float:
    """sklearn's 30, lowered for small sets: t-SNE needs perplexity < n, and ~n/3 keeps neighbourhoods local."""
    return float(max(1.0, min(30.0, (n - 1) / 3)))


def can_embed(features: np.ndarray) -> str | None:
    """Why these features cannot be embedded (None when they can)."""
    if features.ndim != 2 or len(features) < 4:
        return f"needs at least 4 samples of 2-D features, got shape {features.shape}"
    if not np.isfinite(features).all():
        return "features hold NaN or inf (the trial diverged)"
    spread = float(features.std(axis=0).max())
    scale = float(np.abs(features).max())
    # e.g. a VAE whose posterior collapsed: mu is the same vector for every image. sklearn's t-SNE divides
    # by the spread of its PCA start and then crashes the interpreter (segfault) on the NaNs.
    if spread <= 1e-4 * scale or spread == 0:
        return f"features are the same for every sample (spread {spread:.2g} at scale {scale:.2g}: collapsed)"
    return None


def tsne(features: np.ndarray, perplexity: float | None = None, seed: int = 0, threads: int = 1) -> np.ndarray:
    """(N, D) -> (N, 2) t-SNE with PCA initialisation (reproducible, stable across runs).

    The thread cap matters: sklearn's Barnes-Hut gradient uses every OpenMP thread, and on a shared, busy
    machine 192 points then took ~25 s instead of ~1.5 s with one thread.
    """
    features = np.asarray(features, dtype=np.float32)
    perplexity = default_perplexity(len(features)) if perplexity is None else min(perplexity, len(features) - 1)
    model = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed,
                 n_jobs=threads)
    with threadpool_limits(limits=threads):
        return model.fit_transform(features)


def pca(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> ((N, 2) projection, explained variance ratio of the two components)."""
    features = np.asarray(features, dtype=np.float64)
    components = min(2, *features.shape)
    model = PCA(n_components=components, random_state=seed)
    with threadpool_limits(limits=1):  # BLAS threads on a busy shared machine cost more than they save
        points = model.fit_transform(features)
    if components < 2:  # one feature only: a flat second axis
        points = np.column_stack([points, np.zeros(len(points))])
    ratio = np.pad(model.explained_variance_ratio_, (0, 2 - components))
    return points, ratio


def ordered_taps(features: dict) -> list[str]:
    """The feature arrays of a features.npz (labels and indices aside), in the report's reading order."""
    taps = [key for key in features if key not in ("labels", "indices")]
    return sorted(taps, key=lambda tap: (TAP_ORDER.index(tap) if tap in TAP_ORDER else len(TAP_ORDER), tap))
