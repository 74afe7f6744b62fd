import torch

from fcmae.finetune.knn import knn_predict


def knn_accuracy(train, train_labels, queries, labels, num_classes, **kwargs):
    scores = knn_predict(train, train_labels, queries, num_classes, **kwargs)
    return 100.0 * (scores.argmax(1) == labels).float().mean().item()


def test_knn_finds_the_clusters_and_fails_on_shuffled_labels():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 3
    labels = torch.arange(4).repeat_interleave(50)
    features = centres[labels] + torch.randn(200, 16, generator=generator)
    queries = centres[labels] + torch.randn(200, 16, generator=generator)
    assert knn_accuracy(features, labels, queries, labels, num_classes=4) > 95
    shuffled = labels[torch.randperm(200, generator=generator)]
    assert knn_accuracy(features, shuffled, queries, labels, num_classes=4) < 50


def test_nearest_neighbour_votes_by_similarity():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    scores = knn_predict(
        train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.1]]), num_classes=2, k=1
    )
    assert scores.argmax(1).item() == 0


def test_a_small_temperature_does_not_overflow():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 3
    labels = torch.arange(3).repeat_interleave(20)
    features = centres[labels] + 0.1 * torch.randn(60, 8, generator=generator)
    for temperature in (0.07, 1e-4):
        scores = knn_predict(features, labels, features, 3, k=10, temperature=temperature)
        assert scores.isfinite().all()
        assert (scores.argmax(1) == labels).all()
