"""K-Means: recovery of separated blobs, determinism, batching, the iteration cap, empty clusters, bad input."""

from __future__ import annotations

import pytest
import torch

from monai_unireg.networks.blocks import kmeans
from monai_unireg.networks.blocks.kmeans import _kmeans_plus_plus, _update_centroids


def blobs(generator: torch.Generator, sizes: list[list[int]], channels: int = 5, spread: float = 0.1):
    """One Gaussian-blob problem per entry of ``sizes`` (points per blob), each with its own means and shuffle.

    Returns ``[B, P, C]`` points, ``[B, P]`` true blob index and ``[B, N, C]`` generating means.
    """
    points, truth, means = [], [], []
    for blob_sizes in sizes:
        centre = torch.randn(len(blob_sizes), channels, generator=generator) * 10
        label = torch.cat([torch.full((n,), k) for k, n in enumerate(blob_sizes)])
        order = torch.randperm(len(label), generator=generator)
        noise = torch.randn(len(label), channels, generator=generator) * spread
        points.append((centre[label] + noise)[order])
        truth.append(label[order])
        means.append(centre)
    return torch.stack(points), torch.stack(truth), torch.stack(means)


def assert_same_partition(labels: torch.Tensor, truth: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Check that ``[P]`` labels split the points as ``truth`` does; return the label of each true blob."""
    pairs = torch.unique(torch.stack([truth, labels], 1), dim=0)
    assert len(pairs) == num_clusters and len(torch.unique(pairs[:, 1])) == num_clusters
    return pairs[:, 1]


def one_lloyd_step(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignment of ``[P, C]`` points to ``[K, C]`` centroids and the updated centroids, written out point by point."""
    labels = torch.tensor([int(((centroids - x) ** 2).sum(1).argmin()) for x in points])
    updated = centroids.clone()
    for k in range(len(centroids)):
        if (labels == k).any():
            updated[k] = points[labels == k].mean(0)
    return labels, updated


@pytest.fixture
def blob_problem(generator):
    """Two problems with different blob sizes and layouts, 4 blobs each."""
    return blobs(generator, [[30, 50, 20, 40], [60, 10, 35, 35]])


def test_recovers_separated_blobs(blob_problem):
    points, truth, means = blob_problem
    labels, centroids = kmeans(points, 4)
    assert labels.shape == (2, 140) and labels.dtype == torch.int64
    assert centroids.shape == (2, 4, 5) and centroids.dtype == points.dtype
    for b in range(2):
        blob_label = assert_same_partition(labels[b], truth[b], 4)
        sample_means = torch.stack([points[b][truth[b] == k].mean(0) for k in range(4)])
        torch.testing.assert_close(centroids[b, blob_label], sample_means, rtol=0, atol=1e-5)
        torch.testing.assert_close(centroids[b, blob_label], means[b], rtol=0, atol=0.1)


def test_fit_on_a_subsample_then_assign_every_point(blob_problem):
    """With ``max_fit_points`` the centroids come from evenly spaced points only; every point is then labelled
    by its nearest centroid, and the blobs are still recovered."""
    points, truth, means = blob_problem
    labels, centroids = kmeans(points, 4, max_fit_points=40)
    subset = torch.linspace(0, 139, 40).round().long()
    _, subset_centroids = kmeans(points[:, subset], 4)
    torch.testing.assert_close(centroids, subset_centroids, rtol=0, atol=0)
    assert torch.equal(labels, torch.cdist(points, centroids).argmin(2))
    for b in range(2):
        assert_same_partition(labels[b], truth[b], 4)
    assert torch.equal(kmeans(points, 4, max_fit_points=140)[0], kmeans(points, 4)[0])  # enough: all points


def test_every_seed_recovers_the_blobs(blob_problem):
    points, truth, _ = blob_problem
    for seed in range(10):
        labels, _ = kmeans(points, 4, seed=seed)
        for b in range(2):
            assert_same_partition(labels[b], truth[b], 4)


def test_same_seed_is_bit_identical_and_seed_matters(generator):
    features = torch.nn.functional.avg_pool3d(torch.randn(2, 6, 12, 12, 12, generator=generator), 3, stride=1)
    points = features.flatten(2).transpose(1, 2)  # [2, 1000, 6], the channel-first view SACB clusters
    first = kmeans(points, 7, seed=3)
    second = kmeans(points, 7, seed=3)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    contiguous = kmeans(points.contiguous(), 7, seed=3)
    assert torch.equal(first[0], contiguous[0])
    torch.testing.assert_close(first[1], contiguous[1])
    other = kmeans(points, 7, seed=4)
    assert not torch.equal(first[1], other[1])


def test_batch_entry_equals_a_call_on_it_alone(blob_problem, generator):
    features = torch.nn.functional.avg_pool3d(torch.randn(3, 6, 12, 12, 12, generator=generator), 3, stride=1)
    noise = features.flatten(2).transpose(1, 2)  # entries that converge after different numbers of iterations
    for points, num_clusters, tolerance in [(blob_problem[0], 4, 1e-4), (noise, 5, 1e-2)]:
        labels, centroids = kmeans(points, num_clusters, tolerance=tolerance, seed=1)
        for b in range(len(points)):
            alone_labels, alone_centroids = kmeans(points[b : b + 1], num_clusters, tolerance=tolerance, seed=1)
            assert torch.equal(labels[b : b + 1], alone_labels)
            torch.testing.assert_close(centroids[b : b + 1], alone_centroids, rtol=0, atol=1e-6)


def test_iteration_cap_gives_the_first_lloyd_step():
    points = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0], [6.0, 0.0]]])
    points = torch.cat([points, torch.tensor([[[7.0, 1.0]]])], 1)
    stopped_early = 0
    for seed in range(8):
        start = _kmeans_plus_plus(points, 3, torch.Generator().manual_seed(seed))[0]
        assert all((points[0] == centroid).all(1).any() for centroid in start)  # k-means++ picks input points
        _, first = one_lloyd_step(points[0], start)
        first_labels, second = one_lloyd_step(points[0], first)
        labels, centroids = kmeans(points, 3, max_iterations=1, seed=seed)
        torch.testing.assert_close(centroids[0], first)
        assert torch.equal(labels[0], first_labels)  # labels are the assignment to the returned centroids
        torch.testing.assert_close(kmeans(points, 3, max_iterations=2, seed=seed)[1][0], second)
        stopped_early += not torch.allclose(first, kmeans(points, 3, seed=seed)[1][0])
    assert stopped_early > 0  # for some seeds one step is not enough, so the cap did stop the iterations


def test_empty_cluster_keeps_its_centroid():
    points = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [4.0, 0.0]]])
    centroids = torch.tensor([[[0.0, 1.0], [7.0, 7.0], [4.0, 0.0]]])
    labels = torch.tensor([[0, 0, 2]])
    updated = _update_centroids(points, labels, centroids, torch.empty(1, 3, 3))
    torch.testing.assert_close(updated, torch.tensor([[[0.0, 1.0], [7.0, 7.0], [4.0, 0.0]]]))


def test_fewer_distinct_points_than_clusters():
    distinct = torch.tensor([[0.0, 1.0], [3.0, 0.0], [-2.0, 5.0]])
    points = distinct[torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])].expand(2, -1, -1)
    labels, centroids = kmeans(points, 5)
    assert torch.isfinite(centroids).all() and ((labels >= 0) & (labels < 5)).all()
    for b in range(2):
        assert len(torch.unique(labels[b])) == 3
        torch.testing.assert_close(centroids[b, labels[b]], points[b])
    # one distinct point: every D^2 is zero, the seeding falls back to uniform draws and ties go to cluster 0
    labels, centroids = kmeans(torch.tensor([[[1.0, 2.0]] * 4]), 3)
    assert torch.equal(labels, torch.zeros(1, 4, dtype=torch.int64))
    assert torch.equal(centroids, torch.tensor([[[1.0, 2.0]] * 3]))


def test_single_cluster_is_the_mean(generator):
    points = torch.randn(3, 20, 4, generator=generator, dtype=torch.float64)
    labels, centroids = kmeans(points, 1)
    assert torch.equal(labels, torch.zeros(3, 20, dtype=torch.int64))
    torch.testing.assert_close(centroids, points.mean(1, keepdim=True))


def test_no_gradient_and_dtypes(blob_problem):
    points, truth, _ = blob_problem
    leaf = points.clone().requires_grad_()
    with torch.enable_grad():
        labels, centroids = kmeans(leaf * 2, 4)
    assert not labels.requires_grad and not centroids.requires_grad and centroids.grad_fn is None
    half_labels, half_centroids = kmeans(points.half(), 4)
    assert half_centroids.dtype == torch.float16 and half_labels.dtype == torch.int64
    for b in range(2):
        assert_same_partition(half_labels[b], truth[b], 4)
    assert kmeans(points.double(), 4)[1].dtype == torch.float64


@pytest.mark.parametrize(
    ("points", "kwargs", "name"),
    [
        ([[[0.0]]], {}, "points"),
        (torch.zeros(2, 3), {}, "points"),
        (torch.zeros(1, 3, 2, dtype=torch.int64), {}, "points"),
        (torch.tensor([[[0.0], [float("nan")]]]), {}, "points"),
        (torch.tensor([[[0.0], [float("inf")]]]), {}, "points"),
        (torch.zeros(1, 0, 2), {}, "points"),
        (torch.zeros(1, 3, 2), {"num_clusters": 0}, "num_clusters"),
        (torch.zeros(1, 3, 2), {"num_clusters": 4}, "num_clusters"),
        (torch.zeros(1, 3, 2), {"num_clusters": 2.0}, "num_clusters"),
        (torch.zeros(1, 3, 2), {"max_iterations": 0}, "max_iterations"),
        (torch.zeros(1, 3, 2), {"tolerance": -1e-3}, "tolerance"),
        (torch.zeros(1, 3, 2), {"tolerance": float("nan")}, "tolerance"),
        (torch.zeros(1, 3, 2), {"seed": -1}, "seed"),
        (torch.zeros(1, 3, 2), {"max_fit_points": 1}, "max_fit_points"),
    ],
)
def test_bad_input_raises(points, kwargs, name):
    arguments = {"num_clusters": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        kmeans(points, **arguments)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(blob_problem):
    points, truth, _ = blob_problem
    cpu_labels, cpu_centroids = kmeans(points, 4)
    cuda_labels, cuda_centroids = kmeans(points.cuda(), 4)
    assert cuda_labels.device.type == "cuda" and cuda_centroids.device.type == "cuda"
    assert torch.equal(cuda_labels, kmeans(points.cuda(), 4)[0])
    for b in range(2):
        cpu_order = assert_same_partition(cpu_labels[b], truth[b], 4)
        cuda_order = assert_same_partition(cuda_labels[b].cpu(), truth[b], 4)
        torch.testing.assert_close(cuda_centroids[b, cuda_order].cpu(), cpu_centroids[b, cpu_order])
