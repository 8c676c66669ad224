"""scripts/memory.py's counts against the real thing, on a small random Qwen2.5-VL on the CPU.

The activation formula is checked against the bytes autograd actually saves for backward
(`saved_tensors_hooks`, each storage counted once, weights left out, the most held at any one
time), on a bf16 model with float32 LoRA on every linear layer as on a GPU; its FLOP count
against torch's FLOP counter; its parameter counts against peft's.
"""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from plumbing.loader import _lora_targets
from ppo import per_token_entropy, token_logprobs
from scripts import memory

IMAGE, VISION_START, VISION_END = 500, 502, 503
# Two sequences of 52 tokens, the second left-padded by 3 (so the layers get a padding mask, as
# PPO's micro-batches do); an 8 x 8-patch image each (16 image tokens); 6 scored answer tokens.
MB = memory.MicroBatch(batch=2, seq_len=52, grid=(8, 8), scored=6)


def small_config(attention="sdpa"):
    """Qwen2.5-VL with every structural feature of the real ones: grouped KV heads, M-RoPE,
    windowed and full vision attention, the 2 x 2 merger; hidden sizes 64 and 32."""
    from transformers import Qwen2_5_VLConfig
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[4, 2, 2])),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                           out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        image_token_id=IMAGE, video_token_id=501, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    config._attn_implementation = attention
    config.text_config._attn_implementation = attention
    config.vision_config._attn_implementation = attention
    return config


def small_model(config, lora_dropout=0.0):
    """bf16 base, frozen, with float32 LoRA (peft's default upcast) on policy.py's targets."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    base = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).requires_grad_(False)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout,
                      target_modules=_lora_targets(base, True))
    return get_peft_model(base, lora)


def micro_batch():
    """Model inputs of MB: [pad] text <vision_start> image tokens <vision_end> text answer."""
    image_tokens = MB.grid[0] * MB.grid[1] // 4
    rows, mask = [], []
    for pad in (0, 3):
        ids = ([7] * (5 + 3 - pad) + [VISION_START] + [IMAGE] * image_tokens + [VISION_END]
               + [9] * 20 + [11] * MB.scored)
        rows.append([0] * pad + ids)
        mask.append([0] * pad + [1] * len(ids))
    input_ids = torch.tensor(rows)  # [2, 52]
    assert input_ids.shape == (MB.batch, MB.seq_len)
    patches = MB.grid[0] * MB.grid[1]
    return dict(input_ids=input_ids, attention_mask=torch.tensor(mask),
                mm_token_type_ids=(input_ids == IMAGE).int(),
                # [patches, channels x time x 14 x 14]
                pixel_values=torch.randn(MB.batch * patches, 3 * 2 * 14 * 14),
                image_grid_thw=torch.tensor([[1, *MB.grid]] * MB.batch))


class _Held:
    """A saved tensor, counted while autograd holds it (until its node's backward has run)."""

    def __init__(self, tracker, tensor):
        self.tracker, self.tensor = tracker, tensor
        self.key, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
        count = tracker.holders.get(self.key, 0)
        tracker.holders[self.key] = count + 1
        if count == 0:
            tracker.sizes[self.key] = size
            tracker.live += size
            tracker.peak = max(tracker.peak, tracker.live)

    def __del__(self):
        self.tracker.holders[self.key] -= 1
        if self.tracker.holders[self.key] == 0:
            del self.tracker.holders[self.key]
            self.tracker.live -= self.tracker.sizes.pop(self.key)


class SavedBytes:
    """saved_tensors_hooks that track the bytes saved for backward: each storage once (q, k and
    v views of one qkv output are one tensor in memory), weights and buffers left out."""

    def __init__(self, model):
        self.weights = {t.untyped_storage().data_ptr()
                        for t in [*model.parameters(), *model.buffers()]}
        self.holders, self.sizes, self.live, self.peak = {}, {}, 0, 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.weights or storage.nbytes() == 0:
            return tensor
        return _Held(self, tensor)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held


def score(model, batch):
    """PPO's pass: the backbone, then float32 log-probs of the answer tokens (policy.forward's
    scoring), summed and backpropagated."""
    backbone = model.get_base_model()
    hidden = backbone.model(**batch).last_hidden_state  # [batch, seq, hidden]
    logits = backbone.lm_head(hidden[:, -MB.scored - 1:-1]).float()  # [batch, scored, vocab]
    return token_logprobs(logits, batch["input_ids"][:, -MB.scored:], 1.0).sum()


def measured_saved_bytes(model, batch):
    tracker = SavedBytes(model)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        # The reentrant checkpoint's recomputation runs inside the backward, under these hooks.
        score(model, batch).backward()
    assert tracker.live == 0  # every saved tensor was released: nothing escaped the count
    return tracker.peak


def test_saved_bytes_match_the_formula_without_checkpointing():
    """train.py's PPO passes: eval mode, no LoRA dropout."""
    config = small_config()
    model = small_model(config).eval()
    predicted = memory.activation_bytes(config, MB, lora_r=8)["saved"]
    assert measured_saved_bytes(model, micro_batch()) == pytest.approx(predicted, rel=0.01)


def test_saved_bytes_match_the_formula_with_lora_dropout():
    """Dropout keeps a mask per LoRA input; on the CPU it is a float32 noise tensor."""
    config = small_config()
    model = small_model(config, lora_dropout=0.05).train()
    predicted = memory.activation_bytes(config, MB, lora_r=8, dropout_mask_bytes=4)["saved"]
    assert measured_saved_bytes(model, micro_batch()) == pytest.approx(predicted, rel=0.01)


def test_saved_bytes_match_the_formula_with_checkpointing():
    """transformers checkpoints layers in training mode only. The reentrant variant recomputes
    under the caller's hooks, so they see the recomputation; it needs an input that requires a
    gradient, so the patch embeddings are made to, which also makes the window reordering of
    the vision tower save its int64 index (8 bytes per merged token): added to the prediction."""
    config = small_config()
    model = small_model(config).train()
    backbone = model.get_base_model()
    backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    backbone.model.visual.patch_embed.register_forward_hook(
        lambda module, args, out: out.requires_grad_(True))
    checkpointed = memory.activation_bytes(config, MB, lora_r=8, checkpointing=True)["saved"]
    plain = memory.activation_bytes(config, MB, lora_r=8)["saved"]
    measured = measured_saved_bytes(model, micro_batch())
    assert measured == pytest.approx(checkpointed + 8 * MB.patches // 4, rel=0.01)
    assert measured < 0.5 * plain


class LiveBytes(TorchDispatchMode):
    """The most bytes of tensors created under this mode alive at once (each storage once)."""

    def __init__(self):
        super().__init__()
        self.storages, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Forget freed storages first: a new output may sit at a freed one's address.
        self.storages = {k: v for k, v in self.storages.items() if not v[0].expired()}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages.setdefault(storage.data_ptr(),
                                         (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(size for _, size in self.storages.values()))
        return out


def test_the_scoring_head_holds_head_copies_of_the_float32_logits():
    """policy.forward's scoring at this commit: float32 logits with never-sampled ids masked,
    token log-probs at the sampling temperature, and the entropy logged without a graph."""
    batch, scored, hidden, vocab = 4, 16, 32, 20000
    weight = torch.randn(vocab, hidden, dtype=torch.bfloat16)   # lm_head, frozen
    states = torch.randn(batch, scored + 1, hidden, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(vocab, (batch, scored))
    suppressed = torch.zeros(vocab, dtype=torch.bool)
    temperature = torch.full((batch, 1, 1), 0.5)
    with LiveBytes() as live:
        logits = (torch.nn.functional.linear(states[:, :-1], weight).float()
                  .masked_fill(suppressed, float("-inf")))
        logprobs = token_logprobs(logits, tokens, temperature)  # its graph holds the log-softmax
        with torch.no_grad():
            per_token_entropy(logits / temperature)
    assert logprobs.requires_grad
    # lm_head's weight shows up through its transposed view; it is not a copy of the logits.
    copies = (live.peak - weight.untyped_storage().nbytes()) / (batch * scored * vocab * 4)
    assert copies == pytest.approx(memory.HEAD_COPIES, abs=0.1)


def test_flops_match_torchs_flop_counter():
    """Eager attention (plain matmuls, every query-key pair) so that the counter sees attention;
    the count is then the non-causal one."""
    from torch.utils.flop_counter import FlopCounterMode
    config = small_config(attention="eager")
    model = small_model(config).eval()
    with FlopCounterMode(display=False) as counter:
        score(model, micro_batch()).backward()
    assert counter.get_total_flops() == pytest.approx(
        memory.ppo_flops(config, MB, lora_r=8, causal=False)["total"], rel=0.001)


def test_parameter_counts():
    config = small_config()
    model = small_model(config)
    counts = memory.parameter_counts(config, lora_r=8)
    assert counts["lora"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["model"] == sum(p.numel() for n, p in model.named_parameters()
                                  if "lora_" not in n)
    # The published totals: 3.75 B and 8.29 B parameters.
    assert memory.parameter_counts(memory.model_config("Qwen2.5-VL-3B"))["model"] == 3_754_622_976
    assert memory.parameter_counts(memory.model_config("Qwen2.5-VL-7B"))["model"] == 8_292_166_656


def test_the_script_prints_both_tables(capsys):
    # What `python -m scripts.memory` prints, in this process (transformers is imported already).
    print(memory.tables())
    out = capsys.readouterr().out
    assert "| Qwen2.5-VL-3B | Qwen2.5-VL-7B |" in out
    assert "**needed, checkpointing**" in out
    for label, _ in memory.GPUS:  # one row per GPU, a cell per model and setting
        row = next(line for line in out.splitlines() if line.startswith(f"| {label} |"))
        assert row.count("fits") + row.count("no,") == 4
