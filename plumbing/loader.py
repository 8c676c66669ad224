"""Loading a checkpoint as the actor-critic: the processor, the LoRA adapter, the value head.

`load_policy` takes a hub id or a folder of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint (or a
tiny one from plumbing/tinyvlm.py) and returns policy.py's ActorCritic (docs/ALGORITHM.md §2). What
it does beyond `from_pretrained`: an image-only processor where torchvision is missing, the
checkpoint's sampling settings dropped (so sampling stays on-policy), clear errors for a folder or
tokenizer that does not fit, gradient checkpointing, LoRA on every linear layer.

Use:
    policy = load_policy(folder_or_hub_id, action_span=envs.action_span, lora_r=128)
"""

import contextlib
import functools
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.utils.checkpoint
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from policy import ActorCritic


def check_adapter_base(adapter_path, model_folder):
    """Raise ValueError when a saved adapter was trained on another offline model than
    `model_folder`. The tiny models differ by --seed, the environment's family and --image-size
    (their folder names say which); another one's adapter would load without an error and answer
    nonsense."""
    config = os.path.join(adapter_path, "adapter_config.json")
    if not os.path.exists(config):
        return  # not an adapter folder: PEFT's own loading says so
    with open(config) as f:
        base = json.load(f).get("base_model_name_or_path") or ""
    trained_on = os.path.basename(base.rstrip("/"))
    if trained_on != os.path.basename(model_folder.rstrip("/")):
        raise ValueError(f"the adapter {adapter_path} was trained on the offline model "
                         f"{trained_on!r}, but this run builds {os.path.basename(model_folder)!r}:"
                         f" give the --seed, --env and --image-size of the run that saved it.")


def image_only_processor_class(base=None):
    """A Qwen2(.5)-VL processor without its video processor.

    transformers' video processors need torchvision, which has no CPU build on some machines;
    this project feeds images only, so the processor is rebuilt from its image processor and
    tokenizer when the full `AutoProcessor` cannot be loaded.
    """
    if base is None:
        from transformers import Qwen2VLProcessor as base

    class ImageOnlyProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template,
                             **kwargs)

    return ImageOnlyProcessor


def load_processor(path):
    """The model's processor, loaded with `from_pretrained`.

    Without torchvision transformers cannot build Qwen's video processor, and so no processor
    at all; the processor is then rebuilt from what every checkpoint ships: the class that
    transformers maps the config's model type to, the image processor (`preprocessor_config.json`
    on the hub, `processor_config.json` when saved by transformers 5), the tokenizer and the
    chat template (`chat_template.jinja`, `chat_template.json` or the tokenizer's own).
    """
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ImportError, ValueError) as error:
        if "video" not in str(error).lower():
            raise
    model_type = AutoConfig.from_pretrained(path).model_type
    processor_class = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type) or "", None)
    if processor_class is None:
        raise ValueError(f"transformers knows no processor for model type {model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return image_only_processor_class(processor_class)(
        image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tokenizer,
        chat_template=_chat_template(path) or tokenizer.chat_template)


def _chat_template(path):
    """The chat template a checkpoint ships beside its tokenizer, or None."""
    from transformers.utils import cached_file
    for name in ("chat_template.jinja", "chat_template.json"):
        file = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        if file:
            with open(file) as f:
                return f.read() if name.endswith(".jinja") else json.load(f)["chat_template"]
    return None


def _lora_targets(model, vision):
    """Names of the linear layers to adapt: the language model's, and optionally the vision
    tower's."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "lm_head" in name:
            continue
        in_vision = "visual" in name or "vision" in name
        if (in_vision and vision) or (not in_vision and "language_model" in name):
            names.append(name)
    return names


# ---- Gradient checkpointing with several adapters (docs/ALGORITHM.md §6) ------------------
def _adapter_layers(module):
    """peft's LoRA layers inside `module`: each one knows which adapter(s) it runs."""
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


class _ActiveAdapters:
    """Context manager: run `adapter_layers` with the adapters `names` (one entry per layer),
    then put back the ones they had. Only the layers' active adapter is set: no gradient flag is
    touched. It can be entered again (backward recomputes a layer once per backward pass through
    it, e.g. twice for a graph kept with retain_graph)."""

    def __init__(self, adapter_layers, names):
        self.adapter_layers, self.names, self.found = adapter_layers, names, []

    def __enter__(self):
        self.found.append([layer._active_adapter for layer in self.adapter_layers])
        for layer, name in zip(self.adapter_layers, self.names):
            layer._active_adapter = name

    def __exit__(self, *exception):
        for layer, name in zip(self.adapter_layers, self.found.pop()):
            layer._active_adapter = name


def _recompute_with_forward_adapters(adapter_layers):
    """`context_fn` of torch.utils.checkpoint for one checkpointed layer (docs/ALGORITHM.md §6).

    Backward recomputes a checkpointed layer's activations with the adapters active AT BACKWARD.
    A loss that adds the critic adapter's pass to the policy's (--critic adapter) is
    back-propagated after `use_adapter("critic")` has switched back to the policy, so the
    critic's layers would be replayed with the policy's weights: a gradient of the right shape
    from the wrong activations. The adapters active in the forward pass are read here, at
    forward time, and set again around the recomputation."""
    names = [layer._active_adapter for layer in adapter_layers]
    return contextlib.nullcontext(), _ActiveAdapters(adapter_layers, names)


def recompute_with_forward_adapters(model):
    """Give every checkpointed layer of `model` (a PeftModel with gradient checkpointing on) the
    `context_fn` above: its recomputation in backward runs the adapters of its forward pass."""
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
            layer._gradient_checkpointing_func = functools.partial(
                torch.utils.checkpoint.checkpoint, use_reentrant=False,
                context_fn=functools.partial(_recompute_with_forward_adapters,
                                             _adapter_layers(layer)))


def load_policy(model, action_span, device="cpu", thought_coef=0.5, image_size=None,
                adapter_path=None, lora_r=128, lora_alpha=256, lora_dropout=0.05, lora_vision=True,
                lora_targets="", gradient_checkpointing=False, dtype=None, critic="shared",
                answer_opening=None):
    """Load a Qwen2(.5)-VL (hub id or folder), wrap it with a LoRA "policy" adapter and a value
    head.

    `dtype`: the weights' dtype (default float32 on CPU, bfloat16 on GPU); the base is frozen.
    `adapter_path` resumes a saved policy (its LoRA config wins over the lora_* arguments). LoRA
    (docs/ALGORITHM.md §2): rank lora_r, scaling lora_alpha / lora_r, on every linear layer of the
    language model and, with `lora_vision`, of the vision tower; `lora_targets` (comma-separated
    module-name suffixes) replaces that choice. `critic` and `answer_opening`: ActorCritic's; a
    saved critic adapter next to `adapter_path` (`.../adapters/critic`) is loaded too.
    `gradient_checkpointing`: every decoder and vision block recomputes its activations in backward
    instead of keeping them (docs/ALGORITHM.md §6).
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText, GenerationConfig

    looks_like_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model) and not model.startswith(".")
    if not os.path.isdir(model) and not looks_like_hub_id:
        raise FileNotFoundError(f"--model {model!r}: no such folder. Pass a local folder of a "
                                "Qwen2-VL / Qwen2.5-VL checkpoint, a hub id, or 'tiny'.")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    try:
        # Straight onto the process's device (a single-device map needs accelerate, which peft
        # requires): a checkpoint in another dtype, e.g. a float32 SFT one, is then not converted
        # in host memory, a full bfloat16 copy per process (a bfloat16 one is memory-mapped either
        # way). Without use_kernels=False, transformers would swap in the hub's kernels for a GPU
        # map: fetched over the network, and those for activations are registered for inference,
        # while PPO takes gradients in eval mode.
        base = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, use_kernels=False,
                                                           device_map=torch.device(device))
        processor = load_processor(model)
    except ValueError as error:
        raise ValueError(f"--model {model!r} is not an image-text-to-text model that transformers "
                         f"can load ({error}). Use a Qwen2-VL or Qwen2.5-VL checkpoint.") from None
    except OSError as error:
        if os.path.isdir(model):
            hint = ("A checkpoint folder needs config.json, the weights, the tokenizer files and "
                    "preprocessor_config.json.")
        else:
            hint = ("With no network, pass a local folder (or set HF_HUB_OFFLINE=1 with the model "
                    "in the cache), or use --model tiny.")
        raise OSError(f"--model {model!r} could not be loaded: {error}\n{hint}") from None
    tokenizer = processor.tokenizer
    missing = [t for t in ("<|im_end|>", "<|image_pad|>")
               if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing or len(tokenizer) > base.get_output_embeddings().weight.shape[0]:
        raise ValueError(f"--model {model!r}: its tokenizer ({len(tokenizer)} tokens) does not fit "
                         f"the model (missing {missing or 'nothing'}); is the folder's "
                         "tokenizer.json the model's own?")
    base.requires_grad_(False)
    # Only the checkpoint's stop and padding ids are kept: its sampling settings (top-k, top-p,
    # repetition penalty, do_sample) would make generate sample off-policy wherever a call
    # leaves a field unset (ActorCritic.generate sets them all as well).
    shipped = base.generation_config
    base.generation_config = GenerationConfig(eos_token_id=shipped.eos_token_id,
                                              pad_token_id=shipped.pad_token_id,
                                              bos_token_id=shipped.bos_token_id)
    if not isinstance(base.get_output_embeddings(), nn.Linear):
        raise ValueError(f"--model {model!r}: the output head is not a plain linear layer; "
                         "ActorCritic scores tokens from its weight in float32")
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, which a frozen base lacks.
        enable = (getattr(base, "activation_checkpointing_enable", None)  # renamed in 5.x
                  or base.gradient_checkpointing_enable)
        enable({"use_reentrant": False})
    if adapter_path:
        peft_model = PeftModel.from_pretrained(base, adapter_path, adapter_name="policy",
                                               is_trainable=True)
    else:
        targets = ([t.strip() for t in lora_targets.split(",") if t.strip()]
                   or _lora_targets(base, lora_vision))
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules=targets)
        peft_model = get_peft_model(base, config, adapter_name="policy")
    size = getattr(processor.image_processor, "size", None)  # transformers 5: pixel counts as edges
    pixels = getattr(size, "shortest_edge", None)
    if image_size is None and pixels and pixels == getattr(size, "longest_edge", None):
        # A processor built for one size (the tiny model's) shrinks a 300 px frame below that
        # size by its own rounding (112 -> 84, 56 -> 28 px); resize to it ourselves
        # (docs/TINY_MODEL.md).
        image_size = math.isqrt(pixels)
    if gradient_checkpointing:
        recompute_with_forward_adapters(peft_model)
    policy = ActorCritic(peft_model, processor, action_span, thought_coef=thought_coef,
                         image_size=image_size, critic=critic, answer_opening=answer_opening)
    critic_path = os.path.join(os.path.dirname(adapter_path or ""), "critic")
    if critic == "adapter" and adapter_path and os.path.exists(critic_path):
        from peft.utils import load_peft_weights
        policy.load_adapter_state(load_peft_weights(critic_path, device="cpu"), "critic")
    if adapter_path and os.path.exists(os.path.join(adapter_path, "value_head.pt")):
        # Saved from a GPU: unmapped, it lands on the saving process's GPU, or fails without one.
        state = torch.load(os.path.join(adapter_path, "value_head.pt"), map_location="cpu")
        policy.value_head.load_state_dict(state)
    return policy.to(device)
