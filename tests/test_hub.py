"""Real checkpoints at small size: a tiny random Qwen2.5-VL laid out as a hub checkpoint.

Hub checkpoints differ from what transformers 5 saves (preprocessor_config.json,
chat_template.json, Qwen's sampling defaults in generation_config.json) and real models run in
bfloat16 with a 152k vocabulary; these tests check that loading, on-policy sampling, scoring
precision and memory hold up there (docs/ALGORITHM.md §2, §6). train.py's guided smoke runs
(tests/test_train.py) train on it.
"""
import json
import math
import os
import shutil

import gymnasium as gym
import pytest
import torch

import envs
from plumbing.loader import check_adapter_base, load_policy
from plumbing.tinyvlm import tiny_model


@pytest.fixture(scope="session")
def hub_dir(tiny_dir):
    """The tiny Qwen2.5-VL, in the cache folder train.py's --model tiny-qwen2.5-vl uses."""
    return tiny_model(tiny_dir, architecture="qwen2_5_vl")


def perturbed(policy):
    """LoRA B starts at zero; a random adapter makes the policy differ from the base."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return policy.eval()


def observations(policy, n, env_ids=("gtr/NumberLine-v0",)):
    encoded = []
    for i in range(n):
        env = gym.make(env_ids[i % len(env_ids)])
        image, _ = env.reset(seed=i)
        encoded += policy.encode([image], [env.unwrapped.prompt()])
    return encoded


def test_hub_layout_loads_with_its_system_turn_and_window_attention(hub_dir):
    files = set(os.listdir(hub_dir))
    assert {"preprocessor_config.json", "chat_template.json", "generation_config.json"} <= files
    assert "processor_config.json" not in files  # what made the image-only fallback fail before
    config = json.load(open(os.path.join(hub_dir, "config.json")))
    assert config["model_type"] == "qwen2_5_vl"
    vision = config["vision_config"]
    # Window attention is real at 112 px: 4 windows of 56 px, blocks 1 and 3 see the whole image.
    assert vision["window_size"] < 112 and vision["fullatt_block_indexes"] == [1, 3]
    policy = load_policy(hub_dir, envs.action_span, lora_r=8, lora_alpha=16)
    prompt = policy.tokenizer.decode(observations(policy, 1)[0]["input_ids"])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    # The checkpoint's sampling defaults are gone; its stop ids stay.
    generation = policy.model.get_base_model().generation_config
    assert generation.repetition_penalty in (None, 1.0) and generation.top_k in (None, 50)
    assert policy.stop_ids()[0] == policy.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_loading_errors_name_their_real_cause(hub_dir, tmp_path):
    """A local folder that lacks a file is reported as incomplete, not as a network problem."""
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(hub_dir, broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(broken / name)
    with pytest.raises((OSError, ValueError)) as error:
        load_policy(str(broken), envs.action_span, lora_r=8, lora_alpha=16)
    assert "network" not in str(error.value) and "tokenizer" in str(error.value)


def test_an_adapter_of_another_tiny_model_is_refused(tmp_path):
    """An adapter saved on the seed-1 household model, loaded on the seed-0 one, would answer
    nonsense without an error: the check names the flags to give instead."""
    adapter = tmp_path / "policy"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/elsewhere/tiny-vlm/household-seed1-112px"}))
    check_adapter_base(str(adapter), "/here/tiny-vlm/household-seed1-112px")
    with pytest.raises(ValueError, match="household-seed1-112px.*--seed"):
        check_adapter_base(str(adapter), "/here/tiny-vlm/household-seed0-112px")


def test_sampling_ignores_the_checkpoint_generation_config(hub_dir, tmp_path):
    """Whatever generation_config.json says, sampling at T draws from softmax(logits / T) and
    greedy is greedy. The folder here ships top_k 1 and a repetition penalty of 50: either
    would show as an argmax drawn far too often, or prompt tokens almost never drawn."""
    folder = tmp_path / "odd-sampling"
    shutil.copytree(hub_dir, folder)
    config = json.load(open(folder / "generation_config.json"))
    config |= {"do_sample": True, "top_k": 1, "top_p": 0.5, "repetition_penalty": 50.0,
               "temperature": 5.0}
    json.dump(config, open(folder / "generation_config.json", "w"))
    torch.manual_seed(0)  # LoRA A's initialisation: the same policy whatever ran before
    policy = perturbed(load_policy(str(folder), envs.action_span, lora_r=8, lora_alpha=16))
    prompt = observations(policy, 1)
    allowed = [v for v in range(len(policy.tokenizer)) if not policy.suppressed[v]]
    # p(first answer token) of every allowed token, as PPO's scoring computes it
    with torch.no_grad():
        last = policy.model.get_base_model().model(
            **policy.collate(prompt)).last_hidden_state[:, -1:]  # [1, 1, h]
        logprobs, _ = policy.score(last.expand(1, len(allowed), -1),
                                    torch.tensor([allowed]))  # [1, allowed]
    p = dict(zip(allowed, logprobs[0].exp().tolist()))
    assert sum(p.values()) == pytest.approx(1.0, abs=1e-4)

    greedy, _ = policy.generate(prompt * 4, temperature=0, max_new_tokens=1)
    # The most likely token (up to rounding between batch shapes: a near-tie may flip); sampling at
    # the checkpoint's temperature 5 would pick unlikely ones.
    assert len({int(g[0]) for g in greedy}) == 1 and p[int(greedy[0][0])] >= max(p.values()) - 1e-3

    torch.manual_seed(1)
    n = 512
    sampled, _ = policy.generate(prompt * n, temperature=1.0, max_new_tokens=1)
    first = [int(s[0]) for s in sampled]
    in_prompt = set(prompt[0]["input_ids"].tolist())
    for name, chosen in [("argmax", {max(p, key=p.get)}), ("prompt tokens", in_prompt)]:
        expected = sum(p.get(v, 0.0) for v in chosen)
        observed = sum(v in chosen for v in first) / n
        standard_error = math.sqrt(expected * (1 - expected) / n)
        assert abs(observed - expected) < 4.5 * standard_error + 1e-3, (name, observed, expected)
    # The check has power: prompt tokens drawn almost never (a repetition penalty of 50) would
    # fall outside its tolerance.
    prompt_mass = sum(p.get(v, 0.0) for v in in_prompt)
    assert prompt_mass > 5 * math.sqrt(prompt_mass * (1 - prompt_mass) / n) + 2e-3, prompt_mass


def test_bf16_scoring_keeps_the_first_ratio_near_one(tiny_dir):
    """Rollout log-probs (batches of 8) and PPO's (shuffled micro-batches of 4, so other padding)
    of the same answers agree in bfloat16 at T = 0.2, because the logits come from the hidden
    state in float32. Measured on these 32 answers of up to 64 tokens from a random adapter:
    max |log-ratio| 0.042, mean 0.0049 on one CPU, 0.045 and 0.0078 on another (bfloat16 kernels
    differ between CPUs); with a bfloat16 output head 0.076 and 0.0109. What is left is the
    bfloat16 backbone, whose rounding depends on the batch's shapes. The bounds are the clip range
    (0.1) for the largest and a tenth of it for the mean."""
    torch.manual_seed(0)
    policy = perturbed(load_policy(tiny_model(tiny_dir), envs.action_span, lora_r=8, lora_alpha=16,
                                   lora_dropout=0.0, dtype=torch.bfloat16))
    encoded = observations(policy, 32, envs.ENV_IDS)
    torch.manual_seed(0)
    with torch.no_grad():
        responses, _ = policy.generate(encoded, temperature=0.2, max_new_tokens=64)

        def seq_logprobs(groups):
            scored = torch.zeros(32)
            for idx in groups:
                scored[idx] = policy([encoded[i] for i in idx], [responses[i] for i in idx],
                                     0.2)["seq_logprob"].float()
            return scored

        order = torch.randperm(32, generator=torch.Generator().manual_seed(0)).tolist()
        gap = (seq_logprobs([order[i:i + 4] for i in range(0, 32, 4)])
               - seq_logprobs([list(range(i, i + 8)) for i in range(0, 32, 8)])).abs()
    assert gap.max().item() < 0.1 and gap.mean().item() < 0.01, (
        gap.max().item(), gap.mean().item())


def test_scoring_keeps_no_full_vocabulary_tensor_for_backward(make_policy, monkeypatch):
    """Chunked, checkpointed scoring: what backward keeps is the hidden state, not
    [batch, len, vocab] float32 copies; log-probs and gradients are those of one big chunk."""
    import policy as policy_module
    policy = perturbed(make_policy())
    vocab = policy.suppressed.shape[0]
    hidden = torch.randn(2, 300, policy.model.get_base_model().config.get_text_config().hidden_size)
    ids = torch.randint(0, 200, (2, 300))
    results = {}
    for elements in (10 ** 9, 2 * 50 * vocab):  # one chunk; chunks of 50 positions
        monkeypatch.setattr(policy_module, "SCORE_CHUNK_ELEMENTS", elements)
        leaf = hidden.clone().requires_grad_(True)
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.setdefault(t.untyped_storage().data_ptr(),
                                           t.untyped_storage().nbytes()) and t,
                lambda t: t):
            logprobs, entropy = policy.score(leaf, ids, 0.5)
        logprobs.sum().backward()
        results[elements] = (logprobs.detach(), leaf.grad, sum(saved.values()))
        assert not entropy.requires_grad
    (whole, whole_grad, _), (chunked, chunked_grad, chunked_bytes) = results.values()
    assert (torch.allclose(whole, chunked, atol=1e-5)
            and torch.allclose(whole_grad, chunked_grad, atol=1e-6))
    one_vocabulary_copy = 2 * 300 * vocab * 4
    assert chunked_bytes < 0.25 * one_vocabulary_copy


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_with_less_memory(hub_dir):
    """In eval mode (as PPO runs), with SFT targets (scored in a second pass when layers keep no
    cache): same log-probs, same gradients, fewer bytes kept for backward."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = perturbed(load_policy(hub_dir, envs.action_span, lora_r=8, lora_alpha=16,
                                       lora_dropout=0.0, gradient_checkpointing=checkpointing))
        encoded = observations(policy, 4)
        torch.manual_seed(1)
        responses, _ = policy.generate(encoded, temperature=1.0, max_new_tokens=12)
        targets = [policy.answer_ids(envs.format_answer("current 2, target 4", "+")), None,
                   policy.answer_ids(envs.format_answer("x", "-")), policy.answer_ids("{}")]
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.setdefault(t.untyped_storage().data_ptr(),
                                           t.untyped_storage().nbytes()) and t,
                lambda t: t):
            out = policy(encoded, responses, 1.0, targets=targets)
        (out["seq_logprob"].sum() + out["target_logprobs"].sum() + out["value"].sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in policy.model.parameters()
                           if p.grad is not None])
        results.append((out, grads, sum(saved.values())))
    (plain, plain_grads, plain_bytes), (recomputed, recomputed_grads, recomputed_bytes) = results
    for key in ("seq_logprob", "target_logprobs", "value", "target_mask"):
        assert torch.allclose(plain[key].float(), recomputed[key].float(), atol=1e-5), key
    assert torch.allclose(plain_grads, recomputed_grads, atol=1e-4)
    assert recomputed_bytes < 0.5 * plain_bytes


def test_sampling_keeps_the_key_value_cache_under_gradient_checkpointing(hub_dir):
    """Layers marked as training for gradient checkpointing are unmarked while sampling: marked,
    transformers before 5.24 drops their cache, and each new token reruns the whole prefix. Every
    decoder layer sees one token at a time after the prompt, and is marked again afterwards."""
    policy = load_policy(hub_dir, envs.action_span, lora_r=8, lora_alpha=16,
                         gradient_checkpointing=True)
    policy.eval()
    layers = policy._checkpoint_layers
    assert layers and all(layer.training for layer in layers)
    seen = []  # (marked as training?, positions) per call of the last decoder layer

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # [batch, positions, hidden]
        seen.append((module.training, hidden.shape[1]))

    hook = layers[-1].register_forward_pre_hook(record, with_kwargs=True)
    try:
        policy.generate(observations(policy, 2), temperature=1.0, max_new_tokens=6)
    finally:
        hook.remove()
    assert len(seen) >= 2 and not any(training for training, _ in seen)
    assert all(length == 1 for _, length in seen[1:])  # the cache holds the prefix
    assert all(layer.training for layer in layers)


def test_qwen3_vl_loads_samples_and_scores_targets_like_answers(tiny_dir):
    """transformers 5 has Qwen3-VL (16 px patches, DeepStack, interleaved M-RoPE): the same code
    loads it as a hub checkpoint, samples from it and scores SFT targets on the shared prompt
    exactly as it scores the same text given as the agent's answer."""
    torch.manual_seed(0)
    policy = perturbed(load_policy(tiny_model(tiny_dir, architecture="qwen3_vl"), envs.action_span,
                                   lora_r=8, lora_alpha=16))
    assert (policy.model.get_base_model().config.model_type == "qwen3_vl"
            and policy.image_size == 128)
    encoded = observations(policy, 2)
    target = policy.answer_ids(envs.format_answer("current 2, target 4", "+"))
    with torch.no_grad():
        responses, texts = policy.generate(encoded, temperature=1.0, max_new_tokens=8)
        as_targets = policy(encoded, responses, 1.0,
                            targets=[target, target])["target_logprobs"].sum(1)
        as_answers = policy(encoded, [target, target], 1.0)["logprobs"].sum(1)
    assert len(texts) == 2 and torch.allclose(as_targets, as_answers, atol=1e-4)


@pytest.mark.parametrize("architecture", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_every_adapter_gets_its_exact_gradient_under_gradient_checkpointing(tiny_dir, architecture):
    """--critic adapter runs the critic's pass with its own adapter inside the policy's forward,
    and backward replays checkpointed layers: each must be replayed with the adapter of its own
    forward pass. Policy adapter moved away from zero, critic adapter offset from it: both
    adapters' gradients equal the unchecked ones, the vision tower's included."""
    folder = tiny_model(tiny_dir, architecture=architecture)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = perturbed(load_policy(folder, envs.action_span, lora_r=8, lora_alpha=16,
                                       lora_dropout=0.0, critic="adapter",
                                       gradient_checkpointing=checkpointing))
        with torch.no_grad():
            for param in policy.adapter_parameters("critic").values():
                param.add_(0.05 * torch.randn_like(param))  # the critic has drifted
        encoded = observations(policy, 3)
        responses = [policy.answer_ids(envs.format_answer("current 2, target 4", "+"))] * 3
        out = policy(encoded, responses, 1.0)
        loss = out["seq_logprob"].sum() + out["value"].sum()
        # A first gradient with the graph kept (train.py's diagnostics): layers recompute twice.
        torch.autograd.grad(loss, list(policy.adapter_parameters("critic").values()),
                            retain_graph=True)
        loss.backward()
        grads.append({name: torch.cat([p.grad.flatten() for p in
                                       policy.adapter_parameters(name).values()])
                      for name in ("policy", "critic")})
        assert any(".visual." in n and p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in policy.model.named_parameters() if ".critic." in n)
    exact, checkpointed = grads
    for name in ("policy", "critic"):
        difference = (checkpointed[name] - exact[name]).norm() / exact[name].norm()
        assert difference < 1e-4, (name, difference.item())


def test_use_adapter_puts_back_the_adapter_it_found(make_policy):
    """A pass nested in a teacher pass (the critic's own, inside forward) leaves the teacher
    active; leaving the outer block makes the policy active again."""
    policy = make_policy(critic="adapter")
    policy.add_teacher()
    with policy.use_adapter("teacher"):
        with policy.use_adapter("critic"):
            assert policy.model.active_adapter == "critic"
        assert policy.model.active_adapter == "teacher"
        policy(observations(policy, 1), [policy.answer_ids("{}")], 1.0)  # reads the critic
        assert policy.model.active_adapter == "teacher"
    assert policy.model.active_adapter == "policy"
