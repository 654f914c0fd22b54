"""The synthetic log: deterministic, survives 5/5 k-core, has learnable sequential structure."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from diffurec.data.sequences import eval_examples, load_sequences, train_examples
from diffurec.data.split import split_log
from diffurec.data.synthetic import generate_synthetic_log, write_synthetic_log
from diffurec.errors import DiffuRecError


def test_deterministic_and_schema():
    a = generate_synthetic_log(seed=1)
    b = generate_synthetic_log(seed=1)
    c = generate_synthetic_log(seed=2)
    assert a.equals(b) and not a.equals(c)
    assert a.column_names == ["user_id", "item_id", "timestamp"]
    assert all(str(t) == "int64" for t in a.schema.types)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_survives_5core(seed):
    t = generate_synthetic_log(seed=seed)
    assert pc.min(pc.value_counts(t.column("user_id")).field("counts")).as_py() >= 5
    assert pc.min(pc.value_counts(t.column("item_id")).field("counts")).as_py() >= 5
    assert pc.count_distinct(t.column("item_id")).as_py() == 300
    res = split_log(t, 5, 5)
    assert res.stats["users"] == 1000 and res.stats["items"] == 300
    assert res.stats["interactions"] == t.num_rows
    assert res.stats["removed"]["kcore_events"] == 0
    assert res.stats["removed"]["duplicates"] == 0
    assert 12 <= res.stats["mean_length"] <= 18


def test_structure_beats_popularity(tmp_path):
    p = tmp_path / "syn.parquet"
    write_synthetic_log(p, seed=0)
    assert pq.read_metadata(p).num_rows > 10_000
    data = load_sequences(p)
    n = data.num_items + 1
    tr = train_examples(data, max_len=50)
    prev, tgt = data.items[tr.end - 1], data.items[tr.end]
    trans = np.zeros((n, n))
    np.add.at(trans, (prev, tgt), 1)
    pop = np.bincount(tgt, minlength=n).astype(float)
    pop[0] = -1
    te = eval_examples(data, "test", 50)
    last, target = data.items[te.end - 1], data.items[te.end]
    top_pop = np.argsort(-pop)[:10]
    hr_pop = np.isin(target, top_pop).mean()
    scores = trans[last] + 1e-3 * pop  # bigram, popularity to break ties
    scores[:, 0] = -1
    top_bigram = np.argsort(-scores, axis=1)[:, :10]
    hr_bigram = (top_bigram == target[:, None]).any(axis=1).mean()
    assert hr_bigram > hr_pop + 0.3, (hr_bigram, hr_pop)


def test_bad_arguments():
    with pytest.raises(DiffuRecError, match="mean_length"):
        generate_synthetic_log(mean_length=3)
    with pytest.raises(DiffuRecError, match="num_users"):
        generate_synthetic_log(num_users=0)
