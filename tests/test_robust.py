"""Robust aggregation against hand computations on toy sets (shared/method/robust.py and Flower's
robust strategies as the population stage uses them)."""
import torch

from shared.method.robust import clip_to_median, krum_choice, robust_group, weighted_trimmed_mean


def test_trimmed_mean_with_equal_weights_is_the_textbook_one():
    v = torch.tensor([[1.0], [2.0], [3.0], [4.0], [100.0]])
    # beta 0.2 of five equal weights cuts one value at each end: mean of 2, 3, 4
    assert torch.allclose(weighted_trimmed_mean(v, torch.ones(5), 0.2), torch.tensor([3.0]))
    assert torch.allclose(weighted_trimmed_mean(v, torch.ones(5), 0.0), torch.tensor([22.0]))
    assert torch.allclose(weighted_trimmed_mean(v, torch.ones(5), 0.5), torch.tensor([3.0]))   # median


def test_weights_count_as_repeated_values():
    v = torch.tensor([1.0, 2.0, 10.0])
    w = torch.tensor([1.0, 2.0, 1.0])   # as the values 1, 2, 2, 10
    assert torch.allclose(weighted_trimmed_mean(v, w, 0.25), torch.tensor(2.0))   # cut 1 and 10
    assert torch.allclose(weighted_trimmed_mean(v, w, 0.5), torch.tensor(2.0))
    # beta 0.125 cuts half of the weight of 1 and half of 10: (0.5*1 + 2*2 + 0.5*10) / 3
    assert torch.allclose(weighted_trimmed_mean(v, w, 0.125), torch.tensor(9.5 / 3))


def test_each_coordinate_is_sorted_on_its_own():
    v = torch.tensor([[0.0, 9.0], [5.0, 1.0], [1.0, 5.0]])
    assert torch.allclose(weighted_trimmed_mean(v, torch.ones(3), 0.5), torch.tensor([1.0, 5.0]))


def test_group_experts_by_routing_mass_routers_alike():
    def part(a, r):
        experts = torch.tensor([[a], [a]])
        return {"l.expert_A": experts, "l.expert_B": experts.clone(), "l.router_h": torch.tensor([r])}
    states = [part(1.0, 1.0), part(2.0, 2.0), part(50.0, 50.0)]
    masses = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])]
    out = robust_group(states, masses, ["l"], 0.5)
    assert torch.allclose(out["l.router_h"], torch.tensor([2.0]))              # median of 1, 2, 50
    assert torch.allclose(out["l.expert_A"][1], torch.tensor([50.0]))          # expert 1: only client 2 routed there
    assert torch.allclose(out["l.expert_A"][0], torch.tensor([1.0]))           # expert 0: weighted median of 1, 2


def test_updates_clipped_to_the_median_norm_before_the_weighted_median():
    """A client alone on an expert decides it, but by no more than the median update: start 0,
    updates of norm 1, 2 and 300 -> the 300 scaled to 2 (the median) before the weighted median."""
    def part(a, r):
        experts = torch.tensor([[a], [a]])
        return {"l.expert_A": experts, "l.expert_B": experts.clone(), "l.router_h": torch.tensor([r])}
    start = part(0.0, 0.0)
    # norms over all five numbers: sqrt(5) * a
    states = [part(1.0, 1.0), part(2.0, 2.0), part(300.0, 300.0)]
    masses = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])]
    clipped = clip_to_median(states, start)
    assert torch.allclose(clipped[2]["l.expert_A"], torch.tensor([[2.0], [2.0]]))
    assert torch.allclose(clipped[0]["l.router_h"], torch.tensor([1.0]))      # under the median: as sent
    out = robust_group(states, masses, ["l"], 0.5, start=start)
    assert torch.allclose(out["l.expert_A"][1], torch.tensor([2.0]))           # not 300
    assert torch.allclose(out["l.router_h"], torch.tensor([2.0]))
    # the clip is relative to the start, not to zero
    moved = {k: v + 10.0 for k, v in start.items()}
    shifted = [{k: v + 10.0 for k, v in s.items()} for s in states]
    out = robust_group(shifted, masses, ["l"], 0.5, start=moved)
    assert torch.allclose(out["l.expert_A"][1], torch.tensor([12.0]))


def test_krum_picks_the_state_in_the_crowd():
    base = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([0.1, 0.0])}, {"w": torch.tensor([0.0, 0.1])},
            {"w": torch.tensor([0.05, 0.05])}, {"w": torch.tensor([100.0, -100.0])}]
    assert krum_choice(base, faulty=1) == 3   # nearest to the other honest ones
    assert krum_choice(base[:2], faulty=0) == 0


def test_flowers_median_on_the_population_lora(task_identity):
    """federation.aggregation=median: Flower's FedMedian with the population message type, unweighted."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from server.strategies.robust import PopulationMedian, population_average
    from shared.runtime import protocol as P
    from shared.runtime.config import load_config

    cfg = load_config("tiny", ["federation.aggregation=median"])
    average = population_average(cfg.federation, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    assert isinstance(average, PopulationMedian)
    replies = []
    for value, examples in ((1.0, 1), (2.0, 1), (900.0, 10 ** 6)):   # the outlier claims a huge weight
        sent = Message(RecordDict(), dst_node_id=1, message_type=P.TRAIN_POPULATION)
        content = RecordDict({P.ARRAYS: ArrayRecord({"w": torch.full((2,), value)}),
                              P.METRICS: MetricRecord({P.NUM_EXAMPLES: examples})})
        replies.append(Message(content, reply_to=sent))
    arrays, _ = average.aggregate_train(1, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), 2.0))


def test_robust_aggregation_refuses_dp():
    import pytest

    from shared.runtime.config import load_config
    from shared.runtime.rules import ConfigError
    with pytest.raises(ConfigError, match="federation.aggregation"):
        load_config("tiny", ["federation.aggregation=median", "privacy.dp.noise_multiplier=1", "privacy.dp.clip=1"])
