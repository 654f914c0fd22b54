import math

import pytest
import torch

from diffurec.metrics import RankingMetrics, target_ranks


def test_target_ranks_full_ranking():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.0, 1.0, 2.0, 3.0]])
    # items are 1..4; column j is item j+1
    ranks = target_ranks(scores, torch.tensor([3, 1]))
    assert ranks.tolist() == [2, 4]


def test_exclude_history_never_drops_target():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    history = torch.tensor([[0, 1, 3]])  # padding, item 1, item 3 (the target itself)
    assert target_ranks(scores, torch.tensor([3]), history).tolist() == [1]
    assert target_ranks(scores, torch.tensor([4]), history).tolist() == [1]
    assert target_ranks(scores, torch.tensor([4])).tolist() == [3]


def test_metrics_hand_computed():
    m = RankingMetrics()
    m.update(torch.tensor([1, 3, 11, 30]))
    out = m.compute()
    assert out["HR@5"] == pytest.approx(2 / 4)
    assert out["HR@10"] == pytest.approx(2 / 4)
    assert out["HR@20"] == pytest.approx(3 / 4)
    assert out["NDCG@10"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert out["NDCG@20"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(12)) / 4)
    assert out["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 30) / 4)


def test_metrics_stream_equals_one_shot():
    ranks = torch.randint(1, 50, (101,))
    a, b = RankingMetrics(), RankingMetrics()
    a.update(ranks)
    for chunk in ranks.split(17):
        b.update(chunk)
    for k, v in a.compute().items():
        assert b.compute()[k] == pytest.approx(v)
