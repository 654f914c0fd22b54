"""The CUDA-graph training step (diffurec/graphs.py). The replay-against-eager test needs a GPU
and is skipped without one; the rules for when graphs are used and how histories are padded
for them are checked everywhere."""

import copy

import pytest
import torch

from diffurec.config import Config
from diffurec.data.sequences import sequence_data_from_tables
from diffurec.data.split import split_log
from diffurec.data.synthetic import generate_synthetic_log
from diffurec.graphs import GraphedTrainStep, graphs_unusable
from diffurec.models import build_model
from diffurec.training import graphed_step, make_optimizer, train_epoch, training_batches

TINY = ["hidden_size=32", "num_blocks=2", "num_heads=2", "max_len=20", "diffusion_steps=8", "reverse_steps=8",
        "batch_size=64", "lr=0.005"]


@pytest.fixture(scope="module")
def data():
    res = split_log(generate_synthetic_log(num_users=600, num_items=100, mean_length=12, seed=0))
    return sequence_data_from_tables(res.sequences, int(res.items.num_rows), res.stats)


@pytest.mark.parametrize("max_len", [50, 20, 5])
def test_graph_shapes_pad_to_multiples_of_8_within_max_len(max_len):
    step = GraphedTrainStep(None, None, None, max_len=max_len)
    padded = {length: step.padded_length(length) for length in range(1, max_len + 1)}
    for length, to in padded.items():
        assert length <= to <= max_len
        assert to % 8 == 0 or to == max_len
    assert len(set(padded.values())) == -(-max_len // 8)  # e.g. 7 graphs for lengths 1-50


def test_graphs_only_where_a_replay_is_the_same_step(data):
    assert Config().cuda_graphs  # on by default; the rules below decide where it is used
    cfg = Config().with_sets(TINY + ["cuda_graphs=true"])
    model = build_model(cfg, data.num_items)
    cuda = torch.device("cuda")  # the rules read the device type only
    assert graphs_unusable(model, cuda, "constant") is None
    assert graphs_unusable(model, torch.device("cpu"), "constant") == "not a CUDA device"
    assert "lr_schedule" in graphs_unusable(model, cuda, "cosine")
    loss_aware = build_model(Config().with_sets(TINY + ["timestep_sampler=loss_aware"]), data.num_items)
    assert "loss-aware" in graphs_unusable(loss_aware, cuda, "constant")
    # on the CPU the loop keeps its eager step, and Adam its host-side step count
    assert graphed_step(model, make_optimizer(model, cfg), torch.device("cpu"), cfg) is None
    assert not make_optimizer(model, cfg).param_groups[0]["capturable"]
    # and where graphs are off, nothing changes on a GPU either
    off = Config().with_sets(TINY + ["cuda_graphs=false"])
    assert graphed_step(model, make_optimizer(model, off), cuda, off) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_steps_match_eager_steps(data):
    """Every step seeded alike: the graphed run (eager warm-up, capture, replays) takes the
    same losses and ends at the same parameters as the eager run, in fp32."""
    cfg = Config().with_sets(TINY + ["cuda_graphs=true", "precision=fp32", "grad_clip=1.0"])
    device = torch.device("cuda")
    torch.manual_seed(0)
    eager_model = build_model(cfg, data.num_items).to(device)
    graph_model = copy.deepcopy(eager_model)
    eager_opt, graph_opt = make_optimizer(eager_model, cfg), make_optimizer(graph_model, cfg)
    graphs = graphed_step(graph_model, graph_opt, device, cfg)
    assert graphs is not None and graph_opt.param_groups[0]["capturable"]
    batches = list(training_batches(data, cfg, epoch=1)[0])
    # histories padded as the graphs pad them, so both runs see the same shapes
    eager_losses, graph_losses = [], []
    for i, batch in enumerate(batches):
        pad = graphs.padded_length(batch["history"].shape[1]) - batch["history"].shape[1]
        padded = {"history": torch.nn.functional.pad(batch["history"], (pad, 0)), "target": batch["target"]}
        torch.cuda.manual_seed(1000 + i)
        eager_losses.append(train_epoch(eager_model, [padded], eager_opt, device, precision="fp32",
                                        grad_clip=cfg.grad_clip)["loss"])
        torch.cuda.manual_seed(1000 + i)
        graph_losses.append(train_epoch(graph_model, [batch], graph_opt, device, precision="fp32",
                                        grad_clip=cfg.grad_clip, graphs=graphs)["loss"])
    assert graphs.failed is None
    assert len(graphs.graphs) >= 2  # several shapes were captured and replayed
    assert eager_losses == pytest.approx(graph_losses, rel=1e-3, abs=1e-4)
    for (name, a), b in zip(eager_model.named_parameters(), graph_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
