"""Speed and memory of GTR-Turbo's pieces, as ratios measured in one run on one machine.

    python -m scripts.bench --lora-r 8 --lora-alpha 16   # tiny model, CPU: the targets' table
    python -m scripts.bench --lora-r 8 --lora-alpha 16 --json    # the same as one JSON object
    python -m scripts.bench --model Qwen/Qwen2.5-VL-3B-Instruct --device cuda --max-new-tokens 128
    python -m scripts.bench --model random-qwen2.5-vl-7b --device cuda --micro-batch-size 4 \
        --num-envs 16 --max-new-tokens 256 --warmup-sft-steps 0 \
        --generation-envs 1,8,32    # the paper's size, no download
Every flag of train.py applies (the update measured is train.py's), plus the benchmark's own.

Ratios (targets on a 2-core CPU with the tiny model at LoRA rank 8 in brackets; at rank 128 the
tiny model's adapter outweighs the model itself, so memory and merge ratios say nothing there):
  rollout_speedup          env steps/s of the lockstep rollout (one batched generate per step for
                           --num-envs environments) over one environment at a time, the
                           reference's way                                                  [>= 3]
  kl_over_none             time of an update (rollout, guidance, PPO epochs) with KL guidance
                           over PPO only: one teacher forward pass over the rollout        [<= 1.3]
  sft_over_none            the same with SFT guidance: the teacher generates answers       [<= 1.6]
  merge_fraction           one teacher merge (TIES + EMA over the adapter) over one update [<= 0.01]
  teacher_memory_overhead  extra memory of the teacher adapter, as a fraction of the training
                           process's; `second_copy_overhead` is what the reference's second
                           full model would add                                            [<= 0.05]
On CUDA memory is the measured peak of an update; on CPU it is counted: parameters, gradients
and Adam moments of the training process (activations are not counted on CPU).
Figures (absolute, for one device):
  generation_tokens_per_s_N  answer tokens per second of one batched generate over N prompts
                             (--generation-envs)
  seconds_ppo_update         the PPO epochs of one update alone; seconds_teacher_kl the teacher's
                             KL pass over the rollout
  first_log_ratio_max        the largest |log pi - log pi_old| of PPO's first mini-batch, before
                             any step: the scoring's rounding (bf16), which --target-kl sees
  critic_adapter_over_shared time of a PPO-only update with --critic adapter (the critic's own
                             prompt pass per rollout step and per micro-batch) over the shared head
  ppo_mfu                    model FLOPs of those PPO epochs (scripts/memory.py:ppo_flops, a
                             Qwen2.5-VL with LoRA on a frozen base) over seconds x the device's
                             peak bf16 FLOP/s (--peak-tflops; looked up for known GPUs)
"""

import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import torch

import envs  # noqa: F401  (registers the environments)
from config import Args, check_args, resolve_warmup
from demonstrations import warm_start
from plumbing.distributed import setup_distributed
from plumbing.flags import invalid, parse_dataclass
from rollout import Rollout
from teacher import Teacher
from plumbing.tinyvlm import build_policy
from train import actor_critic_optimizer, ppo_update


@dataclass
class BenchArgs(Args):
    """train.py's flags (the update measured is train.py's), plus the benchmark's own."""
    repeats: int = 3
    """measurements per quantity; the median is reported"""
    json: bool = False
    """print one JSON object instead of a table"""
    generation_envs: str = ""
    """comma-separated prompt counts for the generation throughput, e.g. 1,8,32 (empty: skip)"""
    peak_tflops: float = 0.0
    """the device's peak dense bf16 TFLOP/s for the MFU (0: look it up by GPU name; none on CPU)"""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """the model's weights: auto (float32 on CPU, bfloat16 on GPU), bfloat16 or float32"""


# Dense bf16 peak TFLOP/s of GPUs by a part of their name (the vendors' data sheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "4090": 165.0}


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ppo_epoch_flops(policy, batch, args):
    """Model FLOPs of one PPO epoch over the rollout: scripts/memory.py:ppo_flops of micro-batches
    of the rollout's mean prompt and answer lengths and its image grid (padding not counted)."""
    from scripts.memory import MicroBatch, ppo_flops
    prompt = statistics.mean(len(e["input_ids"]) for e in batch.encoded)
    answer = statistics.mean(len(r) for r in batch.responses)
    _, height, width = batch.encoded[0]["image_grid_thw"][0].tolist()
    per_sample = ppo_flops(policy.model.get_base_model().config,
                           MicroBatch(batch=1, seq_len=round(prompt + answer), grid=(height, width),
                                      scored=round(answer)),
                           args.lora_r)["total"]
    return per_sample * len(batch.responses)


def main(args):
    _, _, device = setup_distributed(args.device)
    torch.manual_seed(0)
    try:
        policy = build_policy(args, device,
                              dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    except (OSError, ValueError) as error:
        # a --model that cannot be loaded: its message, no traceback
        sys.exit(str(error))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = actor_critic_optimizer(policy, args)
    if args.warmup_sft_steps:  # so that answers parse (else SFT's teacher retries dominate)
        warm_start(policy, policy, trainable, args, rank=0, world=1)
    policy.eval()  # rollouts and PPO passes run without dropout, as in train.py

    def make_envs(n):
        return [gym.make(args.env) for _ in range(n)]

    results = {}

    # ---- Rollout: N environments in lockstep vs one at a time --------------------------------
    batched, single = Rollout(make_envs(args.num_envs), seed=0), Rollout(make_envs(1), seed=0)
    steps = args.steps_per_update // args.num_envs
    t_batched = statistics.median(timed(lambda: batched.collect(policy, steps, args.temperature,
                                                                args.max_new_tokens))
                                  for _ in range(args.repeats))
    t_single = statistics.median(timed(lambda: single.collect(policy, args.steps_per_update,
                                                              args.temperature,
                                                              args.max_new_tokens))
                                 for _ in range(args.repeats))
    results["rollout_speedup"] = t_single / t_batched  # same number of env steps in both

    # ---- Generation throughput: one batched generate over N prompts ------------------------------
    for n in [int(n) for n in args.generation_envs.split(",") if n]:
        games = [env.unwrapped for env in make_envs(n)]
        encoded = policy.encode([env.reset(seed=i)[0] for i, env in enumerate(games)],
                                [g.prompt() for g in games])
        tokens, seconds = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            responses, _ = policy.generate(encoded, args.temperature, args.max_new_tokens)
            seconds.append(time.perf_counter() - start)
            tokens.append(sum(len(r) for r in responses))
        results[f"generation_tokens_per_s_{n}"] = statistics.median(
            t / s for t, s in zip(tokens, seconds))

    # ---- Memory: what the teacher adapter adds --------------------------------------------------
    def update_with(guidance):
        """One update of train.py's loop: rollout, the teacher's guidance, PPO epochs."""
        run = dataclasses.replace(args, guidance=guidance, teacher="")
        batch = batched.collect(policy, steps, args.temperature, args.max_new_tokens,
                                kl_temperature=(teacher.kl_temperature() if guidance == "kl"
                                                else None))
        advice = None
        if guidance != "none":
            teacher.args = run
            advice = teacher.guide(policy, batch, batched.envs[0].unwrapped)
        ppo_update(policy, optimizer, batch, advice, run)

    base_bytes = sum(p.numel() * p.element_size() for n, p in policy.named_parameters()
                     if "lora_" not in n and not n.startswith("value_head"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        update_with("none")
        without = torch.cuda.max_memory_allocated()
    teacher = Teacher(policy, dataclasses.replace(args, guidance="kl", teacher=""))
    teacher.start(policy)
    teacher_bytes = sum(t.numel() * t.element_size() for t in teacher.weights.values())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        update_with("kl")
        results["teacher_memory_overhead"] = torch.cuda.max_memory_allocated() / without - 1
        results["second_copy_overhead"] = base_bytes / without
        results["memory_method"] = "measured peak (CUDA)"
    else:
        trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
        process = base_bytes + trainable_bytes * 4  # weights, gradients, Adam's two moments
        results["teacher_memory_overhead"] = teacher_bytes / process
        results["second_copy_overhead"] = base_bytes / process
        results["memory_method"] = "counted: parameters, gradients, Adam moments"

    # ---- Time per update for each guidance, interleaved so drift hits all alike ----------------
    times = {"none": [], "kl": [], "sft": []}
    for _ in range(args.repeats):
        for guidance in times:
            times[guidance].append(timed(lambda: update_with(guidance)))
    update_time = {g: statistics.median(t) for g, t in times.items()}
    results["kl_over_none"] = update_time["kl"] / update_time["none"]
    results["sft_over_none"] = update_time["sft"] / update_time["none"]

    # ---- The PPO epochs alone, the teacher's KL pass alone, and the update's MFU --------------
    teacher.args = dataclasses.replace(args, guidance="kl", teacher="")
    batch = batched.collect(policy, steps, args.temperature, args.max_new_tokens,
                            kl_temperature=teacher.kl_temperature())
    results["seconds_teacher_kl"] = statistics.median(
        teacher.guide(policy, batch, batched.envs[0].unwrapped).seconds
        for _ in range(args.repeats))
    # no early stop: a known amount of work
    every_epoch = dataclasses.replace(args, guidance="none", target_kl=0.0)
    # Before the first step the ratio is 1 up to how the scoring rounds: the rollout scores its
    # answers in batches of --num-envs, PPO in shuffled micro-batches with other padding.
    results["first_log_ratio_max"] = ppo_update(policy, optimizer, batch, None,
                                                every_epoch)["first_log_ratio_max"]
    batch = batched.collect(policy, steps, args.temperature, args.max_new_tokens)
    ppo_seconds = statistics.median(timed(lambda: ppo_update(policy, optimizer, batch, None,
                                                             every_epoch))
                                    for _ in range(args.repeats))
    results["seconds_ppo_update"] = ppo_seconds
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda"
                                     and k in torch.cuda.get_device_name(device)), 0.0)
    if peak and policy.model.get_base_model().config.model_type == "qwen2_5_vl":
        results["ppo_mfu"] = (ppo_epoch_flops(policy, batch, args) * args.ppo_epochs / ppo_seconds
                              / (peak * 1e12))

    # ---- Merge: one TIES + EMA teacher update over one PPO update --------------------------------
    merge_time = statistics.median(timed(lambda: teacher.merge(policy, 1)) for _ in range(5))
    results["merge_fraction"] = merge_time / update_time["none"]

    # ---- The critic's own adapter: one more prompt-only pass per rollout step and micro-batch ----
    if args.critic == "adapter":
        seconds = {"shared": [], "adapter": []}  # the same model; "shared" skips the critic's pass
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for critic in seconds:
                policy.critic = critic
                seconds[critic].append(timed(lambda: update_with("none")))
        results["critic_adapter_over_shared"] = (statistics.median(seconds["adapter"])
                                                 / statistics.median(seconds["shared"]))

    results.update({"seconds_per_update_none": update_time["none"],
                    "seconds_per_update_kl": update_time["kl"],
                    "seconds_per_update_sft": update_time["sft"], "seconds_per_merge": merge_time,
                    "device": str(device), "model": args.model, "num_envs": args.num_envs,
                    "steps_per_update": args.steps_per_update,
                    "max_new_tokens": args.max_new_tokens, "lora_r": args.lora_r})
    if args.json:
        print(json.dumps(results))
        return results
    figures = [k for k in results if k.startswith("generation_tokens_per_s")]
    for name in figures + ["ppo_mfu", "critic_adapter_over_shared"]:
        if name in results:
            print(f"{name}: {results[name]:.4g}")
    targets = {"rollout_speedup": ">= 3", "kl_over_none": "<= 1.3", "sft_over_none": "<= 1.6",
               "merge_fraction": "<= 0.01", "teacher_memory_overhead": "<= 0.05",
               "second_copy_overhead": ""}
    print(f"\n{'ratio':<26}{'value':>10}   target (2-core CPU, tiny model)")
    for name, target in targets.items():
        print(f"{name:<26}{results[name]:>10.4f}   {target}")
    print(f"\nPPO epochs alone {results['seconds_ppo_update']:.2f} s, the teacher's KL pass "
          f"{results['seconds_teacher_kl']:.2f} s; "
          f"first |log ratio| {results['first_log_ratio_max']:.4f} "
          f"(clip {args.clip})")
    print(f"seconds per update: none {update_time['none']:.2f}, kl {update_time['kl']:.2f}, "
          f"sft {update_time['sft']:.2f}; per merge {merge_time:.4f}; "
          f"memory {results['memory_method']}; "
          f"{args.steps_per_update} env steps per update on {device}")
    return results


if __name__ == "__main__":
    # train.py's auto warm start too: a tiny model warm-starts, a real one does not.
    args = parse_dataclass(BenchArgs, sys.argv[1:], __doc__)
    check_args(args)
    if args.repeats <= 0:
        invalid("repeats", args.repeats, "positive")
    if args.peak_tflops < 0:
        invalid("peak_tflops", args.peak_tflops, "non-negative")
    main(resolve_warmup(args))
