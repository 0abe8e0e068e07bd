"""The policy: pinned sampling settings, teacher-forced log-probs, save and load."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from bpo.config import LoraConfig, ModelConfig, SamplingConfig
from bpo.policy import Policy, generation_config
from bpo.sequences import left_pad

CPU = torch.device("cpu")


@pytest.fixture
def policy(tiny_model):
    return Policy.load(ModelConfig(tiny_model), "lora", LoraConfig(r=4, alpha=8), 0, CPU)


def test_collection_samples_from_the_raw_distribution(tiny_model, tmp_path):
    """A checkpoint whose generation_config asks for top-k 5 and temperature 0.5 must not leak
    into collection: at temperature 1 with no filters the sampling scores are the raw logits."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    lm.generation_config = GenerationConfig(do_sample=True, top_k=5, temperature=0.5, top_p=0.5)
    lm.save_pretrained(tmp_path / "m")
    policy = Policy.load(ModelConfig(tiny_model), "full", LoraConfig(), 0, CPU)
    policy.model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids, mask = left_pad(policy.encode_prompts(["job job boss tl;dr:", "cat tl;dr:"]), 0, CPU)
    config = generation_config(SamplingConfig(max_new_tokens=4), False, policy.tokenizer)
    out = policy.model.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=config,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    for scores, logits in zip(out.scores, out.logits):
        torch.testing.assert_close(scores, logits)


def test_logps_equal_an_unpadded_forward(policy):
    """Batched, padded log-probs equal a one-sequence forward summing response-token log-probs."""
    prompts = policy.encode_prompts(["job job boss boss boss tl;dr:", "cat cat tl;dr:"])
    responses = [[20, 30, 2], [40, 2, 5, 6, 7]]
    batched = policy.logps(prompts, responses)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        logits = policy.model(input_ids=ids).logits[0, :-1].log_softmax(-1)  # (L-1, V)
        token_logps = logits.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(p) - 1 :]
        assert batched[i].item() == pytest.approx(token_logps.sum().item(), abs=1e-5)


def test_generate_cuts_at_eos_and_respects_max_new_tokens(policy):
    """Responses end at their first EOS (what generate pads after it is dropped)."""
    torch.manual_seed(0)
    prompts = policy.encode_prompts(["job job tl;dr:"] * 64)
    responses = policy.generate(prompts, SamplingConfig(max_new_tokens=5))
    assert len(responses) == 64
    for r in responses:
        assert 1 <= len(r) <= 5
        assert policy.eos_id not in r[:-1]
    assert any(r[-1] == policy.eos_id and len(r) < 5 for r in responses)


def test_lora_save_and_load_round_trip(policy, tiny_model, tmp_path):
    for p in policy.trainable_parameters():  # move off the B = 0 initialisation
        p.data.add_(0.05 * torch.randn_like(p))
    prompts = policy.encode_prompts(["job job boss tl;dr:"])
    expected = policy.logps(prompts, [[20, 21, 2]])
    policy.save(tmp_path / "adapter")
    again = Policy.load(
        ModelConfig(tiny_model), "lora", LoraConfig(), 1, CPU, adapter_path=tmp_path / "adapter"
    )
    torch.testing.assert_close(again.logps(prompts, [[20, 21, 2]]), expected)
    assert all(p.requires_grad for p in again.trainable_parameters())
    assert again.trainable_parameters()


def test_a_missing_model_path_names_the_field(tmp_path):
    from bpo.config import ConfigError, LoraConfig, ModelConfig
    from bpo.policy import Policy

    with pytest.raises(
        ConfigError, match=r"^model.path: no folder at .*nowhere; give a folder written by save_pre"
    ):
        Policy.load(
            ModelConfig(str(tmp_path / "nowhere")), "full", LoraConfig(), 0, torch.device("cpu")
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^model.path: could not load .*empty.*save_pretrained"):
        Policy.load(
            ModelConfig(str(tmp_path / "empty")), "full", LoraConfig(), 0, torch.device("cpu")
        )


def test_a_tokenizer_without_pad_token_is_refused(tiny_model, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from bpo.config import ConfigError, LoraConfig, ModelConfig
    from bpo.policy import Policy

    shutil.copytree(tiny_model, tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(
        ConfigError, match=r"model.path: the tokenizer of .* has no pad token; set one"
    ):
        Policy.load(ModelConfig(str(tmp_path / "m")), "full", LoraConfig(), 0, torch.device("cpu"))


def test_prompts_longer_than_the_model_reads_are_refused(tmp_path):
    from bpo.config import ConfigError, TrainConfig, load_config
    from bpo.online import train
    from bpo.tasks.digest import build_tokenizer
    from bpo.tiny import build_tiny_llama

    short = build_tiny_llama(
        build_tokenizer(), tmp_path / "m", hidden_size=16, num_heads=2, max_position_embeddings=24
    )
    overrides = [f"output_dir={tmp_path / 'run'}", f"model.path={short}", "method=on_policy_bpo",
                 "T=1", "B=2", "device=cpu", "task.n_sft=0", "task.n_align=8",
                 "task.n_eval=4"]  # fmt: skip
    expected = (
        r"^task.max_prompt_tokens: the longest of the alignment prompts is \d+ tokens, and 16 "
        r"more must fit in the model's 24; set task.max_prompt_tokens=8"
    )
    with pytest.raises(ConfigError, match=expected):
        train(load_config(TrainConfig, overrides=overrides), progress=False)
    with pytest.raises(
        ConfigError,
        match=r"^sampling.max_new_tokens: 30 new tokens do not fit in the model's 24 positions",
    ):
        train(load_config(TrainConfig, overrides=[*overrides, "output_dir=" + str(tmp_path / "r2"),
                                                  "sampling.max_new_tokens=30"]),
              progress=False)  # fmt: skip
