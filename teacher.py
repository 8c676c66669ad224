"""The GTR-Turbo teacher: a merge of the agent's own past checkpoints, and how it guides PPO.

docs/ALGORITHM.md §4. The teacher is a second, frozen LoRA adapter ("teacher") on the policy's
own base model. Its whole life is here:
  start   pi_T^(0) = the policy RL starts from (the warm-started one)              (§4.1)
  merge   after an update k: pi_T^(k) = merge({pi^(k), pi_T^(k-1)}), TIES with
          EMA or SMA weights (merge.py); --merge-snapshot epoch: the update's 4
          epoch snapshots share pi^(k)'s weight (the reference's code);
          --merge-every 0: never                                                    (§4.1)
  guide   KL:  the teacher scores the agent's own thought tokens (forward passes only);
               the per-step KL estimate is subtracted from that step's advantage;
               an answer that does not parse gets KL 100, as in the reference   (§4.3)
          SFT: the teacher answers each observation whose agent answer parsed
               (resampled at rising temperatures until it parses); the agent's
               action replaces the teacher's, and PPO adds the NLL of the
               teacher's thoughts                                                   (§4.2)
          --guide-tokens all: the action tokens too (KL over every token; SFT on the
               teacher's whole answer, its own action kept), the paper's ablation   (§4.3)
  save / resume   its weights travel in the checkpoint as a peft adapter folder
          (plumbing/checkpoint.py saves it; `load` here reads it back).
The paper's static-teacher ablation: `--merge-every 0` keeps pi_T^(0), the warm start, for
the whole run. A fixed adapter (`--teacher FOLDER`) can stand in for the merged one too: GTR
with a local teacher.

The maths lives in torch-only files: merge.py (the operators), distill.py (the estimators
and losses). This file is what touches the model.

Use (train.py):
    teacher = Teacher(policy, args)        # attaches the adapter
    teacher.start(policy)                  # pi_T^(0)
    guidance = teacher.guide(policy, batch, game)     # after each rollout
    teacher.merge(policy, update, snapshots)  # after each update (snapshots: one per epoch)
    remember(replay, policy, batch.observations, guidance.sft_targets)   # --sft-batch replay:
    replay_loss(policy, [replay[i] for i in drawn], minibatch_size, args, logs)   # per micro-batch
"""

import os
import time
from dataclasses import dataclass

import torch

from distill import kl_estimate, replay_sft_loss, retry_temperatures
from merge import update_teacher


@dataclass
class TeacherConfig:
    """What the teacher reads of a run's settings, with train.py's defaults (config.py documents
    each flag of the same name). train.py passes its whole Args, which has these fields."""
    guidance: str = "kl"                # "kl" or "sft"
    teacher: str = ""                   # a fixed adapter folder instead of the merged teacher
    merge: str = "ties"                 # the merge operator (merge.py)
    merge_weights: str = "ema"          # ema or sma (merge.py:teacher_weights)
    ema_alpha: float = 0.5
    ties_density: float = 0.8
    merge_space: str = "factors"        # merge LoRA's factors or their product (merge.py)
    merge_every: int = 1                # merge every this many updates; 0: a static teacher
    seed: int = 0                       # seeds DARE's drops
    kl_estimator: str = "clip"          # distill.py:kl_estimate
    kl_temperature: float = 1.0         # both policies' scoring temperature for the KL
    unparsed_kl: float = 100.0          # KL_hat of an answer that does not parse
    guide_tokens: str = "thought"       # "thought" or "all"
    sft_unparsed: str = "none"          # "teacher": SFT targets for unparsed answers too
    temperature: float = 0.5            # the agent's sampling temperature
    teacher_temperature: float = 0.2    # the teacher's first SFT answer temperature
    sft_coef: float = 1.0               # the SFT replay loss's weight (replay_loss)
    max_new_tokens: int = 64
    micro_batch_size: int = 32          # the KL pass's batch
    num_envs: int = 8                   # the SFT answers' generate batch


@dataclass
class Guidance:
    """What the teacher says about one rollout ([T, N] tensors, lists flat in (t, n) order)."""
    teacher_kl: torch.Tensor        # per-step KL estimate (KL guidance; zeros under SFT)
    sft_targets: list | None        # T*N teacher answers as token ids, or None where none parsed
    parse_rate: float               # share of the teacher's answers that parsed, of those asked
                                    # (SFT)
    seconds: float
    samples: float = float("nan")   # teacher answers sampled per observation, retries included
                                    # (SFT)
    sft_tokens: list | None = None  # T*N: how many tokens of each answer the SFT loss imitates


class Teacher:
    """The teacher adapter of a guided run. `args`: a TeacherConfig, or any object with its
    fields (train.py's Args). `game` (guide's): an unwrapped environment with `read(text) ->
    (thoughts, action id)`, `answer(thoughts, action id)` and `actions` (envs/base.py)."""

    def __init__(self, policy, args):
        self.args = args
        self.fixed = bool(args.teacher)
        self.weights = None  # the merged teacher's adapter weights (peft keys); None if fixed
        self.merges = 0
        # Frozen, so `trainable` and DDP are unchanged. Its random LoRA init is overwritten by
        # start() or load(); it draws from a forked RNG so that attaching it changes no random
        # stream of the run (a resumed run attaches it after restoring its RNG).
        with torch.random.fork_rng(
                devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            policy.add_teacher(args.teacher or None)

    # ---- life: start, merge, save, resume ------------------------------------------------------
    def start(self, policy):
        """pi_T^(0): the merged teacher starts as the policy RL starts from."""
        if not self.fixed:
            self.weights = policy.adapter_state("policy")
            policy.load_adapter_state(self.weights, "teacher")

    def merge(self, policy, update, snapshots=()):
        """pi_T^(k) = merge({pi_theta^(k), pi_T^(k-1)}, {w_new, w_old}) in every --merge-every-th
        update (§4.1; never with --merge-every 0: the static teacher pi_T^(0)); k counts merges.
        train.py calls it after each update. `snapshots`: the policy adapter's states after
        each PPO epoch of this update (--merge-snapshot epoch, the reference's scheme): they
        share w_new, and the first such merge holds the snapshots alone, as the reference's
        does; otherwise the policy as it is now is the new checkpoint. Deterministic (DARE is
        seeded by the merge count), so every rank gets the same teacher. Returns the seconds it
        took (0 when it did not merge)."""
        a = self.args
        if self.fixed or not a.merge_every or update % a.merge_every:
            return 0.0
        start = time.perf_counter()
        self.merges += 1
        checkpoints = list(snapshots) or policy.adapter_state("policy")
        previous = None if snapshots and self.merges == 1 else self.weights
        # The reference's SMA counts loaded snapshots, 4 per update: merge k weighs the new ones
        # 1 / (k + 1) in all and the old teacher k / (k + 1), one merge ahead of SMA's 1 / k.
        k = self.merges + 1 if snapshots and a.merge_weights == "sma" else self.merges
        self.weights = update_teacher(previous, checkpoints, k, scheme=a.merge_weights,
                                      alpha=a.ema_alpha, method=a.merge, density=a.ties_density,
                                      seed=a.seed + self.merges, space=a.merge_space)
        policy.load_adapter_state(self.weights, "teacher")
        return time.perf_counter() - start

    def load(self, policy, adapters_folder, state):
        """Resume: the merged weights from the checkpoint's teacher adapter, and the counters."""
        from peft.utils import load_peft_weights
        self.merges = state["merges"]
        if not self.fixed:
            # To the CPU first: unmapped, peft puts the weights on a GPU whenever there is one,
            # and the merges would then mix devices on a --device cpu run.
            saved = load_peft_weights(os.path.join(adapters_folder, "teacher"), device="cpu")
            self.weights = {k: t.to(policy.device) for k, t in saved.items()}
            policy.load_adapter_state(self.weights, "teacher")

    # ---- guidance --------------------------------------------------------------------------------
    @torch.no_grad()
    def guide(self, policy, batch, game):
        """The teacher's guidance for one rollout; `game` (an unwrapped environment) parses
        answers."""
        start = time.perf_counter()
        shape = batch.old_logprobs.shape  # [T, N]
        kl, targets, sft_tokens = torch.zeros(shape), None, None
        parse_rate, samples = float("nan"), float("nan")
        if self.args.guidance == "kl":
            kl = self.kl_penalties(policy, batch).reshape(shape)
        else:
            targets, sampled, asked = self.sft_targets(policy, batch, game)
            parse_rate = sum(t is not None for t in targets) / asked if asked else float("nan")
            sft_tokens = [self.guided_tokens(policy, t) for t in targets]
            samples = sampled / len(targets)
        return Guidance(teacher_kl=kl, sft_targets=targets, sft_tokens=sft_tokens,
                        parse_rate=parse_rate, seconds=time.perf_counter() - start, samples=samples)

    def kl_temperature(self):
        """The temperature both policies are scored at for the KL (--kl-temperature; -1: the
        sampling temperature)."""
        a = self.args
        return a.temperature if a.kl_temperature < 0 else a.kl_temperature

    def guided_tokens(self, policy, target):
        """How many tokens of an SFT target (token ids or None) its loss imitates: the thought
        tokens, or all with --guide-tokens all."""
        if target is None:
            return 0
        if self.args.guide_tokens == "all":
            return len(target)
        return int(policy.masks(tuple(target.tolist()))[0].sum())

    def kl_penalties(self, policy, batch):
        """§4.3: per step, KL_hat = mean over thought tokens (every token with --guide-tokens
        all) of clip(log pi - log pi_T, 0, 10), pi_T's log-probs from teacher forward passes over
        the agent's OWN answers (no generation), --micro-batch-size at a time. Both policies are
        scored at --kl-temperature (1: raw logits, the reference's); the agent's log-probs there
        come from the rollout's own scoring pass (rollout.py, `kl_temperature`), so the agent is
        not scored again. A step whose answer does not parse gets KL_hat = --unparsed-kl (the
        reference's 100), not a score of its tokens. Returns [T*N]."""
        a = self.args
        temperature = self.kl_temperature()
        agent_logprobs = (batch.token_logprobs if temperature == a.temperature
                          else batch.kl_token_logprobs)  # T*N, per answer token
        if len(agent_logprobs) != len(batch.responses):
            raise ValueError(f"the rollout kept no log-probs at the KL's temperature {temperature}:"
                             " collect it with kl_temperature=teacher.kl_temperature()")
        kl = []
        for i in range(0, len(batch.responses), a.micro_batch_size):
            encoded = batch.encoded[i:i + a.micro_batch_size]
            responses = batch.responses[i:i + a.micro_batch_size]
            with policy.use_adapter("teacher"):
                teacher = policy(encoded, responses, temperature, value=False)
            width = teacher["logprobs"].shape[1]
            agent = torch.zeros_like(teacher["logprobs"])  # [B, width], right-aligned
            for row, logprobs in enumerate(agent_logprobs[i:i + len(responses)]):
                agent[row, width - len(logprobs):] = logprobs.to(agent.device)
            guided = teacher["response_mask"]  # [B, width]
            if a.guide_tokens == "thought":
                guided = guided & teacher["thought_mask"]
            kl.append(kl_estimate(agent, teacher["logprobs"], guided, a.kl_estimator).cpu())
        kl = torch.cat(kl)  # [T*N]
        if a.unparsed_kl > 0:
            parsed = batch.format_valid.flatten().bool()  # [T*N]
            kl = torch.where(parsed, kl, torch.full_like(kl, a.unparsed_kl))
        return kl

    def sft_targets(self, policy, batch, game):
        """§4.2: the teacher answers every observation of the rollout; an unparseable answer is
        resampled at rising temperatures (x1.1 up to 0.9, 20 tries) and dropped after the last.
        Sampled from the teacher's plain softmax at that temperature, without the reference's
        top-k 5 and repetition penalty 1.2, which tax the tokens a JSON answer repeats
        (docs/ALGORITHM.md §6). The agent's own action replaces the teacher's, so only the
        teacher's thoughts are imitated; with --guide-tokens all the teacher's own action stays:
        its whole answer is imitated. Where the agent's own answer did not parse there is no target
        and no teacher answer (the reference); --sft-unparsed teacher asks the teacher there too and
        substitutes the action that was played (a random one, or the teacher's own under
        --unparsed-action penalty).

        Retries are batched: a round samples each pending observation at its next few
        temperatures in one generate call (per-row temperatures) and keeps the lowest-temperature
        answer that parses. Samples are independent, so this gives the same answer distribution
        as trying one temperature after another, in far fewer model calls. Observations go in
        chunks of --num-envs, the rollout's own generate batch.

        Returns one target per observation (token ids of the answer, or None), the number of
        answers sampled, retries included (the cost), and the number of observations asked.
        """
        temperatures = retry_temperatures(self.args.teacher_temperature)
        actions = batch.actions.flatten().long().tolist()
        parsed = batch.format_valid.flatten().bool().tolist()
        # The reference gives an answer that does not parse no target (and asks no teacher).
        asked = [i for i in range(len(batch.encoded))
                 if parsed[i] or self.args.sft_unparsed == "teacher"]
        targets, sampled = [None] * len(batch.encoded), 0
        chunk = self.args.num_envs
        with policy.use_adapter("teacher"):
            for first in range(0, len(asked), chunk):
                pending, tried = asked[first:first + chunk], 0
                while pending and tried < len(temperatures):
                    # Fill about one batch of rows: pending observations x their next temperatures.
                    width = min(max(1, chunk // len(pending)), len(temperatures) - tried)
                    rows = [(i, temperatures[tried + j]) for i in pending for j in range(width)]
                    _, texts = policy.generate([batch.encoded[i] for i, _ in rows],
                                               [t for _, t in rows], self.args.max_new_tokens)
                    sampled += len(rows)
                    for (i, _), text in zip(rows, texts):  # rows of one i are in rising temperature
                        thoughts, teacher_action = game.read(text)
                        if targets[i] is not None or thoughts is None or teacher_action is None:
                            continue
                        # The teacher's own action stays with --guide-tokens all, and where the
                        # agent's unparsed answer named none (penalty mode).
                        keep_teacher = self.args.guide_tokens == "all" or actions[i] < 0
                        action = teacher_action if keep_teacher else actions[i]
                        targets[i] = policy.answer_ids(game.answer(thoughts, action))
                    pending = [i for i in pending if targets[i] is None]
                    tried += width
        return targets, sampled, len(asked)


# ---- the SFT replay (--sft-batch replay, the reference's; docs/ALGORITHM.md §4.2) ------------
def remember(replay, policy, observations, targets):
    """Add a rollout's steps to the SFT replay: ((frame, prompt), target) for a step with a
    target, the frame as the model reads it (a tiny model's 112 px, not the game's 300), and
    (None, None) for one without (it still counts in the loss's mean)."""
    for (frame, prompt), target in zip(observations, targets):
        replay.append(((policy.fitted(frame), prompt), target) if target is not None
                      else (None, None))


def replay_draws(size):
    """Indices into the SFT replay buffer, without replacement, reshuffled after every pass: the
    reference's sampler (one per PPO epoch)."""
    while True:
        yield from torch.randperm(size).tolist()


def replay_loss(policy, drawn, minibatch_size, args, logs):
    """--sft-batch replay (§4.2): backward of the reference's SFT loss on `drawn`, a
    micro-batch's share of ((frame, prompt), target) pairs from the replay buffer, encoded again
    and scored at temperature 1 on the bare policy (under DDP, called in `no_sync`: its gradient
    joins the PPO loss's all-reduce)."""
    pairs = [(observation, target) for observation, target in drawn if target is not None]
    if not pairs:  # drawn samples without a target count in the mean, and add nothing
        return
    encoded = policy.encode([frame for (frame, _), _ in pairs],
                            [prompt for (_, prompt), _ in pairs])
    out = policy(encoded, [target for _, target in pairs], 1.0, value=False)
    guided = out["response_mask"] if args.guide_tokens == "all" else out["thought_mask"]
    loss = replay_sft_loss(out["logprobs"], guided, minibatch_size)
    (args.sft_coef * loss).backward()
    logs["sft_loss"].append(loss.item() * minibatch_size / len(pairs))  # per drawn target
