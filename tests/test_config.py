import pytest

from diffurec.config import Config
from diffurec.errors import DiffuRecError


def test_defaults_are_the_reference():
    cfg = Config()
    assert (cfg.hidden_size, cfg.num_blocks, cfg.num_heads, cfg.max_len, cfg.batch_size) == (128, 4, 4, 50, 512)
    assert (cfg.diffusion_steps, cfg.noise_schedule, cfg.lambda_mean, cfg.lambda_std) == (32, "trunc_lin", 0.001, 0.001)
    assert (cfg.dropout, cfg.emb_dropout, cfg.positional_embedding) == (0.1, 0.3, False)
    # the reference's Transformer block
    assert (cfg.gelu, cfg.dropout_placement, cfg.layer_norm_eps, cfg.linear_init, cfg.ce_padding_column) == (
        "tanh", "reference", 1e-12, "xavier", True)


@pytest.mark.parametrize("sets,match", [
    (["noise_schedule=wiggly"], "noise_schedule"),
    (["reverse_steps=40"], r"reverse_steps.*\[1, diffusion_steps=32\]"),
    (["lambda_mean=-0.1"], "lambda_mean"),
    (["max_len=0"], "max_len"),
    (["batch_size=0"], "batch_size"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["epochs=abc"], "epochs"),
    (["hidden_size=30"], "num_heads"),
    (["label_smoothing=1.0"], r"label_smoothing.*\[0, 1\)"),
])
def test_invalid_values_name_the_key(sets, match):
    with pytest.raises(DiffuRecError, match=match):
        Config().with_sets(sets)


def test_yaml_roundtrip_and_sets(tmp_path):
    cfg = Config().with_sets(["model=sasrec", "lr=0.01", "positional_embedding=true", "diffusion_steps=8",
                              "reverse_steps=4"])
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    again = Config.from_yaml(path)
    assert again == cfg and again.lr == 0.01 and again.positional_embedding is True


def test_yaml_unknown_key_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hidden_size: 64\nlearning_rate: 0.1\n")
    with pytest.raises(DiffuRecError, match=r"bad.yaml.*learning_rate"):
        Config.from_yaml(path)
