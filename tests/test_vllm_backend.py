"""The vLLM backend without vLLM: the install message, the merged weights, and our calls.

The real engine is exercised only on a GPU machine with `bpo[vllm]` installed (the last test,
`pytest -m slow`; skipped elsewhere). The other tests use a fake `vllm` module that records what
`VLLMGenerator` asks of it and answers with canned outputs: it checks our calls (prompts as token
ids, sampling settings, weight loading, cache reset), not vLLM itself.
"""

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bpo.checks import ConfigError
from bpo.config import LoraConfig, ModelConfig, SamplingConfig
from bpo.ensemble import EnsembleLoraLinear
from bpo.policy import Policy
from bpo.sequences import cut_at_eos
from bpo.tasks.digest import build_tokenizer
from bpo.tiny import build_tiny_llama
from bpo.vllm_backend import VLLMGenerator, merged_weights, require_vllm

CPU = torch.device("cpu")


def test_require_vllm_names_the_field_and_the_fix(monkeypatch):
    """Without vllm (its import made to fail even where installed) the error says what to do."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ConfigError) as e:
        require_vllm()
    message = str(e.value)
    assert "sampling.backend" in message
    assert 'pip install "bpo[vllm]"' in message
    assert "sampling.backend=hf" in message


@pytest.mark.parametrize(
    "finetune, members",
    [("full", 1), ("lora", 1), ("lora", 3)],
    ids=["full", "lora", "ensemble-3"],
)
def test_merged_weights_give_the_policy_logits_without_changing_it(tiny_model, finetune, members):
    """Loaded into a fresh base model, the merged weights reproduce the policy's logits; they
    carry exactly the names save_pretrained wrote (the tied lm_head once, as embed_tokens); the
    policy keeps its adapters and every tensor bit for bit."""
    lora = LoraConfig(r=4, alpha=8, members=members)
    policy = Policy.load(ModelConfig(tiny_model), finetune, lora, 0, CPU)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero deltas: B = 0 at init
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    trainable = [p.detach().clone() for p in policy.trainable_parameters()]

    state = dict(merged_weights(policy.model, policy.ensemble))

    assert state.keys() == load_file(Path(tiny_model, "model.safetensors")).keys()
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied to embed_tokens
    ids = torch.tensor([[1, 5, 9, 12, 7, 3], [1, 4, 4, 8, 2, 6]])
    with torch.no_grad():
        expected = policy.model(input_ids=ids).logits
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    after = policy.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    for p, saved in zip(policy.trainable_parameters(), trainable, strict=True):
        assert p.requires_grad and torch.equal(p, saved)
    if finetune == "lora" and members == 1:
        assert isinstance(policy.model, PeftModel)
    if members > 1:
        assert isinstance(
            policy.model.get_submodule("model.layers.0.mlp.up_proj"), EnsembleLoraLinear
        )


class FakeLLM:
    """Stands in for `vllm.LLM`: records the constructor arguments and every call in order."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        self.canned: list[list[int]] = []
        self.reset_ok = True
        self.model = SimpleNamespace(loaded=[])
        self.model.load_weights = lambda weights: self.model.loaded.extend(weights)

    def generate(self, prompts, sampling_params, use_tqdm):
        self.calls.append(("generate", prompts, sampling_params))
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids)]) for ids in self.canned]

    def apply_model(self, func):
        self.calls.append(("apply_model",))
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return self.reset_ok


@pytest.fixture
def fake_vllm(monkeypatch):
    """A minimal `vllm`: LLM, SamplingParams (records its keywords), TokensPrompt (a dict)."""
    module = ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kwargs: kwargs
    module.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored after the test
    return module


def make_generator(dtype: str = "float32") -> VLLMGenerator:
    return VLLMGenerator("base/model", dtype, 7, 0.4, eos_id=2, max_model_len=256)


def test_generator_builds_an_in_process_engine(fake_vllm):
    generator = make_generator("bfloat16")
    assert generator.llm.kwargs == {
        "model": "base/model",
        "dtype": "bfloat16",
        "seed": 7,
        "gpu_memory_utilization": 0.4,
        "max_model_len": 256,
        "enable_prefix_caching": True,
    }
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_generate_maps_sampling_feeds_token_ids_and_cuts_at_eos(fake_vllm):
    """Prompts go in as token ids; each request gets the config's sampling values and its own
    seed; responses are cut after the first EOS (2) exactly as the HF path cuts them."""
    generator = make_generator()
    canned = [[4, 2], [9, 2, 8, 8], [3, 3, 3]]  # ended by EOS, EOS then junk, length-capped
    generator.llm.canned = canned
    sampling = SamplingConfig(temperature=0.7, top_k=0, top_p=0.9, max_new_tokens=5)

    responses = generator.generate([[1, 5], [1, 6, 7], [1]], sampling, seed=11)

    assert responses == [[4, 2], [9, 2], [3, 3, 3]]
    assert responses == [cut_at_eos(ids, 2) for ids in canned]
    (name, prompts, params), *_ = generator.llm.calls
    assert name == "generate"
    assert prompts == [
        {"prompt_token_ids": [1, 5]},
        {"prompt_token_ids": [1, 6, 7]},
        {"prompt_token_ids": [1]},
    ]
    shared = {
        "n": 1,
        "temperature": 0.7,
        "top_k": 0,
        "top_p": 0.9,
        "max_tokens": 5,
        "ignore_eos": True,
        "stop_token_ids": [2],
        "detokenize": False,
    }
    assert params == [{**shared, "seed": 11}, {**shared, "seed": 12}, {**shared, "seed": 13}]


def test_greedy_is_temperature_zero_without_filters(fake_vllm):
    generator = make_generator()
    generator.llm.canned = [[5, 2]]
    sampling = SamplingConfig(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=3)
    generator.generate([[1, 5]], sampling, greedy=True)
    (_, _, [params]) = generator.llm.calls[0]
    assert (params["temperature"], params["top_k"], params["top_p"]) == (0.0, 0, 1.0)
    assert params["seed"] is None


def test_request_seeds_stay_within_int64(fake_vllm):
    generator = make_generator()
    generator.llm.canned = [[5, 2]] * 3
    generator.generate([[1]] * 3, SamplingConfig(), seed=2**63 - 2)
    (_, _, params) = generator.llm.calls[0]
    assert [p["seed"] for p in params] == [2**63 - 2, 2**63 - 1, 0]


def test_load_weights_reaches_the_model_then_resets_the_prefix_cache(fake_vllm):
    """Weights go to the engine's model through apply_model, cast to the engine's dtype, and
    the prefix cache is dropped afterwards."""
    generator = make_generator("bfloat16")
    weight = torch.randn(3, 4)
    generator.load_weights(iter([("model.norm.weight", weight)]))
    assert generator.llm.calls == [("apply_model",), ("reset_prefix_cache",)]
    [(name, loaded)] = generator.llm.model.loaded
    assert name == "model.norm.weight" and loaded.dtype == torch.bfloat16
    assert torch.equal(loaded, weight.to(torch.bfloat16))


def test_load_weights_fails_if_the_prefix_cache_stays(fake_vllm):
    generator = make_generator()
    generator.llm.reset_ok = False
    with pytest.raises(RuntimeError, match="prefix cache"):
        generator.load_weights([])


def test_several_processes_are_refused(fake_vllm, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="sampling.backend.*2 processes"):
        make_generator()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
    reason="the real engine needs vllm and a CUDA GPU",
)
def test_real_engine_samples_the_pushed_policy(tmp_path):
    """On a GPU with vllm: after a weight push, every token of vLLM's greedy responses is the
    policy's own argmax under teacher forcing (up to bf16 near-ties), and responses end at EOS."""
    model = build_tiny_llama(build_tokenizer(), tmp_path / "m", hidden_size=64, num_heads=2)
    cuda = torch.device("cuda")
    lora = LoraConfig(r=4, alpha=8, members=3)
    policy = Policy.load(ModelConfig(str(model), dtype="bfloat16"), "lora", lora, 0, cuda)
    torch.manual_seed(0)
    with torch.no_grad():  # far enough from the base model that its greedy responses change
        for p in policy.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    generator = VLLMGenerator(str(model), "bfloat16", 0, 0.3, policy.eos_id)
    generator.load_weights(merged_weights(policy.model, policy.ensemble))
    prompts = policy.encode_prompts(["job job boss tl;dr:", "cat tl;dr:", "boss boss tl;dr:"])

    responses = generator.generate(prompts, SamplingConfig(max_new_tokens=8), greedy=True)

    for prompt, response in zip(prompts, responses):
        assert 1 <= len(response) <= 8 and policy.eos_id not in response[:-1]
        ids = torch.tensor([prompt + response], device=cuda)
        with torch.no_grad():
            logits = policy.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # (R, V)
        chosen = logits.gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
        assert (logits.max(-1).values - chosen).max() < 0.1


def test_train_samples_through_the_engine_with_the_behavior_weights(train_config, monkeypatch):
    """`bpo train` with sampling.backend=vllm, the engine faked by a transformers model that
    samples exactly as the hf backend does: the engine gets π_θ at the start, at every annotation
    phase and before every evaluation (each version of it once), and the run repeats the hf run
    pair for pair."""
    import bpo.checks
    import bpo.vllm_backend
    from bpo.online import train
    from bpo.pool import PreferencePool

    pushes = []

    class FakeEngine:
        def __init__(self, model_path, dtype, seed, utilization, eos_id, max_model_len):
            self.policy = Policy.load(ModelConfig(model_path), "full", LoraConfig(), 0, CPU)

        def load_weights(self, weights):
            state = dict(weights)
            self.policy.model.load_state_dict(state, strict=False)
            pushes.append(state)

        def generate(self, prompt_ids, sampling, greedy=False, seed=None):
            return self.policy.sample(prompt_ids, sampling, seed, greedy)

    monkeypatch.setattr(bpo.vllm_backend, "VLLMGenerator", FakeEngine)
    monkeypatch.setattr(bpo.checks, "validate_device", lambda cfg: None)
    monkeypatch.setattr(bpo.vllm_backend, "require_vllm", lambda: None)
    common = ["finetune=full", "method=online_dpo", "F=2", "eval.every=2"]  # T = 4, B = 4
    hf = train_config("hf", *common)
    engine = train_config("vllm", *common, "sampling.backend=vllm")
    train(hf, progress=False)
    train(engine, progress=False)
    # each version of π_θ once: θ_0 (start, eval 0, phase 0), θ_2 (eval 2, phase 2), θ_4 (eval 4)
    assert len(pushes) == 3
    pools = [PreferencePool.read(f"{cfg.output_dir}/pool.jsonl") for cfg in (hf, engine)]
    assert [(p.chosen, p.rejected) for p in pools[0]] == [(p.chosen, p.rejected) for p in pools[1]]
    final = load_file(f"{engine.output_dir}/policy/model.safetensors")
    for name, tensor in pushes[-1].items():
        torch.testing.assert_close(tensor, final[name], msg=name)
