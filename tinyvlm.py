"""The tiny offline VLM: a small random Qwen2-VL built in-process, for tests and CPU runs.

Nothing can be downloaded where this project's tests run, so `--model tiny` (train.py's
default) builds a Qwen2-VL of about 0.8 M parameters: a byte-level BPE tokenizer trained on the
environments' prompts and expert answers, seeded random weights, and an image processor built
for one image size. It is saved to a folder and loaded back by `policy.load_policy` through the
same `from_pretrained` path as a real checkpoint. The choices that let it learn to read the
pictures (white maps to 0, a large output-head init, the image size) are explained in
docs/TINY_MODEL.md.

Each family of environments (envs.FAMILIES: the card games, the household) gets its own tiny
model, its tokenizer trained on that family's text only: a family's prompts stay short, and
adding an environment to one family never changes another's model.

Use:
    from tinyvlm import tiny_model
    folder = tiny_model("tiny-vlm", seed=0, image_size=112)   # builds on first use, then cached
    policy = load_policy(folder)
    tiny_model("tiny-vlm", family="household")                # Household's and ALFWorld's
"""

import json
import os
import shutil
import tempfile

import gymnasium as gym
import torch

import envs
from policy import image_only_processor_class

# Qwen's special tokens, which the tiny tokenizer must know.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# A minimal Qwen-style chat template (real checkpoints ship their own).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Expert steps per deal whose prompts the tokenizer reads. A card game's prompt hardly changes in
# an episode (its state is in the picture), and its tiny model has always read the first step's
# only; a household prompt carries the last feedback and the admissible commands, which change
# at every step, so the tokenizer reads whole episodes.
CORPUS_STEPS = {"cards": 1, "household": 60}


def tiny_model(cache_dir="tiny-vlm", seed=0, image_size=112, family="cards"):
    """Folder of the tiny model for (family, seed, image size), built on first use.

    The image processor is built for one size (min = max pixels), so the size is part of the
    folder's name, and so is the family but for the card games', whose folder keeps the name it
    had before families existed (seed0-112px). Under torchrun rank 0 builds (transformers saves
    weights on rank 0 only) and the other ranks wait at a barrier.
    """
    if family not in envs.FAMILIES:
        raise ValueError(f"unknown environment family {family!r}; the families are {sorted(envs.FAMILIES)}.")
    prefix = "" if family == "cards" else f"{family}-"
    path = os.path.abspath(os.path.join(cache_dir, f"{prefix}seed{seed}-{image_size}px"))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not os.path.exists(os.path.join(path, "config.json")) and (not distributed or torch.distributed.get_rank() == 0):
        # Build aside, then rename: other processes never see a half-written folder; the build
        # is deterministic, so whichever process's rename wins is fine.
        os.makedirs(os.path.dirname(path), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(path))
        build_tiny_model(staging, seed=seed, image_size=image_size, family=family)
        try:
            os.rename(staging, path)
        except OSError:
            shutil.rmtree(staging)
    if distributed:
        torch.distributed.barrier()
    return path


def tokenizer_corpus(family="cards"):
    """Text the tiny tokenizer is trained on: the family's environments' prompts and expert answers."""
    corpus = []
    for env_id in envs.FAMILIES[family]:
        env = gym.make(env_id).unwrapped
        for seed in range(40):
            env.reset(seed=seed)
            for _ in range(CORPUS_STEPS[family]):
                thoughts, action = env.expert()
                corpus += [env.prompt(), envs.format_answer(thoughts, env.actions[action])]
                _, _, terminated, truncated, _ = env.step(action)
                if terminated or truncated:
                    break
        corpus += [envs.format_answer("", a) for a in env.actions]
    return corpus


def build_tiny_model(path, seed=0, image_size=112, hidden=64, layers=2, vocab_size=1024, family="cards"):
    """Build a small random Qwen2-VL, its tokenizer and image processor, and save them to `path`.

    The image normalisation maps white to 0 (mean 1, std 0.5): with CLIP's mean and std the
    white background becomes a large constant that drowns the digits, and the model never
    learns to look at the image (docs/TINY_MODEL.md). min = max pixels = image_size^2, so every
    observation gives the same number of image tokens, (image_size / 28)^2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_corpus(family), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=image_size * image_size, max_pixels=image_size * image_size,
        image_mean=[1.0, 1.0, 1.0], image_std=[0.5, 0.5, 0.5])
    processor = image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=CHAT_TEMPLATE)

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
