"""Checkpoints and resume: everything a run needs to continue exactly, written atomically.

A checkpoint (OUT/checkpoint) holds:
  adapters/    the policy, teacher and (--critic adapter) critic LoRA adapters in peft's format
               (`PeftModel.from_pretrained(base, "OUT/checkpoint/adapters/policy")`), and the
               value head next to the policy adapter;
  trainer.pt   optimizer state and counters (update, environment steps, teacher merges);
  rank<r>.pkl  per process: its environments (mid-episode), its rollout RNG, its torch RNG
               (sampling, dropout, mini-batch order) and a digest of its weights. Resumed on
               another number of processes, these are not used: the environments are dealt
               afresh, with a warning.
  manifest.json  every file's size and SHA-256, written last.
It is written to OUT/checkpoint.tmp and renamed, so a kill at any moment leaves a complete one;
the previous ones stay as OUT/checkpoint.1, .2, ... (--keep-checkpoints in all). On resume, a
checkpoint whose files do not match its manifest (cut short by a full disk or an interrupted
copy) is passed over with a warning for the previous one, and metrics.jsonl is cut back to the
resumed update: no gap and no duplicate. rank<r>.pkl is a pickle: resuming runs code it holds,
so resume only checkpoints from runs one trusts.

Use (train.py):
    check_start(args, world)                             # --init, --teacher, --resume fit?
    metrics = open_run(out, config, last_update)         # config.json, metrics.jsonl (report.py)
    save(out, policy, optimizer, runner, counters, rank, world, keep=2)
    runner, counters, replay = load(latest(out), optimizer, rank, world)  # None: another
                                                                   # process count
"""

import hashlib
import json
import os
import pickle
import shutil
import sys

import torch
import torch.distributed as dist

# The most checkpoint folders `latest` looks through (--keep-checkpoints is checked against it).
MAX_KEPT = 10
# Flags that fix what a checkpoint holds; resuming with others would silently mix runs.
FIXED_FLAGS = ("model", "env", "guidance", "num_envs", "steps_per_update", "lora_r", "lora_vision",
               "lora_targets")


def folders(out, keep):
    """The checkpoint folders of a run, newest first: OUT/checkpoint, OUT/checkpoint.1, ..."""
    return [os.path.join(out, "checkpoint")] + [os.path.join(out, f"checkpoint.{i}")
                                                  for i in range(1, keep)]


def damage(path):
    """None if the checkpoint in `path` is complete, else what is wrong with it (one line)."""
    manifest = os.path.join(path, "manifest.json")
    if not os.path.exists(os.path.join(path, "trainer.pt")):
        return "it has no trainer.pt"
    if not os.path.exists(manifest):
        return None  # written by a version without manifests: taken as it is
    try:
        with open(manifest) as f:
            expected = json.load(f)
    except (OSError, ValueError):
        return f"{manifest} is unreadable"
    for name, (size, sha256) in expected.items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            return f"{file} is missing"
        if os.path.getsize(file) < size:
            return f"{file} is cut short ({os.path.getsize(file)} of {size} bytes)"
        if os.path.getsize(file) > size:
            return f"{file} has {os.path.getsize(file)} bytes where {size} were saved"
        if _sha256(file) != sha256:
            return f"{file} is corrupt (its SHA-256 differs from the one saved)"
    return None


def latest(out):
    """The newest complete checkpoint of the run in `out`, or None. An incomplete one is passed
    over with a warning that names what is wrong and which one is resumed instead."""
    skipped = []
    for path in folders(out, MAX_KEPT):
        if not os.path.exists(path):
            continue
        problem = damage(path)
        if problem is None:
            if skipped:
                print(f"warning: --resume: {'; '.join(skipped)}. Resuming from {path} instead.",
                      file=sys.stderr)
            return path
        skipped.append(f"{path} is not complete: {problem}")
    if skipped:
        sys.exit(f"--resume: {'; '.join(skipped)}; no earlier complete checkpoint in {out}. "
                 "Start the run again without --resume (or with another --out).")
    return None


def check_start(args, world):
    """Stop with a message naming the fix if what the run starts from does not fit its flags:
    the adapter folders of --init and --teacher, and the run in --out that --resume continues."""
    for flag in ("teacher", "init"):
        folder = getattr(args, flag)
        if folder and not os.path.exists(os.path.join(folder, "adapter_config.json")):
            sys.exit(f"--{flag} {folder!r}: no adapter_config.json there; "
                     "pass a peft adapter folder")
    if args.init:
        with open(os.path.join(args.init, "adapter_config.json")) as f:
            rank = json.load(f).get("r")
        if rank != args.lora_r:
            sys.exit(f"--init {args.init!r} holds a rank-{rank} adapter: pass --lora-r {rank} "
                     "(and its --lora-alpha)")
    if not args.resume:
        return
    if latest(args.out) is None:
        sys.exit(f"--resume: no checkpoint in {args.out}/checkpoint; train without --resume first")
    with open(os.path.join(args.out, "config.json")) as f:
        saved = json.load(f)
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(args, k)!r}"
               for k in FIXED_FLAGS if saved.get(k) != getattr(args, k)]
    if changed:
        sys.exit(f"--resume: the run in {args.out} was trained with other settings "
                 f"({'; '.join(changed)}). "
                 "Resume with the same flags, or start a new run with another --out.")


def _barrier(world):
    if world > 1:
        dist.barrier()


def _sha256(file):
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        block = f.read(1 << 24)  # 16 MiB at a time: a 7B run's adapters are gigabytes
        while block:
            digest.update(block)
            block = f.read(1 << 24)
    return digest.hexdigest()


def save(out, policy, optimizer, runner, counters, rank, world, keep=2, replay=None):
    """Write OUT/checkpoint: to a staging folder first, then renamed into place; the `keep` - 1
    previous checkpoints move to OUT/checkpoint.1, ... and older ones are deleted. `replay`: this
    rank's SFT replay buffer (--sft-batch replay), kept with its environments."""
    staging = os.path.join(out, "checkpoint.tmp")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        adapters = [name for name in ("policy", "teacher", "critic")
                    if name in policy.model.peft_config]
        policy.save(os.path.join(staging, "adapters"), adapters=adapters)  # peft's format
        torch.save({"optimizer": optimizer.state_dict(), "world_size": world, **counters},
                   os.path.join(staging, "trainer.pt"))
    _barrier(world)
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    # A digest of the weights lets anyone check that all ranks hold the same policy and teacher.
    digest = hashlib.sha256()
    for name, tensor in sorted(policy.state_dict().items()):
        if "lora_" in name or name.startswith("value_head"):
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    with open(os.path.join(staging, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump({"runner": runner, "replay": replay, "rng": rng,
                     "weights_sha256": digest.hexdigest()}, f)
    _barrier(world)
    if rank == 0:
        files = sorted(os.path.relpath(os.path.join(folder, name), staging)
                       for folder, _, names in os.walk(staging) for name in names)
        with open(os.path.join(staging, "manifest.json"), "w") as f:
            json.dump({name: (os.path.getsize(os.path.join(staging, name)),
                              _sha256(os.path.join(staging, name))) for name in files}, f)
        # Shift checkpoint -> .1 -> .2 ...; a folder past `keep` (and a half-deleted one that a
        # kill during the last clean-up left) is removed first: rename() cannot replace one.
        kept = folders(out, keep + 1)
        shutil.rmtree(kept[-1], ignore_errors=True)
        for newer, older in reversed(list(zip(kept, kept[1:]))):
            if os.path.exists(newer):
                shutil.rmtree(older, ignore_errors=True)
                os.rename(newer, older)
        os.rename(staging, kept[0])
        shutil.rmtree(kept[-1], ignore_errors=True)
    _barrier(world)


def load(path, optimizer, rank, world):
    """Restore the optimizer and the counters, and this rank's RNG and environments; returns
    (runner, counters, replay). The policy adapter and value head are loaded by
    load_policy(adapter_path=...), the teacher by Teacher.load.

    With another number of processes than the run had (a job that lost nodes, or moved from 8
    GPUs to 4), everything that all ranks share carries over, and the per-rank state cannot:
    runner and replay are then None (the caller deals the environments afresh and starts the SFT
    replay empty) and a warning says so.
    """
    # Rank 0 saved the optimizer state from its own GPU: unmapped, every rank would restore it onto
    # that GPU (and a machine without one could not read it). load_state_dict moves each tensor
    # to its parameter's device.
    trainer = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer.pop("optimizer"))
    saved_world = trainer.pop("world_size", world)
    if saved_world != world:
        if rank == 0:
            print(f"warning: --resume with {world} processes, the run had {saved_world}: the "
                  "adapters, value head, optimizer, teacher and counters carry over; the "
                  "environments are dealt afresh (episodes in progress are dropped), the SFT "
                  "replay starts empty and each process's random streams start anew",
                  file=sys.stderr)
        return None, trainer, None
    with open(os.path.join(path, f"rank{rank}.pkl"), "rb") as f:
        saved = pickle.load(f)
    torch.set_rng_state(saved["rng"]["torch"])
    if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return saved["runner"], trainer, saved.get("replay")


def open_run(out, config, last_update):
    """Write OUT/config.json and open OUT/metrics.jsonl for appending, cut back to the
    checkpoint's update when resuming (a run killed after logging an update but before saving
    it repeats that update: no gap, no duplicate)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    path = os.path.join(out, "metrics.jsonl")
    rows = []
    if last_update is not None and os.path.exists(path):
        rows = [line for line in open(path)
                if line.strip() and json.loads(line)["update"] <= last_update]
    with open(path, "w") as f:
        f.writelines(rows)
    return open(path, "a")
