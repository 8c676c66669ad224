"""The vision-language model as an actor-critic: the file that knows transformers and peft.

docs/ALGORITHM.md §2 (RL4VLM): the agent reads (image, prompt) and answers with text such as
`{"thoughts": "...", "action": "+"}`. For PPO the answer y is one action whose log-probability
weights the thought tokens by lambda (the "thought probability coefficient"):

    log pi(a | o) = lambda * sum_{t in thought} log p(y_t | o, y_<t)
                    + sum_{t in action} log p(y_t | o, y_<t)

with the logits divided by the sampling temperature, in float32. The critic (critic.py) reads the
last prompt token's hidden state: the actor's (--critic shared), a stop-gradient copy of it, or
that of the critic's own adapter (§3). SFT targets are scored by targets.py.

Adapters by name: "policy" is trained, and "critic" with --critic adapter; "teacher" (GTR-Turbo's
merged checkpoint, teacher.py) is a frozen adapter on the SAME base weights, switched in with
`use_adapter("teacher")`: one extra LoRA adapter, not a second copy of the model (§6).

Use:
    policy = load_policy(folder_or_hub_id, action_span=envs.action_span)   # plumbing/loader.py
    batch = policy.encode(images, prompts)            # list of per-sample model inputs
    ids, texts = policy.generate(batch, temperature=0.2, max_new_tokens=64)
    out = policy(batch, ids)                          # logprobs, masks, seq_logprob, value
    out = policy(batch, ids, targets=teacher_ids)     # + target_logprobs of other answers
"""

import contextlib
import os

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from transformers.modeling_layers import GradientCheckpointingLayer

from critic import ValueHead
from envs.answer import thought_action_masks
from ppo import per_token_entropy, sequence_logprob, token_logprobs
from targets import score_targets, score_targets_on_prompt_cache

# Qwen's vision placeholders: never to be sampled (see `_suppressed_ids`).
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Positions x vocabulary entries scored at once (`ActorCritic.score`): 128 MB per float32 copy,
# e.g. 55 positions of 4 answers at Qwen's 152k vocabulary.
SCORE_CHUNK_ELEMENTS = 2 ** 25


# ---- The actor-critic ------------------------------------------------------------------------
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

    def __init__(self, model, processor, action_span, thought_coef=0.5, image_size=None,
                 critic="shared", answer_opening=None):
        super().__init__()
        self.action_span = action_span          # answer text -> (start, end) of its action, or None
        self.critic = critic                    # what the value head reads: see `_value`
        self.model = model                      # peft.PeftModel with adapter "policy"
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.thought_coef = thought_coef        # lambda of docs/ALGORITHM.md §2
        self.image_size = image_size            # resize observations to this before the processor
        hidden = model.get_base_model().config.get_text_config().hidden_size
        self.value_head = ValueHead(hidden)  # critic.py
        # The first token of an answer that keeps the format (`{"` of `{"thoughts": ...`): its
        # probability at the first answer position falls before answers stop parsing.
        self.opening_id = None
        if answer_opening:
            self.opening_id = self.tokenizer(answer_opening,
                                             add_special_tokens=False)["input_ids"][0]
        if critic == "adapter":
            # The critic's own LoRA adapter on the same frozen base: its gradient never reaches
            # the policy adapter (verl's and OpenRLHF's separate critic, at one adapter's cost).
            # Its random init draws aside, so the warm start is the same whatever the critic.
            with torch.random.fork_rng(devices=[]):
                model.add_adapter("critic", model.peft_config["policy"])
            self._activate("policy")
        self.register_buffer("suppressed", self._suppressed_ids(), persistent=False)
        self._mask_cache = {}  # response token ids -> (thought_mask, action_mask)
        # transformers' layers that can recompute their activations in backward (ActorCritic.train;
        # plumbing/loader.py makes them recompute with the adapters of their forward pass).
        self._checkpoint_layers = [m for m in model.modules()
                                   if isinstance(m, GradientCheckpointingLayer)]

    def _suppressed_ids(self):
        """[vocab] bool: vision placeholders, padding that is not a stop token, unused rows.

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

    def masks(self, ids):
        """thought_action_masks of one answer's token ids (a tuple), remembered: PPO scores
        every response once per epoch."""
        if ids not in self._mask_cache:
            if len(self._mask_cache) > 65536:
                self._mask_cache.clear()
            self._mask_cache[ids] = thought_action_masks(self.tokenizer, list(ids),
                                                         self.action_span)
        return self._mask_cache[ids]

    @property
    def device(self):
        return self.value_head[0].weight.device

    # -- inputs -------------------------------------------------------------------------------
    def fitted(self, image):
        """A frame (an array or a Pillow image) as the model reads it: a Pillow image, resized to
        `image_size` where one is set."""
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        if self.image_size:
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        return image

    def encode(self, images, prompts):
        """Process (image, prompt) pairs once into per-sample model inputs, reused by every pass."""
        encoded = []
        for image, prompt in zip(images, prompts):
            image = self.fitted(image)
            messages = [{"role": "user",
                         "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
            inputs = self.processor(images=[image], text=[text], return_tensors="pt")
            encoded.append({"input_ids": inputs["input_ids"][0],            # [prompt_len]
                            "pixel_values": inputs["pixel_values"],        # [patches, patch_dim]
                            "image_grid_thw": inputs["image_grid_thw"]})   # [1, 3]
        return encoded

    def collate(self, encoded, responses=None):
        """Left-pad prompt (+ response) ids into one batch; image features are concatenated."""
        responses = responses or [torch.zeros(0, dtype=torch.long)] * len(encoded)
        sequences = [torch.cat([e["input_ids"], r.cpu()]) for e, r in zip(encoded, responses)]
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.tokenizer.pad_token_id,
                               dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, s in enumerate(sequences):
            input_ids[i, length - len(s):], attention_mask[i, length - len(s):] = s, 1
        image_token = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 # transformers 5 needs the image positions for M-RoPE whenever pixels are given.
                 "mm_token_type_ids": (input_ids == image_token).long(),
                 "pixel_values": torch.cat([e["pixel_values"] for e in encoded]),
                 "image_grid_thw": torch.cat([e["image_grid_thw"] for e in encoded])}
        dtype = self.model.get_base_model().dtype
        return {k: v.to(self.device, dtype=dtype if v.is_floating_point() else None)
                for k, v in batch.items()}

    # -- acting -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, encoded, temperature=0.2, max_new_tokens=256):
        """Sample one answer per sample in ONE batched call. `temperature`: one for all or one
        per sample; 0 means greedy. Returns (response ids, 1-D, ending at the stop token; texts)."""
        from transformers import GenerationConfig, LogitsProcessorList
        batch = self.collate(encoded)
        stop = self.stop_ids()
        temperatures = (torch.as_tensor(temperature, dtype=torch.float32)
                        .expand(len(encoded)).reshape(-1, 1))
        greedy = bool((temperatures == 0).all())
        if not greedy and (temperatures <= 0).any():
            raise ValueError("generate: temperatures must be all positive, or all 0 (greedy)")
        # Every sampling field is set here, because transformers fills each field a config leaves
        # unset from the checkpoint's generation_config.json (Qwen's Instruct checkpoints ship a
        # repetition penalty, top-k, top-p and do_sample: true); load_policy also drops those.
        # The temperature itself is applied per row by _SampleLogits, so the sampled distribution
        # is exactly softmax(logits / T) over the allowed tokens, the one PPO scores.
        sampling = {} if greedy else dict(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0)
        config = GenerationConfig(do_sample=not greedy, **sampling, repetition_penalty=1.0,
                                  no_repeat_ngram_size=0, max_new_tokens=max_new_tokens,
                                  eos_token_id=stop, pad_token_id=self.tokenizer.pad_token_id)
        processor = _SampleLogits(self.suppressed, None if greedy else temperatures)
        # Layers marked as training for gradient checkpointing (see `train`) are unmarked while
        # sampling: transformers before 5.24 drops the key-value cache of a marked layer even
        # without a gradient, which makes generating n tokens cost O(n^2) passes.
        marked = [layer for layer in self._checkpoint_layers if layer.training]
        for layer in marked:
            layer.training = False
        try:
            output = self.model.generate(**batch, generation_config=config,
                                         logits_processor=LogitsProcessorList([processor]))
        finally:
            for layer in marked:
                layer.training = True
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
    def forward(self, encoded, responses, temperature=0.2, targets=None, value=True,
                extra_temperature=None):
        """Score responses: per-token log-probs and entropy, masks, sequence log-prob and value.

        All per-token outputs are [batch, max_response_len], right-aligned like the batch (left
        padding puts every sequence's last token at the same position); `response_mask` marks
        real tokens. `temperature`: one for all or one per sample. `targets` (SFT guidance):
        one more answer per sample scored on the same prompts (targets.py). `value=False` skips
        the critic (with --critic adapter a pass of its own) where no value is used.
        `extra_temperature`: also the per-token log-probs at that temperature, from the same
        hidden states (`extra_logprobs`, without gradient; the teacher's KL scores at T = 1).
        """
        batch = self.collate(encoded, responses)
        backbone = self.model.get_base_model()
        lengths = torch.tensor([len(r) for r in responses], device=self.device)  # [batch]
        # The critic reads the last prompt token, the state before any answer token.
        last_prompt = batch["input_ids"].shape[1] - 1 - lengths  # [batch]
        rows = torch.arange(len(responses), device=self.device)
        positions = None
        reuse_prompt = targets is not None and not self._checkpointing()
        if reuse_prompt:
            # Explicit M-RoPE positions ([3, batch, seq], the model's own computation): the
            # targets continue from the last prompt token's position.
            positions, _ = backbone.model.get_rope_index(
                batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
        agent_pass = backbone.model(**batch, position_ids=positions, use_cache=reuse_prompt)
        hidden = agent_pass.last_hidden_state  # [batch, seq, hidden]

        # docs/ALGORITHM.md §2: position p predicts token p+1, so the last `width` tokens are
        # scored from the `width` positions before them, at the sampling temperature, in float32.
        width = int(lengths.max())
        temperature = torch.as_tensor(temperature, dtype=torch.float32,
                                      device=self.device).reshape(-1, 1, 1)
        logprobs, entropy = self.score(hidden[:, -width - 1:-1], batch["input_ids"][:, -width:],
                                        temperature)
        response_mask, thought_mask, action_mask = self.aligned_masks(responses, width, right=True)
        logprobs = logprobs.masked_fill(~response_mask, 0.0)  # [batch, width]
        # log pi(a|o) = lambda * sum_thought log p + sum_action log p
        seq_logprob = sequence_logprob(logprobs, thought_mask, action_mask,
                                       self.thought_coef)  # [batch]
        out = {"logprobs": logprobs, "entropy": entropy, "response_mask": response_mask,
               "thought_mask": thought_mask, "action_mask": action_mask,
               "seq_logprob": seq_logprob}
        if value:
            out["value"] = self.value(encoded, hidden[rows, last_prompt])  # [batch]
        if extra_temperature is not None:
            with torch.no_grad():
                extra = self.score(hidden[:, -width - 1:-1], batch["input_ids"][:, -width:],
                                    torch.as_tensor(float(extra_temperature)))[0]
            out["extra_logprobs"] = extra.masked_fill(~response_mask, 0.0)  # [batch, width]
        if self.opening_id is not None:
            with torch.no_grad():  # logged, never optimised
                first = self.score(hidden[rows, last_prompt][:, None], torch.full_like(
                    rows, self.opening_id)[:, None], temperature)[0]  # [batch, 1]
            out["opening_logprob"] = first[:, 0]  # [batch]
        if reuse_prompt:
            out |= score_targets_on_prompt_cache(self, targets, batch, agent_pass, positions,
                                                 last_prompt)
        elif targets is not None:
            out |= score_targets(self, encoded, targets)
        return out

    def _checkpointing(self):
        """True while layers recompute their activations in backward (gradient checkpointing
        and a gradient being built); they keep no key-value cache then."""
        return torch.is_grad_enabled() and any(
            getattr(layer, "gradient_checkpointing", False) for layer in self._checkpoint_layers)

    def train(self, mode=True):
        """nn.Module.train that keeps gradient checkpointing on in eval mode.

        transformers checkpoints a layer only while the layer's own `training` flag is set, but
        PPO runs in eval mode (no LoRA dropout). The flag is set on those layers alone: their
        dropout and attention modules stay in eval mode.
        """
        super().train(mode)
        for layer in self._checkpoint_layers:
            if layer.gradient_checkpointing:
                layer.training = True
        return self

    def score(self, hidden, ids, temperature=1.0):
        """Per-token log-probs (with gradient) and entropies (without) of the tokens `ids`
        [batch, len] predicted from `hidden` [batch, len, hidden], both [batch, len].

        Chunks of positions keep the [batch, chunk, vocab] float32 tensors (logits, their masked
        copy, the log-softmax) at about SCORE_CHUNK_ELEMENTS entries each, whatever the answer
        length and vocabulary (docs/ALGORITHM.md §6). With a gradient, each chunk runs under
        activation checkpointing: backward keeps only the chunk's hidden state and rebuilds
        its logits, instead of holding every chunk's full-vocabulary tensors at once.
        """
        chunk = max(1, SCORE_CHUNK_ELEMENTS // (hidden.shape[0] * self.suppressed.shape[0]))
        scores = []
        for start in range(0, ids.shape[1], chunk):
            inputs = (hidden[:, start:start + chunk], ids[:, start:start + chunk], temperature)
            if torch.is_grad_enabled() and hidden.requires_grad:
                scores.append(torch.utils.checkpoint.checkpoint(self._score_chunk, *inputs,
                                                                use_reentrant=False))
            else:
                scores.append(self._score_chunk(*inputs))
        logprobs, entropies = zip(*scores)
        return torch.cat(logprobs, dim=1), torch.cat(entropies, dim=1)

    def _score_chunk(self, hidden, ids, temperature):
        """`score` of one chunk: float32 logits from the hidden state, never-sampled ids at -inf.

        The output head runs in float32 (its weight cast for this chunk only): a bfloat16 head
        rounds logits near 25 by up to 0.06, an error of up to 0.3 per token at T = 0.2, summed
        over an answer's tokens, so PPO's first ratio would not be 1.
        """
        weight = self.model.get_base_model().lm_head.weight  # [vocab, hidden], frozen
        logits = nn.functional.linear(hidden.float(), weight.float())  # [batch, chunk, vocab]
        logits = logits.masked_fill(self.suppressed[: logits.shape[-1]], float("-inf"))
        with torch.no_grad():  # logged, never optimised: no graph for it
            entropy = per_token_entropy(logits / temperature)  # [batch, chunk]
        return token_logprobs(logits, ids, temperature), entropy

    def aligned_masks(self, sequences, width, right):
        """(real-token, thought, action) masks [len(sequences), width] of token sequences padded
        to `width`, right-aligned (the agent's answers) or left-aligned (SFT targets)."""
        masks = torch.zeros((3, len(sequences), width), dtype=torch.bool)
        for i, s in enumerate(sequences):
            span = slice(width - len(s), width) if right else slice(0, len(s))
            thought, action = self.masks(tuple(s.tolist()))
            masks[0, i, span], masks[1, i, span], masks[2, i, span] = True, thought, action
        return tuple(m.to(self.device) for m in masks)

    def value(self, encoded, prompt_state=None):
        """V(s) [batch] from the last prompt token's hidden state: the policy pass's own
        (`prompt_state` [batch, hidden], or a pass here) with --critic shared, the reference's
        design; the same state with its gradient stopped (detached), so the value loss cannot
        move the policy; or a pass of the prompts through the critic's own adapter (adapter)."""
        # [batch, hidden]: with left padding, position -1 is every prompt's last token
        backbone = self.model.get_base_model().model
        if self.critic == "adapter":
            with self.use_adapter("critic"):
                prompt_state = backbone(**self.collate(encoded)).last_hidden_state[:, -1]
        elif prompt_state is None:
            prompt_state = backbone(**self.collate(encoded)).last_hidden_state[:, -1]
        if self.critic == "detached":
            prompt_state = prompt_state.detach()
        normalized = self.value_head(prompt_state.float()).squeeze(-1)  # [batch]
        return self.value_head.denormalize(normalized)

    # -- adapters -----------------------------------------------------------------------------
    def _activate(self, name):
        """Make adapter `name` the one forward passes use. peft's set_adapter also freezes every
        other adapter; the trained ones (policy, critic) are unfrozen again here."""
        self.model.set_adapter(name, inference_mode=name not in ("policy", "critic"))
        for adapter in ("policy", "critic"):
            for p in self.adapter_parameters(adapter).values():
                p.requires_grad_(True)

    @contextlib.contextmanager
    def use_adapter(self, name):
        """Run forward passes / generation with another adapter: the frozen teacher, or the
        critic's own (--critic adapter), which keeps its gradient. On leaving, the adapter that
        was active on entering is active again, so passes nest (a teacher pass that reads the
        critic leaves the teacher active)."""
        found = self.model.active_adapter
        self._activate(name)
        try:
            yield self
        finally:
            self._activate(found)

    def add_teacher(self, path=None, name="teacher"):
        """A second, frozen adapter: a saved one (`path`, peft format) or, by default, one with the
        policy's LoRA config whose weights merge.py fills."""
        if path:
            self.model.load_adapter(path, adapter_name=name, is_trainable=False)
        else:
            self.model.add_adapter(name, self.model.peft_config["policy"])
        self._activate("policy")
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
        return {n.replace(marker, "."): p for n, p in self.model.named_parameters()
                if marker in n and "lora_" in n}

    def critic_parameters(self):
        """The critic's own weights: the value head, and the critic adapter (--critic adapter)."""
        return list(self.value_head.parameters()) + list(self.adapter_parameters("critic").values())

    def adapter_state(self, name="policy"):
        """A copy of one adapter's weights: the input of merge.py."""
        return {k: p.detach().clone() for k, p in self.adapter_parameters(name).items()}

    @torch.no_grad()
    def load_adapter_state(self, state, name="teacher"):
        """Copy weights (e.g. the merged teacher) into an adapter, in place."""
        params = self.adapter_parameters(name)
        if params.keys() != state.keys():
            raise ValueError(f"adapter state does not fit adapter {name!r} "
                             f"({len(params.keys() ^ state.keys())} keys differ); was it saved "
                             "from a model with the same LoRA targets and rank?")
        torch._foreach_copy_([params[k] for k in state],
                             [state[k].to(params[k].device) for k in state])

    def save(self, folder, adapters=("policy",)):
        """Adapters in peft's format (loadable by `PeftModel.from_pretrained`) + the value head."""
        os.makedirs(folder, exist_ok=True)
        self.model.save_pretrained(folder, selected_adapters=list(adapters))
        # The critic travels with the policy adapter (peft puts a named adapter in folder/<name>).
        torch.save(self.value_head.state_dict(), os.path.join(folder, "policy", "value_head.pt"))
