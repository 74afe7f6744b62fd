"""k-nearest-neighbour classification on frozen features (cosine similarity,
votes weighted by exp(similarity / temperature), as in DINO's evaluation)."""
import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_features, train_labels, features, num_classes, k=20, temperature=0.07, chunk=1024):
    """train_features (M, D), train_labels (M,), features (N, D) -> class scores (N, num_classes)."""
    train_features = F.normalize(train_features.float(), dim=1)
    k = min(k, len(train_labels))
    scores = []
    for part in F.normalize(features.float(), dim=1).split(chunk):
        similarity, nearest = (part @ train_features.T).topk(k, dim=1)
        votes = F.one_hot(train_labels[nearest], num_classes).float()
        scores.append((votes * (similarity / temperature).exp().unsqueeze(-1)).sum(1))
    return torch.cat(scores)


def knn_accuracy(train_features, train_labels, features, labels, num_classes, k=20, temperature=0.07):
    """Top-1 accuracy (%) of kNN classification of ``features``."""
    scores = knn_predict(train_features, train_labels, features, num_classes, k, temperature)
    return 100.0 * (scores.argmax(1) == labels).float().mean().item()
