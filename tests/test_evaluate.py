import numpy as np
import pytest
import torch
from sklearn import metrics

from inference import evaluate


def random_labels(seed, num=300, classes=5, clusters=6):
    rng = np.random.default_rng(seed)
    truth = rng.integers(classes, size=num)
    pred = np.where(rng.random(num) < 0.7, (truth + 2) % clusters, rng.integers(clusters, size=num))
    return truth, pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmi_and_ari_match_sklearn(seed):
    truth, pred = random_labels(seed)
    assert evaluate.nmi(truth, pred) == pytest.approx(
        metrics.normalized_mutual_info_score(truth, pred), abs=1e-12
    )
    assert evaluate.ari(truth, pred) == pytest.approx(
        metrics.adjusted_rand_score(truth, pred), abs=1e-12
    )


def test_clustering_accuracy_against_brute_force():
    import itertools

    truth, pred = random_labels(3, num=200, classes=4, clusters=4)
    best = max(np.mean(np.array(perm)[pred] == truth) for perm in itertools.permutations(range(4)))
    assert evaluate.clustering_accuracy(truth, pred) == pytest.approx(best)
    # relabelling the clusters changes nothing; perfect clustering scores 1 everywhere
    assert evaluate.clustering_accuracy(truth, (pred + 1) % 4) == pytest.approx(best)
    t = torch.tensor([0, 0, 1, 1, 2])
    assert evaluate.clustering_accuracy(t, t + 7) == 1.0
    assert evaluate.nmi(t, t + 7) == pytest.approx(1.0) and evaluate.ari(t, t + 7) == pytest.approx(
        1.0
    )


def test_label_errors():
    with pytest.raises(ValueError, match="differ in length"):
        evaluate.nmi([0, 1], [0])
    with pytest.raises(ValueError, match="no labels"):
        evaluate.ari([], [])


def test_information_criteria():
    assert evaluate.bic(-100.0, 5, 50) == pytest.approx(200 + 5 * np.log(50))
    assert evaluate.aic(-100.0, 5) == pytest.approx(210.0)


def test_majority_mapping_for_more_clusters_than_labels():
    truth = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    pred = np.array([5, 5, 6, 7, 7, 6, 8, 9])  # 6 clusters for 3 labels
    # cluster 5 -> 0 (2 right), 6 -> 0 or 1 (1), 7 -> 1 (2), 8 -> 2 (1), 9 -> 2 (1): 7 of 8
    assert evaluate.clustering_accuracy(truth, pred, "majority") == pytest.approx(7 / 8)
    # one-to-one can use only three of the six clusters
    assert evaluate.clustering_accuracy(truth, pred) == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="mapping"):
        evaluate.clustering_accuracy(truth, pred, "greedy")
