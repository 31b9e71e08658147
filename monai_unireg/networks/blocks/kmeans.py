"""Batched, seeded, deterministic K-Means (k-means++ seeding, Lloyd iterations) for per-voxel feature clustering."""

from __future__ import annotations

import torch

from monai_unireg.validation import check_integer, check_positive, check_tensor

__all__ = ["kmeans"]


def kmeans(
    points: torch.Tensor,
    num_clusters: int,
    max_iterations: int = 50,
    tolerance: float = 1e-4,
    seed: int = 0,
    max_fit_points: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``B`` independent point sets into ``num_clusters`` groups each with K-Means.

    Used by SACB-Net's spatial-awareness convolution blocks, which group the feature vectors of all voxels into
    ``K`` clusters (7 in the paper) and give each cluster its own kernel (Cheng et al., "SACB-Net:
    Spatial-awareness Convolutions for Medical Image Registration", CVPR 2025). The clustering is seeded, so
    inference is reproducible.

    Algorithm (one vectorised loop for all ``B`` problems):

    - **Initialisation**: k-means++ (Arthur and Vassilvitskii, 2007). The first centroid is a uniformly drawn
      point; each next one is drawn with probability proportional to ``D^2``, the squared distance of a point to
      its nearest centroid so far, by inverse-CDF sampling (a float64 ``cumsum`` of ``D^2`` searched with
      ``searchsorted`` at a uniform draw; float32 on MPS, which has no float64). When every ``D^2`` of a problem
      is zero (it has fewer distinct points than ``K``), the point is drawn uniformly instead, so the centroid
      repeats an existing one; the duplicate then ends up as an empty cluster (see below).
    - **Lloyd iterations**: each point is assigned to the centroid of smallest squared distance
      ``||x||^2 - 2 x.c + ||c||^2``, computed with one ``bmm``; the ``||x||^2`` term is the same for every centroid
      and is left out of the ``argmin``. Ties go to the smallest cluster index. Each centroid becomes the mean of
      its points, computed as a ``bmm`` of the one-hot assignment with the points, divided by the counts (sums of
      the one-hot, exact up to ``2^24`` points per cluster in float32).
    - **Empty clusters**: a cluster that receives no point keeps its previous centroid.
    - **Stopping**: a batch entry stops after the first update whose largest centroid move (Euclidean distance,
      over its clusters) is ``<= tolerance``, and keeps its centroids while the others go on; the loop ends when
      every entry has stopped (the largest move over all entries and clusters is ``<= tolerance``) or after
      ``max_iterations`` updates. The returned labels are always the assignment of the points to the returned
      centroids.

    Determinism: the ``K`` random draws come from a ``torch.Generator`` created on the points' device and seeded
    with ``seed``, and no step uses atomic floating-point accumulation (no ``scatter_add``/``index_add``), so a call
    is bit-for-bit repeatable on a given device. All batch entries share the same draws and stop on their own, so
    each entry gets the result of a call on it alone (up to the floating-point rounding of batched matrix
    products). CPU and CUDA generators give different random streams, so the two devices may start from
    different seed points; well-separated clusters are recovered on both.

    The computation runs without autograd (the outputs never require grad), in float32 or in the input's dtype
    when wider: float16 and bfloat16 points are promoted, and the centroids are cast back to the input dtype
    (the labels are the assignment to the centroids before that cast).

    Cost per iteration: ``O(B * P * K * C)`` for the distances and the centroid sums, one ``bmm`` each. Memory:
    one ``[B, K, P]`` buffer of ``B * P * K`` floats shared by the distances and the one-hot assignment, ``B * P``
    floats for the smallest distances, the ``[B, P]`` int64 labels, ``O(B * P)`` more during the seeding, and a
    float32 copy of the points only when their dtype is narrower. Contiguous ``[B, P, C]`` points and the view
    ``features.flatten(2).transpose(1, 2)`` of channel-first features are both used in place.

    Args:
        points: ``[B, P, C]`` finite floating points: ``B`` independent problems of ``P`` points with ``C``
            features each.
        num_clusters: number of clusters ``K``, ``1 <= K <= P``.
        max_iterations: largest number of Lloyd updates, ``>= 1``.
        tolerance: stop when no centroid moves by more than this (``>= 0``).
        seed: seed of the k-means++ draws, ``>= 0``.
        max_fit_points: when ``P`` is larger, the seeding and the Lloyd iterations run on this many evenly spaced
            points (``linspace`` over the point index; for voxels in raster order, a regular spatial subsample)
            and every point is then assigned to the resulting centroids in one pass. ``None``: fit on all points.

    Returns:
        ``(labels, centroids)``: ``[B, P]`` int64 cluster index in ``[0, K)`` of every point, and ``[B, K, C]``
        cluster centroids in the dtype of ``points``.
    """
    check_tensor(points, "points", ndim=3)
    if not points.is_floating_point():
        raise ValueError(f"points must be a floating point tensor, got dtype {points.dtype}.")
    batch, num_points, channels = points.shape
    if min(batch, num_points, channels) == 0:
        raise ValueError(f"points must hold at least one problem, point and feature, got shape {tuple(points.shape)}.")
    num_clusters = check_integer(num_clusters, "num_clusters", 1)
    if num_clusters > num_points:
        raise ValueError(f"num_clusters must be <= the number of points {num_points}, got {num_clusters}.")
    max_iterations = check_integer(max_iterations, "max_iterations", 1)
    check_positive(tolerance, "tolerance", allow_zero=True)
    seed = check_integer(seed, "seed", 0)

    if max_fit_points is not None:
        max_fit_points = check_integer(max_fit_points, "max_fit_points", num_clusters)
    with torch.no_grad():
        x = points.detach().to(torch.promote_types(points.dtype, torch.float32))
        fit = x
        if max_fit_points is not None and num_points > max_fit_points:  # evenly spaced points, first and last kept
            fit = x[:, torch.linspace(0, num_points - 1, max_fit_points, device=x.device).round().long()]
        centroids, labels = _lloyd(fit, num_clusters, max_iterations, tolerance, seed)
        if fit is not x:
            labels = torch.empty(batch, num_points, dtype=torch.int64, device=x.device)
            _assign(x, centroids, x.new_empty(batch, num_clusters, num_points), x.new_empty(batch, num_points), labels)
    return labels, centroids.to(points.dtype)


def _lloyd(
    x: torch.Tensor, num_clusters: int, max_iterations: int, tolerance: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeding and Lloyd iterations on ``[B, P, C]`` points -> ``[B, K, C]`` centroids, ``[B, P]`` labels."""
    batch, num_points, _ = x.shape
    generator = torch.Generator(device=x.device).manual_seed(seed)
    centroids = _kmeans_plus_plus(x, num_clusters, generator)
    buffer = x.new_empty(batch, num_clusters, num_points)
    minimum = x.new_empty(batch, num_points)
    labels = torch.empty(batch, num_points, dtype=torch.int64, device=x.device)
    _assign(x, centroids, buffer, minimum, labels)
    active = torch.ones(batch, 1, 1, dtype=torch.bool, device=x.device)  # entries still iterating
    for _ in range(max_iterations):
        updated = _update_centroids(x, labels, centroids, buffer)
        move = torch.linalg.vector_norm(updated - centroids, dim=2).amax(1)  # [B]
        centroids = torch.where(active, updated, centroids)
        _assign(x, centroids, buffer, minimum, labels)
        active &= (move > tolerance).view(batch, 1, 1)
        # Traced (TorchScript export), every iteration runs: a stopped entry keeps its centroids, so the result is
        # the same for any input, without a data-dependent branch baked into the trace.
        if not torch.jit.is_tracing() and not active.any():
            break
    return centroids, labels


def _kmeans_plus_plus(x: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding of ``[B, P, C]`` points -> ``[B, K, C]`` centroids (see :func:`kmeans`)."""
    batch, num_points, channels = x.shape
    rows = torch.arange(batch, device=x.device)
    sample_dtype = torch.float32 if x.device.type == "mps" else torch.float64
    # The same K draws serve every batch entry, so an entry's seeding does not depend on the rest of the batch.
    uniform = _untraced_rand(num_clusters, generator, x.device, sample_dtype)
    uniform_index = (uniform * num_points).long().clamp_(max=num_points - 1)  # [K]
    centroids = x.new_empty(batch, num_clusters, channels)
    centroids[:, 0] = x[:, uniform_index[0]]
    if num_clusters == 1:
        return centroids
    squared_norms = torch.einsum("bpc,bpc->bp", x, x).unsqueeze(2)  # [B, P, 1]
    closest = torch.full_like(squared_norms, float("inf"))  # D^2 to the nearest centroid so far
    for k in range(1, num_clusters):
        newest = centroids[:, k - 1 : k]  # [B, 1, C]
        distance = torch.baddbmm(squared_norms, x, newest.transpose(1, 2), alpha=-2)
        distance.add_(newest.square().sum(2, keepdim=True)).clamp_(min=0)
        torch.minimum(closest, distance, out=closest)
        cdf = closest.squeeze(2).to(sample_dtype).cumsum(1)  # [B, P]
        total = cdf[:, -1:]
        # (1 - u) * total lies in (0, total]: the first cdf entry >= it belongs to a point with D^2 > 0.
        sampled = torch.searchsorted(cdf, (1 - uniform[k]) * total).squeeze(1)
        centroids[:, k] = x[rows, torch.where(total.squeeze(1) > 0, sampled, uniform_index[k])]
    return centroids


def _untraced_rand(count: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.rand`` from ``generator``; under tracing drawn outside the trace, so the exported network holds these
    seeded draws as constants (a traced ``rand`` would draw new, unseeded values at every call)."""
    state = torch._C._get_tracing_state()
    if state is None:
        return torch.rand(count, generator=generator, device=device, dtype=dtype)
    torch._C._set_tracing_state(None)
    try:
        return torch.rand(count, generator=generator, device=device, dtype=dtype)
    finally:
        torch._C._set_tracing_state(state)


def _assign(
    x: torch.Tensor, centroids: torch.Tensor, scores: torch.Tensor, minimum: torch.Tensor, labels: torch.Tensor
) -> None:
    """Write the nearest-centroid index of ``[B, P, C]`` points into ``labels`` ``[B, P]``.

    ``scores`` ``[B, K, P]`` receives ``||c||^2 - 2 x.c``, the squared distance less the per-point ``||x||^2``, and
    ``minimum`` ``[B, P]`` its minimum over the clusters. Clusters lie along dimension 1 so that the reduction
    runs over contiguous rows of points (``torch.min`` returns the first index of tied minima).
    """
    squared_norms = centroids.square().sum(2, keepdim=True)  # [B, K, 1]
    torch.baddbmm(squared_norms, centroids, x.transpose(1, 2), alpha=-2, out=scores)
    torch.min(scores, 1, out=(minimum, labels))


def _update_centroids(
    x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, one_hot: torch.Tensor
) -> torch.Tensor:
    """Means of the ``[B, P, C]`` points of each cluster ``[B, K, C]``; an empty cluster keeps its centroid.

    ``one_hot`` ``[B, K, P]`` is scratch space; the sums are a ``bmm`` (deterministic, no atomics).
    """
    one_hot.zero_().scatter_(1, labels.unsqueeze(1), 1.0)
    counts = one_hot.sum(2, keepdim=True)  # [B, K, 1]
    sums = torch.bmm(one_hot, x)  # [B, K, C]
    return torch.where(counts > 0, sums.div_(counts.clamp(min=1)), centroids)
