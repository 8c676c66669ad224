"""Can the household tiny model's vision tower learn where the objects are, taught directly?

The household warm start does not learn to read where an object is (docs/RESULTS.md,
"Household"). This asks the vision tower alone, with a supervision far denser than the warm
start's. For each kind of object and each receptacle the question is: is one of that kind in
sight there? LoRA on the tower's linear layers (the policy's: rank 128, alpha 256, dropout 0.05)
and a linear readout learn the answer from fresh pictures, with a binary cross-entropy loss.
Every --every steps it prints, on 256 held-out pictures, the share of (picture, kind in sight)
pairs whose top-scoring receptacle holds that kind. A readout that knows only how often each
receptacle holds each kind (the prior, printed first) scores about 0.2.

Two readouts over the tower's image tokens:
  tokens  each token scored on its own, then a soft maximum over tokens:
            scores[kind, receptacle] = logsumexp over tokens t of (W token_t + b)[kind, receptacle]
          It sees what a token holds, not where the token is. A language model reads the picture
          the same way: its attention picks a token by its content and reads its value.
  grid    one linear map over all tokens side by side: it knows each token's place.

    python scripts/picture_probe.py                                   # 112 px, tokens readout
    python scripts/picture_probe.py --readout grid --fixed-layout     # every room in one order
    python scripts/picture_probe.py --image-size 168 --steps 1500     # 36 image tokens
    python scripts/picture_probe.py --image-size 168 --steps 1500 --save runs/taught168
    python scripts/warm_start.py --model runs/taught168 --image-size 168  # the warm start after it
"""
import argparse
import functools
import os
import shutil
import sys
import time

import gymnasium as gym
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from envs.household import OBJECT_COLORS, RECEPTACLES, kind  # noqa: E402
from plumbing.loader import load_processor  # noqa: E402
from plumbing.tinyvlm import tiny_model  # noqa: E402

KINDS = sorted(OBJECT_COLORS)
EXPERT_STEPS = 8     # a picture comes after 0-7 of the expert's steps, so some doors are open
BATCH = 32           # pictures per step
HELD_OUT = 256       # pictures of the readings, from seeds no training step draws
HELD_OUT_SEED = 10**6


def lesson_pictures(env, count, first_seed, rng, image_size, fixed_layout=False):
    """`count` pictures resized to `image_size`, and labels [count, kinds, receptacles]: 1 where
    an object of that kind is in sight in or on that receptacle. fixed_layout: every room in one
    order (RECEPTACLES) instead of a shuffled one."""
    options = {"cells": list(RECEPTACLES)} if fixed_layout else None
    images, labels = [], torch.zeros(count, len(KINDS), len(RECEPTACLES))
    for i in range(count):
        obs, _ = env.reset(seed=first_seed + i, options=options)
        for _ in range(int(rng.integers(EXPERT_STEPS))):
            obs, _, terminated, truncated, _ = env.step(env.expert()[1])
            if terminated or truncated:
                break
        images.append(Image.fromarray(obs).resize((image_size, image_size), Image.BICUBIC))
        for obj, receptacle in env.in_sight().items():
            labels[i, KINDS.index(kind(obj)), RECEPTACLES.index(receptacle)] = 1
    return images, labels


def image_tokens(visual, image_processor, images):
    """[pictures, tokens, hidden]: the vision tower's merged tokens of each picture."""
    inputs = image_processor(images=images, return_tensors="pt")
    output = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    return output.pooler_output.reshape(len(images), -1, output.pooler_output.shape[-1])


def top_receptacle_share(scores, labels):
    """Share of the (picture, kind in sight) pairs whose top-scoring receptacle holds that kind:
    about 0.2 for a readout that knows only how often each receptacle holds each kind."""
    in_sight = labels.sum(-1) > 0                                       # [pictures, kinds]
    top = scores.argmax(-1, keepdim=True)                               # [pictures, kinds, 1]
    return float(labels.gather(-1, top).squeeze(-1)[in_sight].mean())


def lesson(model, image_processor, image_size, steps, seed, readout="tokens", fixed_layout=False,
           every=250, lr=1e-3, log=None):
    """Teach `model`'s vision tower (a transformers Qwen-VL) where the household's objects are,
    through LoRA and a `readout` (module docstring), then merge the LoRA into it. Returns the
    readings [(step, share, seconds)] on HELD_OUT pictures, taken every `every` steps and after
    the last; `log` gets each as a line."""
    from peft import LoraConfig, get_peft_model

    targets = [name for name, module in model.named_modules()
               if "visual" in name and isinstance(module, torch.nn.Linear)]
    # peft freezes the model and trains only the LoRA factors
    taught = get_peft_model(model, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05,
                                              target_modules=targets))
    visual = taught.get_base_model().model.visual
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        env = gym.make("gtr/Household-v0").unwrapped
        held_out = lesson_pictures(env, HELD_OUT, HELD_OUT_SEED, rng, image_size, fixed_layout)
        tokens, hidden = image_tokens(visual, image_processor, held_out[0][:1]).shape[1:]
        head = torch.nn.Linear(hidden if readout == "tokens" else tokens * hidden,
                               len(KINDS) * len(RECEPTACLES))
        trainable = [p for p in taught.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable + list(head.parameters()), lr=lr)

        def scores(images):
            """[pictures, kinds, receptacles] logits."""
            features = image_tokens(visual, image_processor, images)  # [pictures, tokens, hidden]
            if readout == "tokens":
                logits = head(features).logsumexp(1)          # a soft maximum over tokens
            else:
                logits = head(features.flatten(1))
            return logits.reshape(len(images), len(KINDS), len(RECEPTACLES))

        readings, start = [], time.perf_counter()

        def read(step):
            taught.eval()
            with torch.no_grad():
                share = top_receptacle_share(scores(held_out[0]), held_out[1])
            readings.append((step, share, time.perf_counter() - start))
            if log:
                log(f"| {step} | {share:.3f} | {readings[-1][2]:.0f} |")

        read(0)
        for step in range(1, steps + 1):
            taught.train()
            # step N draws deals BATCH * (N - 1) on, far below the held-out ones
            images, labels = lesson_pictures(env, BATCH, BATCH * (step - 1), rng, image_size,
                                             fixed_layout)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scores(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % every == 0 or step == steps:
                read(step)
    taught.merge_and_unload()  # `model` is a plain model again, the lesson in its weights
    return readings


def main():
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--readout", choices=("tokens", "grid"), default="tokens",
                     help="tokens: each token scored alone; grid: all side by side")
    cli.add_argument("--fixed-layout", action="store_true",
                     help="every room in one order (RECEPTACLES) instead of shuffled")
    cli.add_argument("--image-size", type=int, default=112,
                     help="the tiny model's image size (train.py's --image-size)")
    cli.add_argument("--steps", type=int, default=800, help="training steps of 32 pictures")
    cli.add_argument("--every", type=int, default=250, help="steps between readings")
    cli.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    cli.add_argument("--seed", type=int, default=0, help="the tiny model's seed and the lesson's")
    cli.add_argument("--save", default="",
                     help="save the taught model (the LoRA merged into it) to this folder, for "
                          "train.py's --model")
    options = cli.parse_args()
    from transformers import AutoModelForImageTextToText

    folder = tiny_model(seed=options.seed, image_size=options.image_size, family="household")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    image_processor = load_processor(folder).image_processor
    # The prior: each kind's commonest receptacles over 1024 pictures, scored on the held-out
    # pictures' labels (the first draws of `lesson`'s generator, seeded the same)
    env = gym.make("gtr/Household-v0").unwrapped
    _, counts = lesson_pictures(env, 1024, 2 * HELD_OUT_SEED, np.random.default_rng(1), 28,
                                options.fixed_layout)
    _, held_out = lesson_pictures(env, HELD_OUT, HELD_OUT_SEED,
                                  np.random.default_rng(options.seed), 28, options.fixed_layout)
    prior = top_receptacle_share(counts.sum(0).expand_as(held_out), held_out)
    print(f"readout {options.readout}, {'fixed' if options.fixed_layout else 'shuffled'} layout, "
          f"{options.image_size} px ({(options.image_size // 28) ** 2} image tokens), lr "
          f"{options.lr}, seed {options.seed}; the prior scores {prior:.3f}\n")
    print("| step | top receptacle holds the kind | seconds |\n|---|---|---|")
    lesson(model, image_processor, options.image_size, options.steps, options.seed,
           readout=options.readout, fixed_layout=options.fixed_layout, every=options.every,
           lr=options.lr, log=functools.partial(print, flush=True))
    if options.save:
        shutil.copytree(folder, options.save, dirs_exist_ok=True)  # tokenizer and processor
        model.save_pretrained(options.save)


if __name__ == "__main__":
    main()
