"""The reference stand-in that ``benchmarks/throughput.py --reference`` times (tiny sizes)."""

import sys
from pathlib import Path

import pytest
import torch

from diffurec.config import Config
from diffurec.data.sequences import sequence_data_from_tables
from diffurec.data.split import split_log
from diffurec.data.synthetic import generate_synthetic_log

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_step import PaddedDiffuRec, PrefixDataset, time_reference  # noqa: E402


@pytest.fixture(scope="module")
def data():
    res = split_log(generate_synthetic_log(num_users=300, num_items=60, mean_length=12, seed=0))
    return sequence_data_from_tables(res.sequences, int(res.items.num_rows), res.stats)


def small_cfg() -> Config:
    return Config().with_sets(["hidden_size=16", "num_heads=2", "num_blocks=2", "batch_size=16",
                               "diffusion_steps=4", "reverse_steps=4", "max_len=10"])


def test_prefix_dataset_pads_every_example_to_max_len_like_the_reference_loader():
    history, target = PrefixDataset([[5, 6, 7], list(range(1, 15))], max_len=10)[0]
    assert history.tolist() == [0] * 8 + [5, 6] and target.tolist() == [7]
    history, target = PrefixDataset([[5, 6, 7], list(range(1, 15))], max_len=10)[1]
    assert history.tolist() == list(range(4, 14)) and target.tolist() == [14]


def test_reference_stand_in_trains_on_padded_batches_and_reports_its_rates(data):
    cfg = small_cfg()
    model = PaddedDiffuRec(cfg, data.num_items)
    history = torch.zeros(4, cfg.max_len, dtype=torch.long)
    history[:, -3:] = torch.tensor([1, 2, 3])
    loss = model.loss(history, torch.tensor([4, 5, 6, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    # the work of every block and of the step embedding reaches the loss
    assert all(p.grad is not None for name, p in model.named_parameters() if "blocks" in name or "time_embed" in name)
    assert model.predict(history).shape == (4, cfg.hidden_size)

    rates = time_reference(cfg, data, train_batches=2, eval_batches=1)
    assert rates["train_samples_per_s"] > 0
    assert list(rates["eval_users_per_s"]) == [str(cfg.diffusion_steps)]
    assert rates["eval_users_per_s"][str(cfg.diffusion_steps)] > 0
    assert time_reference(cfg, data, train_batches=1, eval_batches=0)["eval_users_per_s"] == {}


def test_throughput_names_the_cpu_its_figures_came_from():
    from throughput import cpu_description

    cpuinfo = "\n".join([
        "processor\t: 0", "vendor_id\t: AuthenticAMD", "cpu family\t: 25", "model\t\t: 17",
        "model name\t: AMD EPYC 9R14", "flags\t\t: fpu avx2 avx512f avx512_bf16", "",
        "processor\t: 1", "cpu family\t: 25", "model\t\t: 17", "model name\t: AMD EPYC 9R14",
        "flags\t\t: fpu avx2 avx512f avx512_bf16",
    ])
    assert cpu_description(cpuinfo) == "AMD EPYC 9R14 (family 25, model 17), 2 cpus, avx512_bf16"
    assert cpu_description("model name\t: Some CPU\nflags\t: sse2").startswith("Some CPU, ")
