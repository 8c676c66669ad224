"""The vision-language model as an actor-critic: the one file that knows transformers and peft.

PAPER.md §2 (RL4VLM): the agent reads (image, prompt) and answers with text such as
`{"thoughts": "...", "action": "+"}`. For PPO the answer y is one action whose log-probability
weights the thought tokens by lambda (the "thought probability coefficient"):

    log pi(a | o) = lambda * sum_{t in thought} log p(y_t | o, y_<t) + sum_{t in action} log p(y_t | o, y_<t)

with the logits divided by the sampling temperature, in float32. The critic is an MLP on the
last-layer hidden state of the last prompt token, sharing the LoRA backbone with the actor.

Adapters by name: "policy" is trained; "teacher" (GTR-Turbo's merged checkpoint, merge.py) is a
frozen second adapter on the SAME base weights, switched in with `use_adapter("teacher")`, so
the teacher costs one extra LoRA (a few MB), not a second copy of the model (PAPER.md §6).

Use:
    policy = load_policy("tiny")                      # or a hub id / folder of Qwen2(.5)-VL
    batch = policy.encode(images, prompts)            # list of per-sample model inputs
    ids, texts = policy.generate(batch, temperature=0.2, max_new_tokens=64)
    out = policy(batch, ids)                          # logprobs, masks, seq_logprob, value
    out = policy(batch, ids, targets=teacher_ids)     # + target_logprobs of other answers, same prompts

`--model tiny` builds a small random Qwen2-VL (trained-in-process tokenizer, seeded weights),
saves it and loads it back through the same `from_pretrained` path as a real checkpoint.
"""

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from envs.common import action_span
from ppo import per_token_entropy, sequence_logprob, token_logprobs

# Qwen's special tokens; the vision ones must never be sampled (see `suppressed_ids`).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# A minimal Qwen-style chat template for the tiny model (real checkpoints ship their own).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)



@dataclass
class LoraArgs:
    r: int = 128
    """LoRA rank (PAPER.md §2: 128)"""
    alpha: int = 256
    """LoRA alpha (scaling alpha / r)"""
    dropout: float = 0.05
    """LoRA dropout"""
    vision: bool = True
    """also adapt the vision tower's linear layers (GTR-Turbo's Points24 run does)"""
    target_modules: str = ""
    """comma-separated module-name suffixes to adapt instead (default: every linear layer of the language model)"""


# ---------------------------------------------------------------------------------------------
# The tiny offline model
# ---------------------------------------------------------------------------------------------
def _tiny_corpus():
    """Text the tiny tokenizer is trained on: every environment's prompts and expert answers."""
    import gymnasium as gym
    import envs
    corpus = []
    for env_id in envs.ENV_IDS:
        env = gym.make(env_id).unwrapped
        for seed in range(40):
            env.reset(seed=seed)
            thoughts, action = env.expert()
            corpus += [env.prompt(), envs.format_answer(thoughts, env.actions[action])]
        corpus += [envs.format_answer("", a) for a in env.actions]
    return corpus


def build_tiny_model(path, seed=0, image_size=112, hidden=64, layers=2, vocab_size=1024):
    """Build a small random Qwen2-VL, its tokenizer and image processor, and save them to `path`.

    Facts from ../shared/TINY_VLM.md: the image normalisation maps white to 0 (mean 1, std 0.5),
    because with CLIP's mean/std the white background becomes a large constant that drowns the
    digits and the model never learns to look at the image. min = max pixels = image_size^2 so
    every observation gives the same number of image tokens ((image_size/28)^2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_tiny_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", padding_side="left")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=image_size * image_size, max_pixels=image_size * image_size,
        image_mean=[1.0, 1.0, 1.0], image_std=[0.5, 0.5, 0.5])
    processor = _image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                              chat_template=TINY_CHAT_TEMPLATE)

    head_dim = hidden // 4
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width).
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                              mrope_section=[head_dim // 4, head_dim // 8, head_dim // 8])),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # The weights come from their own seeded RNG, so that building the model (on first use) leaves
    # the caller's RNG as loading it from the cache does: a run is the same either way.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
        # The output head is frozen under LoRA. With the default init (std 0.02) and a normalised
        # hidden state of norm ~sqrt(hidden), every logit stays within about +-1.3, so no adapter
        # could ever make the model confident (the SFT loss stalls near 5.3 nats a token). Trained
        # checkpoints have large output norms; std 0.2 gives the tiny model room for that.
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.2)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    # Saved under the stock class name so that the folder reads like any Qwen2-VL checkpoint.
    config_file = os.path.join(path, "processor_config.json")
    with open(config_file) as f:
        saved = json.load(f)
    saved["processor_class"] = "Qwen2VLProcessor"
    with open(config_file, "w") as f:
        json.dump(saved, f, indent=2)
    return path


def _image_only_processor_class(base=None):
    """A Qwen2(.5)-VL processor without its video processor.

    transformers' video processors need torchvision, which has no CPU build on some machines;
    this project feeds images only, so the processor is rebuilt from its image processor and
    tokenizer when the full `AutoProcessor` cannot be loaded.
    """
    if base is None:
        from transformers import Qwen2VLProcessor as base

    class ImageOnlyProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyProcessor


def load_processor(path):
    """The model's processor, loaded with `from_pretrained` (image-only fallback without torchvision)."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ImportError, ValueError) as error:
        if "video" not in str(error).lower():
            raise
    with open(transformers.utils.cached_file(path, "processor_config.json")) as f:
        processor_name = json.load(f).get("processor_class", "Qwen2VLProcessor")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return _image_only_processor_class(getattr(transformers, processor_name))(
        image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tokenizer,
        chat_template=tokenizer.chat_template)


# ---------------------------------------------------------------------------------------------
# Masks: which response tokens are thought, which are action
# ---------------------------------------------------------------------------------------------
def thought_action_masks(tokenizer, ids):
    """(thought_mask, action_mask) over one response's tokens: a token is action if it overlaps the span."""
    ids = list(ids)
    prefixes = tokenizer.batch_decode([ids[: i + 1] for i in range(len(ids))],
                                      skip_special_tokens=False, clean_up_tokenization_spaces=False)
    span = action_span(prefixes[-1]) if prefixes else None  # the last prefix is the whole answer
    ends = [len(prefix) for prefix in prefixes]  # decoding prefixes works for any tokenizer
    starts = [0] + ends[:-1]
    action = [span is not None and s < span[1] and e > span[0] for s, e in zip(starts, ends)]
    action_mask = torch.tensor(action, dtype=torch.bool)
    return ~action_mask, action_mask


# ---------------------------------------------------------------------------------------------
# The actor-critic
# ---------------------------------------------------------------------------------------------
class _SampleLogits:
    """Logits processor for `generate`: divide by each row's temperature, and give -inf to tokens
    that would break the next forward pass. Per-row temperatures let one call sample at several."""

    def __init__(self, mask, temperatures=None):
        self.mask = mask                  # [vocab] bool
        self.temperatures = temperatures  # [batch, 1] or None (greedy)

    def __call__(self, input_ids, scores):
        if self.temperatures is not None:
            scores = scores / self.temperatures.to(scores.device)
        return scores.masked_fill(self.mask[: scores.shape[-1]], float("-inf"))


class ActorCritic(nn.Module):
    """A peft-wrapped VLM (actor) with an MLP value head (critic) on the last prompt token."""

    def __init__(self, model, processor, thought_coef=0.5, image_size=None):
        super().__init__()
        self.model = model                      # peft.PeftModel with adapter "policy"
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.thought_coef = thought_coef        # lambda of PAPER.md §2
        self.image_size = image_size            # resize observations to this before the processor
        hidden = model.get_base_model().config.get_text_config().hidden_size
        # PAPER.md §2: hidden -> 1024 -> 512 -> 1, kept in float32 whatever the backbone's dtype.
        self.value_head = nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Linear(1024, 512),
                                        nn.ReLU(), nn.Linear(512, 1))
        self.register_buffer("suppressed", self._suppressed_ids(), persistent=False)
        self._mask_cache = {}  # response token ids -> (thought_mask, action_mask)

    def _suppressed_ids(self):
        """[vocab] bool: vision placeholders, padding that is not a stop token, unused embedding rows.

        An untrained model happily samples <|image_pad|>; the next forward pass then fails with
        "Image features and image tokens do not match". Masking the same ids in `forward` keeps
        the sampling and the evaluated distributions on the same support.
        """
        vocab = self.model.get_base_model().get_output_embeddings().weight.shape[0]
        mask = torch.zeros(vocab, dtype=torch.bool)
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
        if self.tokenizer.pad_token_id not in self.stop_ids():
            ids.append(self.tokenizer.pad_token_id)
        mask[[i for i in ids if i is not None and 0 <= i < vocab]] = True
        mask[len(self.tokenizer):] = True
        return mask

    def stop_ids(self):
        """Token ids that end an answer, the chat turn's end (<|im_end|>) first, then any eos."""
        generation = getattr(self.model.get_base_model(), "generation_config", None)
        eos = getattr(generation, "eos_token_id", None)
        ids = [self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id]
        ids += eos if isinstance(eos, list) else [eos]
        valid = [i for i in ids if i is not None and i != self.tokenizer.unk_token_id]
        return list(dict.fromkeys(valid))

    def _masks(self, ids):
        """thought_action_masks, remembered: PPO scores every response once per epoch."""
        if ids not in self._mask_cache:
            if len(self._mask_cache) > 65536:
                self._mask_cache.clear()
            self._mask_cache[ids] = thought_action_masks(self.tokenizer, list(ids))
        return self._mask_cache[ids]

    @property
    def device(self):
        return self.value_head[0].weight.device

    # -- inputs -------------------------------------------------------------------------------
    def encode(self, images, prompts):
        """Process (image, prompt) pairs once into per-sample model inputs, reused by every pass."""
        encoded = []
        for image, prompt in zip(images, prompts):
            image = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
            if self.image_size:
                image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = self.processor(images=[image], text=[text], return_tensors="pt")
            encoded.append({"input_ids": inputs["input_ids"][0],            # [prompt_len]
                            "pixel_values": inputs["pixel_values"],        # [patches, patch_dim]
                            "image_grid_thw": inputs["image_grid_thw"]})   # [1, 3]
        return encoded

    def _collate(self, encoded, responses=None):
        """Left-pad prompt (+ response) ids into one batch; image features are concatenated."""
        responses = responses or [torch.zeros(0, dtype=torch.long)] * len(encoded)
        sequences = [torch.cat([e["input_ids"], r.cpu()]) for e, r in zip(encoded, responses)]
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, s in enumerate(sequences):
            input_ids[i, length - len(s):] = s
            attention_mask[i, length - len(s):] = 1
        image_token = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 # transformers 5 needs the image positions for M-RoPE whenever pixels are given.
                 "mm_token_type_ids": (input_ids == image_token).long(),
                 "pixel_values": torch.cat([e["pixel_values"] for e in encoded]),
                 "image_grid_thw": torch.cat([e["image_grid_thw"] for e in encoded])}
        dtype = self.model.get_base_model().dtype
        return {k: v.to(self.device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}

    # -- acting -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, encoded, temperature=0.2, max_new_tokens=256):
        """Sample one answer per sample in ONE batched call. `temperature`: one for all or one
        per sample; 0 means greedy.

        Returns (response ids: list of 1-D LongTensors ending at the stop token, texts).
        """
        from transformers import GenerationConfig, LogitsProcessorList
        batch = self._collate(encoded)
        stop = self.stop_ids()
        temperatures = torch.as_tensor(temperature, dtype=torch.float32).expand(len(encoded)).reshape(-1, 1)
        greedy = bool((temperatures == 0).all())
        if not greedy and (temperatures <= 0).any():
            raise ValueError("generate: temperatures must be all positive, or all 0 (greedy)")
        # A fresh config: checkpoints ship top_k/top_p/repetition penalties that would make the
        # sampled distribution differ from the softmax(logits / T) that PPO evaluates. The
        # temperature itself is applied per row by _SampleLogits.
        sampling = {} if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        config = GenerationConfig(**sampling, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                  pad_token_id=self.tokenizer.pad_token_id)
        processor = _SampleLogits(self.suppressed, None if greedy else temperatures)
        output = self.model.generate(**batch, generation_config=config,
                                     logits_processor=LogitsProcessorList([processor]))
        generated = output[:, batch["input_ids"].shape[1]:].cpu()  # [batch, new_tokens]
        responses = []
        for row in generated:
            ends = [i for i, t in enumerate(row.tolist()) if t in stop]
            responses.append(row[: ends[0] + 1] if ends else row)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return responses, texts

    def answer_ids(self, text):
        """Token ids of an answer written out (teacher or expert), ending with the stop token."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids + [self.stop_ids()[0]])

    # -- evaluating ---------------------------------------------------------------------------
    def forward(self, encoded, responses, temperature=0.2, targets=None):
        """Score responses: per-token log-probs and entropy, masks, sequence log-prob and value.

        All per-token outputs are [batch, max_response_len], right-aligned like the batch (left
        padding puts every sequence's last token at the same position); `response_mask` marks
        real tokens. `temperature`: one for all or one per sample.

        `targets` (SFT guidance, PAPER.md §4.2): one more answer per sample (a 1-D tensor, or
        None), scored at temperature 1 as a second continuation of the SAME prompt. The prompt
        is run once: its keys and values (kept with their gradient) are reused, and the agent's
        answer is masked out, so a target costs its own tokens, not a second copy of the ~100
        prompt tokens. Adds `target_logprobs`, `target_mask`, `target_thought_mask`, each
        [batch, max_target_len] and LEFT-aligned (the targets all start where the prompt ends).
        """
        batch = self._collate(encoded, responses)
        backbone = self.model.get_base_model()
        lengths = torch.tensor([len(r) for r in responses], device=self.device)  # [batch]
        # The critic reads the last prompt token, the state before any answer token.
        last_prompt = batch["input_ids"].shape[1] - 1 - lengths  # [batch]
        rows = torch.arange(len(responses), device=self.device)
        if targets is None:
            hidden = backbone.model(**batch).last_hidden_state  # [batch, seq, hidden]
        else:
            # Explicit M-RoPE positions ([3, batch, seq], the model's own computation), because the
            # targets continue from the last prompt token's position.
            positions, _ = backbone.model.get_rope_index(
                batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
            agent_pass = backbone.model(**batch, position_ids=positions, use_cache=True)
            hidden = agent_pass.last_hidden_state  # [batch, seq, hidden]
        width = int(lengths.max())
        # Position p predicts token p+1: the last `width` tokens are predicted from the `width`
        # positions before them.
        logits = backbone.lm_head(hidden[:, -width - 1:-1]).float()  # [batch, width, vocab]
        logits = logits.masked_fill(self.suppressed[: logits.shape[-1]], float("-inf"))
        tokens = batch["input_ids"][:, -width:]  # [batch, width]
        # One temperature for all, or one per sample.
        temperature = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).reshape(-1, 1, 1)
        logprobs = token_logprobs(logits, tokens, temperature)  # [batch, width]
        entropy = per_token_entropy(logits / temperature)  # [batch, width]
        response_mask, thought_mask, action_mask = self._aligned_masks(responses, width, right=True)
        logprobs = logprobs.masked_fill(~response_mask, 0.0)
        value = self.value_head(hidden[rows, last_prompt].float()).squeeze(-1)  # [batch]
        out = {"logprobs": logprobs, "entropy": entropy, "response_mask": response_mask,
               "thought_mask": thought_mask, "action_mask": action_mask,
               "seq_logprob": sequence_logprob(logprobs, thought_mask, action_mask, self.thought_coef),
               "value": value}
        if targets is None:
            return out

        # ---- Targets: a second continuation of each prompt, reusing its keys and values --------
        targets = [t.to(self.device) if t is not None else torch.zeros(0, dtype=torch.long, device=self.device)
                   for t in targets]
        target_width = max(1, max(len(t) for t in targets))
        target_ids = torch.full((len(targets), target_width), self.tokenizer.pad_token_id,
                                dtype=torch.long, device=self.device)  # [batch, target_width]
        for i, t in enumerate(targets):
            target_ids[i, :len(t)] = t
        target_mask, target_thought_mask, _ = self._aligned_masks(targets, target_width, right=False)
        # Keys visible to the targets: the prompt (not its padding), NOT the agent's answer, and the
        # target's own earlier tokens (the causal mask adds the order).
        seen = batch["attention_mask"].clone()  # [batch, seq]
        seen[torch.arange(seen.shape[1], device=self.device) > last_prompt[:, None]] = 0
        seen = torch.cat([seen, target_mask.long()], dim=1)  # [batch, seq + target_width]
        # Text positions: the three M-RoPE components are equal after the image, so the k-th
        # target token sits at (last prompt token's position) + 1 + k, as the agent's answer does.
        start = positions[:, rows, last_prompt]  # [3, batch]
        target_positions = start[..., None] + 1 + torch.arange(target_width, device=self.device)  # [3, batch, tw]
        continuation = backbone.model(input_ids=target_ids, attention_mask=seen, position_ids=target_positions,
                                      past_key_values=agent_pass.past_key_values, use_cache=True).last_hidden_state
        # Target token k is predicted from the last prompt token (k = 0) or from target token k-1.
        predictors = torch.cat([hidden[rows, last_prompt][:, None], continuation[:, :-1]], dim=1)  # [batch, tw, hidden]
        target_logits = backbone.lm_head(predictors).float()  # [batch, target_width, vocab]
        target_logits = target_logits.masked_fill(self.suppressed[: target_logits.shape[-1]], float("-inf"))
        out["target_logprobs"] = token_logprobs(target_logits, target_ids).masked_fill(~target_mask, 0.0)
        out["target_mask"], out["target_thought_mask"] = target_mask, target_thought_mask
        return out

    def _aligned_masks(self, sequences, width, right):
        """(real-token, thought, action) masks [len(sequences), width] of token sequences padded
        to `width`, right-aligned (the agent's answers) or left-aligned (SFT targets)."""
        masks = torch.zeros((3, len(sequences), width), dtype=torch.bool)
        for i, s in enumerate(sequences):
            n = len(s)
            span = slice(width - n, width) if right else slice(0, n)
            thought, action = self._masks(tuple(s.tolist()))
            masks[0, i, span], masks[1, i, span], masks[2, i, span] = True, thought, action
        return tuple(m.to(self.device) for m in masks)

    def value(self, encoded):
        """V(s) of observations alone (for bootstrapping truncated episodes)."""
        batch = self._collate(encoded)
        hidden = self.model.get_base_model().model(**batch).last_hidden_state  # [batch, seq, hidden]
        return self.value_head(hidden[:, -1].float()).squeeze(-1)

    # -- adapters -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def use_adapter(self, name):
        """Run forward passes / generation with another (frozen) adapter, e.g. the teacher."""
        self.model.set_adapter(name, inference_mode=True)
        try:
            yield self
        finally:
            self.model.set_adapter("policy")  # re-enables gradients of the policy adapter only

    def add_teacher(self, path=None, name="teacher"):
        """A second, frozen adapter: a saved one (`path`, peft format) or, by default, one with the
        policy's LoRA config whose weights merge.py fills."""
        if path:
            self.model.load_adapter(path, adapter_name=name, is_trainable=False)
        else:
            self.model.add_adapter(name, self.model.peft_config["policy"])
        self.model.set_adapter("policy")
        for n, p in self.model.named_parameters():
            if f".{name}." in n:
                p.requires_grad_(False)
        # New modules start in training mode: without this, a teacher added to a policy in eval
        # mode would score and answer with LoRA dropout on (noisy log-probs, and slower).
        self.train(self.training)

    def adapter_parameters(self, name):
        """{peft state-dict key: live parameter} of one adapter; keys as peft saves them
        (`...lora_A.weight`, the adapter name left out), so any adapter's state fits any other."""
        marker = f".{name}."
        return {n.replace(marker, "."): p for n, p in self.model.named_parameters() if marker in n and "lora_" in n}

    def adapter_state(self, name="policy"):
        """A copy of one adapter's weights: the input of merge.py."""
        return {k: p.detach().clone() for k, p in self.adapter_parameters(name).items()}

    @torch.no_grad()
    def load_adapter_state(self, state, name="teacher"):
        """Copy weights (e.g. the merged teacher) into an adapter, in place."""
        params = self.adapter_parameters(name)
        if params.keys() != state.keys():
            raise ValueError(f"adapter state does not fit adapter {name!r}: {len(params.keys() - state.keys())} "
                             f"missing and {len(state.keys() - params.keys())} unexpected keys; was it saved "
                             "from a model with the same LoRA targets and rank?")
        torch._foreach_copy_([params[k] for k in state], [state[k].to(params[k].device) for k in state])

    def save(self, folder, adapters=("policy",)):
        """Adapters in peft's format (loadable by `PeftModel.from_pretrained`) + the value head."""
        os.makedirs(folder, exist_ok=True)
        self.model.save_pretrained(folder, selected_adapters=list(adapters))
        # The critic travels with the policy adapter (peft puts a named adapter in folder/<name>).
        torch.save(self.value_head.state_dict(), os.path.join(folder, "policy", "value_head.pt"))


def _lora_targets(model, vision):
    """Names of the linear layers to adapt: the language model's, and optionally the vision tower's."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "lm_head" in name:
            continue
        in_vision = "visual" in name or "vision" in name
        if (in_vision and vision) or (not in_vision and "language_model" in name):
            names.append(name)
    return names


def load_policy(model="tiny", lora=LoraArgs(), device="cpu", thought_coef=0.5, image_size=None,
                cache_dir="tiny-vlm", seed=0, adapter_path=None):
    """Load (or build, for "tiny") a VLM, wrap it with a LoRA "policy" adapter and a value head.

    float32 on CPU, bfloat16 on GPU; the base is frozen. `adapter_path` resumes a saved policy.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    if model == "tiny":
        # The image processor is built for one size (min = max pixels), so it is part of the name.
        image_size = image_size or 112
        path = os.path.abspath(os.path.join(cache_dir, f"seed{seed}-{image_size}px"))
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        # Under torchrun rank 0 builds (transformers saves weights on rank 0 only), the rest wait.
        if not os.path.exists(os.path.join(path, "config.json")) and (not distributed or torch.distributed.get_rank() == 0):
            # Build aside, then rename: other processes never see a half-written folder; the
            # build is deterministic, so whichever process's rename wins is fine.
            os.makedirs(os.path.dirname(path), exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(path))
            build_tiny_model(staging, seed=seed, image_size=image_size)
            try:
                os.rename(staging, path)
            except OSError:
                shutil.rmtree(staging)
        if distributed:
            torch.distributed.barrier()
    else:
        path = model
        looks_like_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model) and not model.startswith(".")
        if not os.path.isdir(model) and not looks_like_hub_id:
            raise FileNotFoundError(f"--model {model!r}: no such folder. Pass a local folder of a "
                                    "Qwen2-VL / Qwen2.5-VL checkpoint, a hub id, or 'tiny'.")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    try:
        base = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        processor = load_processor(path)
    except ValueError as error:
        raise ValueError(f"--model {model!r} is not an image-text-to-text model that transformers "
                         f"can load ({error}). Use a Qwen2-VL or Qwen2.5-VL checkpoint.") from None
    except OSError as error:
        raise OSError(f"--model {model!r} could not be loaded: {error}\nWith no network, pass a "
                      "local folder (or set HF_HUB_OFFLINE=1 with the model in the cache), or use "
                      "--model tiny.") from None
    base.requires_grad_(False)
    if adapter_path:
        peft_model = PeftModel.from_pretrained(base, adapter_path, adapter_name="policy", is_trainable=True)
    else:
        targets = ([t.strip() for t in lora.target_modules.split(",") if t.strip()]
                   or _lora_targets(base, lora.vision))
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=targets)
        peft_model = get_peft_model(base, config, adapter_name="policy")
    size = getattr(processor.image_processor, "size", None)  # transformers 5: pixel counts as edges
    pixels = getattr(size, "shortest_edge", None)
    if image_size is None and pixels and pixels == getattr(size, "longest_edge", None):
        # A processor built for one size (the tiny model's) shrinks a 300 px frame below that size
        # by its own rounding (112 -> 84, 56 -> 28 px); resize to it ourselves (see TINY_VLM.md).
        image_size = math.isqrt(pixels)
    policy = ActorCritic(peft_model, processor, thought_coef=thought_coef, image_size=image_size)
    if adapter_path and os.path.exists(os.path.join(adapter_path, "value_head.pt")):
        policy.value_head.load_state_dict(torch.load(os.path.join(adapter_path, "value_head.pt")))
    return policy.to(device)
