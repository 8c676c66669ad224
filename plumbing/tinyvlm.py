"""The tiny offline VLM: a small random Qwen2-VL built in-process, for tests and CPU runs.

With nothing to download, `--model tiny` (train.py's default) builds a Qwen2-VL of about 0.8 M
parameters: a byte-level BPE tokenizer trained on the environments' prompts and expert answers,
seeded random weights, and an image processor built for one image size. It is saved to a folder
and loaded back by `loader.load_policy` through the same `from_pretrained` path as a real
checkpoint. The choices that let it learn to read the pictures (white maps to 0, a large output-
head init, the image size) are explained in docs/TINY_MODEL.md.

Each family of environments (envs.FAMILIES: the card games, the household) gets its own tiny
model, its tokenizer trained on that family's text only: a family's prompts stay short, and
adding an environment to one family never changes another's model.

Use:
    import envs
    from plumbing.loader import load_policy
    from plumbing.tinyvlm import tiny_model
    folder = tiny_model("tiny-vlm", seed=0, image_size=112)   # builds on first use, then cached
    policy = load_policy(folder, envs.action_span)
    tiny_model("tiny-vlm", family="household")                # Household's and ALFWorld's
"""

import hashlib
import json
import os
import shutil
import tempfile

import gymnasium as gym
import torch

import envs
from plumbing.loader import check_adapter_base, image_only_processor_class, load_policy

# Qwen's special tokens, which the tiny tokenizer must know.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# train.py's --model names of the tiny models, and their architectures.
TINY_MODELS = {"tiny": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-qwen3-vl": "qwen3_vl"}
# --model names of the paper's model sizes with random weights (`model_config` below), and
# their names in scripts/memory.py: speed and memory on a GPU with nothing to download
# (scripts/bench.py).
RANDOM_MODELS = {"random-qwen2.5-vl-3b": "Qwen2.5-VL-3B", "random-qwen2.5-vl-7b": "Qwen2.5-VL-7B"}

# A minimal Qwen-style chat template (real checkpoints ship their own).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Qwen's own template, as the Instruct checkpoints ship it (videos and vision ids left out): a
# default system turn when the conversation has none.
SYSTEM_PROMPT = "You are a helpful assistant."
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    + SYSTEM_PROMPT + "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Sampling fields of Qwen2(.5)-VL-Instruct's generation_config.json (eos and pad ids aside).
QWEN_SAMPLING_DEFAULTS = dict(do_sample=True, repetition_penalty=1.05, temperature=0.1, top_k=1,
                              top_p=0.001)

# Expert steps per deal whose prompts the tokenizer reads. A card game's prompt hardly changes in
# an episode (its state is in the picture), and its tiny model has always read the first step's
# only; a household prompt carries the last feedback and the admissible commands, which change
# at every step, so the tokenizer reads whole episodes.
CORPUS_STEPS = {"cards": 1, "household": 60}

# SFT steps of a tiny model's warm start (config.resolve_warmup), per family. A household answer
# copies a command out of the prompt's list, a lookup the 2-layer model learns slowly: 200 steps
# win no evaluation episode, 800 win about one in six (docs/RESULTS.md, "Household").
WARM_START_STEPS = {"cards": 200, "household": 800}
WARM_START_MAX_STEPS = 1000  # the auto warm start's cap where it stops at a held-out loss


def tiny_model(cache_dir="tiny-vlm", seed=0, image_size=112, family="cards",
               architecture="qwen2_vl"):
    """Folder of the tiny model for (environment family, architecture, seed, image size), built
    on first use.

    The image processor is built for one size (min = max pixels), so the size is part of the
    folder's name, and so is the family but for the card games', whose folder keeps the name it
    had before families existed (seed0-112px). Under torchrun rank 0 builds (transformers saves
    weights on rank 0 only) and the other ranks wait at a barrier.
    """
    if family not in envs.FAMILIES:
        raise ValueError(f"unknown environment family {family!r}; the families are "
                         f"{sorted(envs.FAMILIES)}.")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"tiny model architecture {architecture!r}: expected one of "
                         f"{ARCHITECTURES}")
    prefix = "" if family == "cards" else f"{family}-"
    name = (f"{prefix}seed{seed}-{image_size}px"
            + ("" if architecture == "qwen2_vl" else f"-{architecture}"))
    path = os.path.abspath(os.path.join(cache_dir, name))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if (not os.path.exists(os.path.join(path, "config.json"))
            and (not distributed or torch.distributed.get_rank() == 0)):
        # Build aside, then rename: other processes never see a half-written folder; the build
        # is deterministic, so whichever process's rename wins is fine.
        os.makedirs(os.path.dirname(path), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(path))
        build_tiny_model(staging, seed=seed, image_size=image_size, family=family,
                         architecture=architecture)
        try:
            os.rename(staging, path)
        except OSError:
            shutil.rmtree(staging)
    if distributed:
        torch.distributed.barrier()
    return path


def offline_model(name, family="cards", seed=0, image_size=112, device="cpu"):
    """Folder of the offline model `name` (TINY_MODELS, RANDOM_MODELS), built on first use; None
    for any other name (a hub id or a folder)."""
    if name in TINY_MODELS:
        return tiny_model(seed=seed, image_size=image_size, family=family,
                          architecture=TINY_MODELS[name])
    return random_model(name, device=device) if name in RANDOM_MODELS else None


# Qwen/Qwen2.5-VL-{3B,7B}-Instruct config.json, the fields that set sizes. Both share the vision
# tower; 3B ties its output head to the input embeddings.
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112,
              fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3)
MODELS = {
    "Qwen2.5-VL-3B": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                    num_attention_heads=16, num_key_value_heads=2,
                                    vocab_size=151936),
                          out_hidden_size=2048, tie_word_embeddings=True),
    "Qwen2.5-VL-7B": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                    num_attention_heads=28, num_key_value_heads=4,
                                    vocab_size=152064),
                          out_hidden_size=3584, tie_word_embeddings=False),
}

def model_config(name, text=None, vision=None, **tokens):
    """The transformers Qwen2_5_VLConfig of one of MODELS, built without a download. `text` and
    `vision` override fields of the two sub-configs, `tokens` the special tokens' ids."""
    from transformers import Qwen2_5_VLConfig
    spec = MODELS[name]
    text = (spec["text"]
            | dict(tie_word_embeddings=spec["tie_word_embeddings"], max_position_embeddings=128000,
                   rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                        mrope_section=[16, 24, 24]))
            | (text or {}))
    return Qwen2_5_VLConfig(text_config=text,
                            vision_config=(VISION | dict(out_hidden_size=spec["out_hidden_size"])
                                           | (vision or {})),
                            tie_word_embeddings=spec["tie_word_embeddings"], **tokens)


def random_model(name, cache_dir="tiny-vlm", device="cpu", text=None, vision=None):
    """Folder of a real-size Qwen2.5-VL with random bfloat16 weights, built on `device` on first
    use.

    For speed and memory measurements only (scripts/bench.py): the sizes are the real model's, the
    tokenizer and chat template the tiny Qwen2.5-VL's (its special tokens' ids replace Qwen's in
    the config), the image processor Qwen's own (a 300 px frame makes 110 image tokens). The
    output head still spans Qwen's 152k-token vocabulary; ids beyond the tokenizer's are never
    sampled. `text` and `vision` override sub-config fields (a test builds a small one).
    """
    import torch.distributed as dist
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # in the folder's name, hashed: names have a length limit
    overrides = json.dumps([text, vision], sort_keys=True)
    path = os.path.abspath(os.path.join(
        cache_dir, name + ("-" + hashlib.sha1(overrides.encode()).hexdigest()[:10]
                           if text or vision else "")))
    distributed = dist.is_available() and dist.is_initialized()
    if (not os.path.exists(os.path.join(path, "config.json"))
            and (not distributed or dist.get_rank() == 0)):
        tiny = tiny_model(cache_dir, architecture="qwen2_5_vl")
        ids = {t: AutoTokenizer.from_pretrained(tiny).convert_tokens_to_ids(t)
               for t in SPECIAL_TOKENS}
        token_ids = dict(bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"])
        config = model_config(RANDOM_MODELS[name], text=token_ids | (text or {}), vision=vision,
                              **token_ids, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
        staging = tempfile.mkdtemp(prefix=".building-", dir=cache_dir)
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(staging)
        for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.json"):
            shutil.copy(os.path.join(tiny, file), staging)
        # Qwen's defaults: CLIP mean and std, 14 px patches
        Qwen2VLImageProcessorPil().save_pretrained(staging)
        _set_processor_class(staging, "Qwen2_5_VLProcessor")
        os.rename(staging, path)
    if distributed:
        dist.barrier()
    return path


def tokenizer_corpus(family="cards"):
    """Text the tiny tokenizer is trained on: the family's environments' prompts and expert
    answers."""
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


def build_tiny_model(path, seed=0, image_size=112, hidden=64, layers=2, vocab_size=1024,
                     family="cards", architecture="qwen2_vl"):
    """Build a small random VLM, its tokenizer (trained on `family`'s environments) and image
    processor, and save them to `path`.

    architecture "qwen2_vl" (the default tiny model), "qwen2_5_vl" (a Qwen2.5-VL with its own
    vision tower: RMSNorm, gated MLP, window attention in some blocks, full attention in the
    others) or "qwen3_vl" (16 px patches, learned position embeddings, DeepStack features fed
    to the first decoder layer, interleaved M-RoPE). The last two are saved the way hub
    checkpoints are laid out (`_hub_layout`), so that tests load what real users load.

    The image normalisation maps white to 0 (mean 1, std 0.5): with CLIP's mean and std the
    white background becomes a large constant that drowns the digits, and the model never
    learns to look at the image (docs/TINY_MODEL.md). min = max pixels = image_size^2, so every
    observation gives the same number of image tokens, (image_size / 28)^2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if architecture not in ARCHITECTURES:
        raise ValueError(f"tiny model architecture {architecture!r}: expected one of "
                         f"{ARCHITECTURES}")
    hub_layout = architecture != "qwen2_vl"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_corpus(family) + ([SYSTEM_PROMPT] if hub_layout else []),
                            trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", padding_side="left")
    chat_template = QWEN_CHAT_TEMPLATE if hub_layout else CHAT_TEMPLATE
    tokenizer.chat_template = chat_template

    # Qwen3-VL merges 2 x 2 patches of 16 px: its side is rounded to a multiple of 32 (112 -> 128).
    patch = 16 if architecture == "qwen3_vl" else 14
    side = 2 * patch * round(image_size / (2 * patch)) if architecture == "qwen3_vl" else image_size
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=side * side, max_pixels=side * side, patch_size=patch, merge_size=2,
        image_mean=[1.0, 1.0, 1.0], image_std=[0.5, 0.5, 0.5])
    processor = image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=chat_template)

    head_dim = hidden // 4
    token_ids = dict(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, bos_token_id=None,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width).
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                            mrope_section=[head_dim // 4, head_dim // 8,
                                                           head_dim // 8]))
    if architecture == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        vision_config = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=14,
                             spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    elif architecture == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model
        text_config |= dict(head_dim=head_dim,
                            rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                 mrope_section=[head_dim // 4, head_dim // 8,
                                                                head_dim // 8],
                                                 mrope_interleaved=True))
        vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                             out_hidden_size=hidden, patch_size=16, spatial_merge_size=2,
                             temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
                             deepstack_visual_indexes=[0])
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        # Blocks 0 and 2 attend within windows of window_size pixels (2 x 2 merged patches here, so
        # a 112 px image has 4 windows), blocks 1 and 3 over the whole image, as Qwen2.5-VL's
        # fullatt_block_indexes [7, 15, 23, 31] do at 32 blocks.
        vision_config = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                             out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                             temporal_patch_size=2, in_channels=3, window_size=56,
                             fullatt_block_indexes=[1, 3])
    config = Config(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
                    **token_ids)
    # The weights come from their own seeded RNG, so that building the model (on first use) leaves
    # the caller's RNG as loading it from the cache does: a run is the same either way.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Model(config)
        # The output head is frozen under LoRA. With the default init (std 0.02) and a normalised
        # hidden state of norm ~sqrt(hidden), every logit stays within about +-1.3, so no adapter
        # could ever make the model confident (the SFT loss stalls near 5.3 nats a token). Trained
        # checkpoints have large output norms; std 0.2 gives the tiny model room for that.
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.2)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if hub_layout:
        _hub_layout(path, model, processor,
                    "Qwen3VLProcessor" if architecture == "qwen3_vl" else "Qwen2_5_VLProcessor")
        return path
    processor.save_pretrained(path)
    # Saved under the stock class name so that the folder reads like any Qwen2-VL checkpoint.
    config_file = os.path.join(path, "processor_config.json")
    with open(config_file) as f:
        saved = json.load(f)
    saved["processor_class"] = "Qwen2VLProcessor"
    with open(config_file, "w") as f:
        json.dump(saved, f, indent=2)
    return path


def _hub_layout(path, model, processor, processor_class):
    """Save processor and generation settings as Qwen's hub checkpoints ship them.

    The image processor goes to `preprocessor_config.json` (no `processor_config.json`), the chat
    template to `chat_template.json`, and `generation_config.json` holds Qwen's Instruct sampling
    defaults: a repetition penalty, top-k, top-p, a temperature and do_sample. transformers fills
    every generation field a caller leaves unset from that file, so a model that samples
    on-policy must be robust to it (policy.py:ActorCritic.generate).
    """
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    for leftover in ("chat_template.jinja", "processor_config.json"):
        if os.path.exists(os.path.join(path, leftover)):
            os.remove(os.path.join(path, leftover))
    _set_processor_class(path, processor_class)
    with open(os.path.join(path, "chat_template.json"), "w") as f:
        json.dump({"chat_template": processor.chat_template}, f, indent=2)
    eos = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
           processor.tokenizer.pad_token_id]
    model.generation_config.update(**QWEN_SAMPLING_DEFAULTS, eos_token_id=eos, pad_token_id=eos[1])
    model.generation_config.save_pretrained(path)


def _set_processor_class(path, processor_class):
    """Name the processor in preprocessor_config.json, as hub checkpoints do."""
    config_file = os.path.join(path, "preprocessor_config.json")
    with open(config_file) as f:
        saved = json.load(f)
    with open(config_file, "w") as f:
        json.dump(saved | {"processor_class": processor_class}, f, indent=2)


def build_policy(args, device, adapter_path=None, dtype=None):
    """The actor-critic of --model (an offline one, plumbing/tinyvlm.py, is built on first use) with
    the LoRA flags; `dtype` as load_policy's (None: float32 on CPU, bfloat16 on GPU)."""
    model = offline_model(args.model, envs.FAMILY_OF.get(args.env, "cards"), args.seed,
                          args.image_size or 112, device)
    if model and adapter_path:
        check_adapter_base(adapter_path, model)
    return load_policy(model or args.model, envs.action_span, device=device,
                       thought_coef=args.thought_coef, image_size=args.image_size or None,
                       adapter_path=adapter_path, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                       lora_dropout=args.lora_dropout, lora_vision=args.lora_vision,
                       lora_targets=args.lora_targets, dtype=dtype, critic=args.critic,
                       answer_opening=envs.ANSWER_OPENING,
                       gradient_checkpointing={
                           "on": True, "off": False, "auto": args.model not in TINY_MODELS,
                       }[args.gradient_checkpointing])
