"""policy.py: the VLM actor-critic on the tiny offline model."""
import os

import numpy as np
import pytest
import torch

import envs
from envs import action_span
from plumbing.loader import load_policy
from plumbing.tinyvlm import tiny_model
from envs.answer import thought_action_masks

ANSWER = '{"thoughts": "current 2, target 4, so I move up", "action": "+"}'


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (300, 300, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def policy(make_policy):
    torch.manual_seed(0)
    p = make_policy()
    # LoRA B starts at zero; perturb every adapter weight so the adapter actually matters.
    with torch.no_grad():
        for name, param in p.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return p


def test_generate_logprobs_match_evaluate(policy):
    """The evaluated log-probs are those of the distribution generate sampled from (same
    processor and config as policy.generate, with the scores kept)."""
    from transformers import GenerationConfig, LogitsProcessorList

    from policy import _SampleLogits
    prompts = ["Move to the target.",
               "A much longer prompt: reach the target number, answer in JSON.", "x"]
    encoded = policy.encode(images(3), prompts)
    batch = policy.collate(encoded)
    torch.manual_seed(1)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=16, eos_token_id=policy.stop_ids(),
                              pad_token_id=policy.tokenizer.pad_token_id,
                              output_scores=True, return_dict_in_generate=True)
    processor = _SampleLogits(policy.suppressed, torch.full((3, 1), 0.7))
    with torch.no_grad():
        out = policy.model.generate(**batch, generation_config=config,
                                    logits_processor=LogitsProcessorList([processor]))
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    sampled = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, new[..., None])[..., 0]
    stop = policy.stop_ids()
    responses = []
    for row in new:
        ends = [i for i, t in enumerate(row.tolist()) if t in stop]
        responses.append(row[: ends[0] + 1] if ends else row)
    with torch.no_grad():
        scored = policy(encoded, responses, temperature=0.7)
    width = scored["logprobs"].shape[1]
    for i, r in enumerate(responses):
        diff = (scored["logprobs"][i, width - len(r):] - sampled[i, : len(r)]).abs().max()
        assert diff < 1e-4


def test_generate_never_samples_vision_tokens(policy):
    encoded = policy.encode(images(4), ["go"] * 4)
    torch.manual_seed(0)
    responses, texts = policy.generate(encoded, temperature=1.5, max_new_tokens=32)
    suppressed = set(policy.suppressed.nonzero().flatten().tolist())
    assert all(not (set(r.tolist()) & suppressed) for r in responses)
    assert len(texts) == 4
    # The sampled answers can be scored again (no "image features and tokens do not match").
    with torch.no_grad():
        out = policy(encoded, responses)
    assert torch.isfinite(out["seq_logprob"]).all()


def test_image_changes_logprobs(policy):
    ids = policy.answer_ids(ANSWER)
    with torch.no_grad():
        a = policy(policy.encode(images(1, seed=0), ["prompt"]), [ids])["logprobs"]
        b = policy(policy.encode(images(1, seed=1), ["prompt"]), [ids])["logprobs"]
    assert (a - b).abs().max() > 1e-4


def test_batch_and_padding_invariance(policy):
    prompts = ["short", "a much longer prompt with many more words in it to force padding",
               "mid length one"]
    answers = [ANSWER, '{"thoughts": "no", "action": "-"}', "garbage"]
    encoded = policy.encode(images(3), prompts)
    responses = [policy.answer_ids(a) for a in answers]
    with torch.no_grad():
        together = policy(encoded, responses)
        for i in range(3):
            alone = policy([encoded[i]], [responses[i]])
            n = len(responses[i])
            assert torch.allclose(alone["logprobs"][0, -n:], together["logprobs"][i, -n:],
                                  atol=1e-5)
            assert torch.allclose(alone["value"][0], together["value"][i], atol=1e-5)
            assert torch.allclose(alone["seq_logprob"][0], together["seq_logprob"][i], atol=1e-4)


def test_sequence_logprob_weights_thoughts(policy):
    encoded = policy.encode(images(1), ["p"])
    with torch.no_grad():
        out = policy(encoded, [policy.answer_ids(ANSWER)])
    lp, th, ac = out["logprobs"][0], out["thought_mask"][0], out["action_mask"][0]
    expected = policy.thought_coef * lp[th & out["response_mask"][0]].sum() + lp[ac].sum()
    assert torch.allclose(out["seq_logprob"][0], expected, atol=1e-5)


@pytest.mark.parametrize("answer,action_text", [
    ('{"thoughts": "go up", "action": "+"}', '"action": "+"}'),                 # thoughts first
    ('{"action": "10", "thoughts": "ten is on a card"}', '"action": "10",'),     # action first
    ('{"thoughts": "I am not sure what to do"}', None),                          # no action
    ("I think\n'action' :  \"stand\"", "'action' :  \"stand\""),                 # loose format
    # a key quoted inside the thoughts is not the action (the parser skips it too)
    ('{"thoughts": "an \'action\': + would overshoot", "action": "-"}', '"action": "-"}'),
    ('{"thoughts": "say \\"action\\": \\"+\\" later", "action": "-"}', '"action": "-"}'),
])
def test_action_span(answer, action_text):
    span = action_span(answer)
    if action_text is None:
        assert span is None
    else:
        assert answer[span[0]:span[1]] == action_text


def test_mask_and_parser_agree_on_a_quoted_action_key(policy):
    """The tokens weighted as action are those of the field the parser reads, not an
    'action': written inside the thoughts."""
    from envs import parse_action
    answer = '{"thoughts": "the \'action\': + would overshoot", "action": "-"}'
    assert parse_action(answer, ["-", "+"]) == 0
    ids = policy.answer_ids(answer).tolist()
    _, action = thought_action_masks(policy.tokenizer, ids, action_span)
    action_text = policy.tokenizer.decode([i for i, a in zip(ids, action) if a],
                                          skip_special_tokens=True)
    assert action_text.strip() == '"action": "-"}'


def test_masks_follow_text_offsets(policy):
    tok = policy.tokenizer
    for answer in ['{"thoughts": "go up", "action": "+"}', '{"action": "hit", "thoughts": "low"}',
                   '{"thoughts": "nothing"}']:
        ids = policy.answer_ids(answer).tolist()
        thought, action = thought_action_masks(tok, ids, action_span)
        assert (thought ^ action).all()  # every token is exactly one of the two
        action_text = tok.decode([i for i, a in zip(ids, action) if a], skip_special_tokens=True)
        if '"action"' in answer:
            span = action_span(answer)
            assert answer[span[0]:span[1]] in action_text
        else:
            assert not action.any()


def test_action_split_across_tokens(policy):
    """Byte-level fallback splits an unseen word into many tokens: the mask still covers all of
    it."""
    answer = '{"thoughts": "q", "action": "zqxjvwk"}'
    ids = policy.answer_ids(answer).tolist()
    _, action = thought_action_masks(policy.tokenizer, ids, action_span)
    assert action.sum() >= 4
    decoded = policy.tokenizer.decode([i for i, a in zip(ids, action) if a],
                                      skip_special_tokens=True)
    assert decoded.strip().startswith('"action": "zqxjvwk"')


def test_only_lora_and_value_head_get_gradients(policy):
    encoded = policy.encode(images(2), ["a", "b"])
    responses = [policy.answer_ids(ANSWER)] * 2
    policy.zero_grad(set_to_none=True)
    out = policy(encoded, responses)
    (out["seq_logprob"].sum() + out["value"].sum()).backward()
    for name, p in policy.named_parameters():
        trainable = "lora_" in name and ".policy." in name or name.startswith("value_head")
        assert p.requires_grad == trainable, name
        if not trainable:
            assert p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in policy.named_parameters() if "lora_" in n)
    policy.zero_grad(set_to_none=True)


def test_save_load_round_trip(policy, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    policy.save(str(tmp_path))
    loaded = load_policy(tiny_model(tiny_dir), envs.action_span,
                         adapter_path=os.path.join(str(tmp_path), "policy"))
    encoded = policy.encode(images(2), ["a", "b"])
    responses = [policy.answer_ids(ANSWER)] * 2
    policy.eval()
    loaded.eval()
    with torch.no_grad():
        a, b = policy(encoded, responses), loaded(encoded, responses)
    assert torch.allclose(a["logprobs"], b["logprobs"], atol=1e-6)
    assert torch.allclose(a["value"], b["value"], atol=1e-6)
    # Anyone can load the adapter with plain peft.
    base = AutoModelForImageTextToText.from_pretrained(os.path.join(tiny_dir, "seed0-112px"))
    PeftModel.from_pretrained(base, os.path.join(str(tmp_path), "policy"))


def test_teacher_adapter_switches(policy):
    if "teacher" not in policy.model.peft_config:
        policy.add_teacher()
    encoded = policy.encode(images(1), ["p"])
    ids = [policy.answer_ids(ANSWER)]
    with torch.no_grad():
        student = policy(encoded, ids)["logprobs"]
        with policy.use_adapter("teacher"):
            teacher = policy(encoded, ids)["logprobs"]  # a fresh adapter: B = 0, the base model
        again = policy(encoded, ids)["logprobs"]
    assert (student - teacher).abs().max() > 1e-5
    assert torch.equal(student, again)
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".teacher." in n)


def test_teacher_added_in_eval_mode_has_no_dropout(make_policy):
    """A teacher added to a policy in eval mode scores deterministically (its LoRA dropout off),
    and follows the policy's mode afterwards."""
    policy = make_policy(lora_dropout=0.1)
    policy.eval()
    policy.add_teacher()
    torch.manual_seed(0)
    policy.load_adapter_state({k: torch.randn_like(v) * 0.1
                               for k, v in policy.adapter_state().items()})
    encoded, ids = policy.encode(images(2), ["p", "q"]), [policy.answer_ids(ANSWER)] * 2
    with torch.no_grad(), policy.use_adapter("teacher"):
        first, second = policy(encoded, ids)["logprobs"], policy(encoded, ids)["logprobs"]
    assert torch.equal(first, second)
    policy.train()
    assert all(m.training for n, m in policy.named_modules() if n.endswith("lora_dropout.teacher"))


def test_loading_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_policy(str(tmp_path / "missing"), envs.action_span)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    text_only = tmp_path / "text-only"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1)).save_pretrained(text_only)
    with pytest.raises(ValueError, match="not an image-text-to-text model"):
        load_policy(str(text_only), envs.action_span)
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(OSError, match="could not be loaded"):
        load_policy("nobody-here/no-such-model-xyz", envs.action_span)


def test_targets_share_the_prompt_exactly(policy):
    """A target scored as a second continuation of the prompt (its keys and values reused, the
    agent's answer masked out) gets the log-probs AND gradients of scoring it alone at T = 1,
    whatever the lengths of prompts, answers and targets; a None target adds nothing."""
    encoded = policy.encode(images(3), ["a", "a much longer prompt here", "ccc"])
    responses = [policy.answer_ids(ANSWER), policy.answer_ids('{"thoughts": "x", "action": "-"}'),
                 policy.answer_ids(ANSWER)]
    targets = [
        policy.answer_ids('{"thoughts": "current 0, target 4, so I move up", "action": "+"}'),
        None, policy.answer_ids('{"thoughts": "y", "action": "-"}')]
    lora = [p for n, p in policy.named_parameters() if "lora_" in n and p.requires_grad]

    def grads(loss):
        policy.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in lora]

    shared = policy(encoded, responses, temperature=0.2, targets=targets)
    alone = policy([encoded[0], encoded[2]], [targets[0], targets[2]], temperature=1.0)
    plain = policy(encoded, responses, temperature=0.2)
    for row, i in ((0, 0), (1, 2)):  # left-aligned targets vs right-aligned responses
        n = len(targets[i])
        assert torch.allclose(shared["target_logprobs"][i, :n], alone["logprobs"][row, -n:],
                              atol=1e-5)
        assert torch.equal(shared["target_thought_mask"][i, :n], alone["thought_mask"][row, -n:])
    assert not shared["target_mask"][1].any() and shared["target_logprobs"][1].eq(0).all()
    for key in ("logprobs", "value", "seq_logprob"):  # the agent's part is untouched by the targets
        assert torch.allclose(shared[key], plain[key], atol=1e-5)

    target_grads = grads(shared["target_logprobs"].sum())
    expected = grads(alone["logprobs"].sum())
    for a, b in zip(target_grads, expected):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in target_grads)


def test_tiny_model_loaded_by_folder_sees_its_size(make_policy, tiny_dir):
    """Loaded by path (--model tiny-vlm/seed0-112px), the tiny model still sees 112 px images (16
    image tokens), not the 84 px its processor's own rounding would make of a 300 px frame."""
    make_policy()  # builds the cache
    by_folder = load_policy(os.path.join(tiny_dir, "seed0-112px"), envs.action_span, lora_r=8,
                            lora_alpha=16)
    assert by_folder.image_size == 112
    encoded = by_folder.encode(images(1), ["p"])[0]
    image_token = by_folder.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (torch.as_tensor(encoded["input_ids"]) == image_token).sum() == 16


def test_building_the_tiny_model_is_deterministic_and_leaves_the_rng_alone(make_policy, tiny_dir,
                                                                           tmp_path):
    """A run that builds the tiny model (first use) and one that loads it from the cache start
    from the same RNG state and the same weights, so they are the same run."""
    from plumbing.tinyvlm import build_tiny_model
    make_policy()  # the session's cached build
    torch.manual_seed(123)
    build_tiny_model(str(tmp_path / "again"), seed=0, image_size=112)
    after_build = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after_build, torch.rand(4))
    cached = open(os.path.join(tiny_dir, "seed0-112px", "model.safetensors"), "rb").read()
    assert open(tmp_path / "again" / "model.safetensors", "rb").read() == cached
