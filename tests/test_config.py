"""Config loading: method sugar, derived values, and errors that name the field."""

import pytest

from bpo.config import ConfigError, TrainConfig, load_config

BASE = ["model.path=some/model"]


def load(*overrides):
    return load_config(TrainConfig, overrides=[*BASE, *overrides])


@pytest.mark.parametrize(
    "method, F, reference",
    [
        ("offline_dpo", 1, "sft"),
        ("on_policy_dpo", 40, "sft"),
        ("on_policy_bpo", 40, "behavior"),
    ],
)
def test_method_sugar(method, F, reference):
    cfg = load(f"method={method}", "T=40")
    assert (cfg.F, cfg.reference) == (F, reference)


def test_derived_values():
    cfg = load("method=bpo", "T=40", "F=4", "B=8")
    assert (cfg.K, cfg.M, cfg.N_total) == (10, 80, 320)
    assert cfg.reference == "behavior"


def test_method_named_from_F_and_reference():
    assert load("F=1", "reference=sft").method == "offline_dpo"
    assert load("T=40", "F=4", "reference=sft").method == "online_dpo"
    assert load("T=40", "F=40", "reference=behavior").method == "on_policy_bpo"


def test_unknown_key_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: x\nmethod: bpo\nF: 2\nlora:\n  rank: 4\n")
    expected = r"lora\.rank: unknown field .*valid fields here: r, alpha, target_modules"
    with pytest.raises(ConfigError, match=expected):
        load_config(TrainConfig, path)


def test_F_must_divide_T():
    with pytest.raises(ConfigError, match=r"^F: must divide T.*F=3, T=40"):
        load("method=bpo", "T=40", "F=3")


def test_budget_must_be_what_T_and_B_annotate():
    assert load("method=bpo", "F=2", "T=40", "B=16", "budget=640").N_total == 640
    with pytest.raises(
        ConfigError,
        match=r"^budget: 600 pairs, but T·B = 40·16 = 640 pairs would be annotated; set B=15, or "
        r"remove budget",
    ):
        load("method=bpo", "F=2", "T=40", "B=16", "budget=600")
    with pytest.raises(ConfigError, match=r"set T=20 or B=8, or remove budget"):
        load("method=bpo", "F=2", "T=40", "B=16", "budget=320")
    with pytest.raises(ConfigError, match=r"set T and B so that T·B = budget"):
        load("method=bpo", "F=2", "T=40", "B=16", "budget=601")


def test_method_conflicts_are_errors():
    with pytest.raises(ConfigError, match="^F: method offline_dpo has F = 1"):
        load("method=offline_dpo", "F=2")
    with pytest.raises(ConfigError, match="^reference: method bpo cannot use reference=sft"):
        load("method=bpo", "F=2", "reference=sft")
    with pytest.raises(ConfigError, match="^F: online_dpo needs 1 < F < T"):
        load("method=online_dpo", "F=1")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=bpo", "F=2", "beta=0"], "^beta: must be > 0"),
        (["method=offline_dpo", "reference=gold"], "^reference_path: reference=gold needs"),
        (["method=offline_dpo", "ema_tau=0.5"], "^ema_tau: set to 0.5 but reference=sft"),
        (["method=bpo", "F=2", "loss=kto"], "^loss: unknown loss 'kto'"),
        (["method=bpo", "F=2", "T=ten"], "^T: Value 'ten'"),
        (["F=2"], "^method: not set"),
        (["method=bpo", "F=2", "finetune=full", "lora.members=5"], "^lora.members / lora.init"),
        (["method=bpo", "F=2", "lora.members=0"], "^lora: members and r must be >= 1"),
    ],
)
def test_bad_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(*overrides)


def test_missing_model_path():
    with pytest.raises(ConfigError, match=r"^model\.path: required"):
        load_config(TrainConfig, overrides=["method=bpo", "F=2"])


def test_resolved_yaml_round_trips(tmp_path):
    from bpo.config import to_yaml

    cfg = load("method=online_dpo", "T=40", "F=4", "loss=sigmoid")
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(TrainConfig, path)
    assert again == cfg
    assert again.loss == "dpo"


def test_shipped_configs_load():
    """Every YAML under configs/ is a valid config of its command: accelerate's launch configs,
    experiments (every run's config must load too), SFT and train configs."""
    from pathlib import Path

    import yaml
    from accelerate.commands.config.config_args import ClusterConfig

    from bpo.config import ExperimentConfig, SFTConfig
    from bpo.experiments import cells, train_config

    configs = sorted(Path(__file__).parent.parent.joinpath("configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        if path.parent.name == "accelerate":
            assert ClusterConfig.from_yaml_file(path).distributed_type
        elif path.parent.name == "onpolicy":
            from bpo.onpolicy.config import StudyConfig

            load_config(StudyConfig, path)
        elif "grid" in yaml.safe_load(path.read_text()):
            experiment = load_config(ExperimentConfig, path)
            assert all(train_config(experiment, cell) for cell in cells(experiment))
        else:
            load_config(SFTConfig if path.stem == "sft" else TrainConfig, path)


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without it
    with pytest.raises(ConfigError, match=r'sampling.backend: .vllm. needs the vllm package.*'
                                          r'pip install "bpo\[vllm\]"'):  # fmt: skip
        load_config(TrainConfig, overrides=["model.path=m", "method=bpo", "F=1",
                                            "sampling.backend=vllm"])  # fmt: skip
    with pytest.raises(
        ConfigError, match="sampling.max_model_len: set to 512 but sampling.backend=hf"
    ):
        load_config(TrainConfig, overrides=["model.path=m", "method=bpo", "F=1",
                                            "sampling.max_model_len=512"])  # fmt: skip
