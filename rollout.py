"""Multi-turn rollouts: N environments stepped in lockstep by ONE batched model call per step.

PAPER.md §3 (RL4VLM): every step the VLM reads each environment's image and prompt, answers
with `{"thoughts": ..., "action": ...}`, and the parsed action moves that environment. The
reference generates for one environment at a time; here all N observations of a step go
through one `generate` and one scoring pass, which is what makes rollouts fast (bench.py).

Per step and environment the rollout keeps what PPO (ppo.py) and the teacher guidance
(distill.py) need: the encoded observation, the response tokens, the old lambda-weighted
log-prob and the value, reward and termination flags, whether the answer parsed, the played
action, the mean token entropy and thought length, and with guidance the teacher's KL estimate
(`--guidance kl`, PAPER.md §4.3) or the teacher's answer for SFT (`--guidance sft`, §4.2).

Use:
    envs = [gym.make("gtr/NumberLine-v0") for _ in range(8)]
    runner = Rollout(envs, seed=0)
    batch = runner.collect(policy, steps=8, temperature=0.2, max_new_tokens=64)
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

import envs as gtr_envs
from distill import kl_estimate, masked_mean, retry_temperatures


@dataclass
class Batch:
    """One rollout of `steps` x `num_envs`; tensors are [T, N], lists are flat in (t, n) order."""
    prompts: list                 # T*N prompt texts
    encoded: list                 # T*N model inputs: prompt ids and the image as pixel patches
    responses: list               # T*N response token ids
    old_logprobs: torch.Tensor    # lambda-weighted sequence log-prob at sampling time
    values: torch.Tensor          # V(s_t)
    next_values: torch.Tensor     # V(s_{t+1}) of the true next state (see ppo.gae)
    rewards: torch.Tensor         # environment rewards
    format_rewards: torch.Tensor  # PAPER.md §3: +3 parsed / -2 not, added after GAE
    terminated: torch.Tensor
    truncated: torch.Tensor
    format_valid: torch.Tensor    # the answer parsed into "thoughts" and a legal "action"
    actions: torch.Tensor         # the action played (random for an unparsed answer, see below)
    entropy: torch.Tensor         # mean per-token entropy of the response
    thought_tokens: torch.Tensor  # length of the thought part in tokens
    teacher_kl: torch.Tensor      # per-step KL estimate to the teacher (zeros without KL guidance)
    sft_targets: list = field(default_factory=list)  # T*N teacher answers (token ids) or None
    teacher_parse_rate: float = float("nan")
    episodes: list = field(default_factory=list)     # finished episodes: return, length, success
    time_teacher: float = 0.0


class Rollout:
    """N environments that persist across updates (episodes continue over update boundaries)."""

    def __init__(self, envs, seed=0, unparsed_action="random"):
        self.envs = envs
        self.unparsed_action = unparsed_action
        self.rng = np.random.default_rng(seed)
        # Distinct seeds per environment; later resets draw from each env's own np_random.
        self.obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
        self.episode_return = np.zeros(len(envs))
        self.episode_length = np.zeros(len(envs), dtype=int)
        self.episodes = []  # finished episodes since the last collect

    def _act(self, i, text):
        """Step env i with the answer `text`; returns (step result, parsed?, action played)."""
        env = self.envs[i].unwrapped
        action = env.parse(text)
        parsed = action is not None and gtr_envs.extract_thoughts(text) is not None
        if action is None:
            if self.unparsed_action == "penalty":
                # The environment's own penalty for a non-move (see each env's invalid_step).
                return env.invalid_step(), parsed, -1
            # The reference plays a uniformly random action: the episode goes on and the
            # environment's own reward judges the move; the format penalty marks the answer.
            action = int(self.rng.integers(len(env.actions)))
        return self.envs[i].step(action), parsed, action

    def step(self, texts, active=None):
        """Play one answer per (active) environment; finished episodes are recorded and reset.

        Returns one dict per played env: reward, terminated, truncated, parsed, action and, for
        an episode cut by truncation, `final_obs` (its last observation, to bootstrap from).
        """
        results = []
        for i, text in zip(active if active is not None else range(len(self.envs)), texts):
            (obs, reward, terminated, truncated, info), parsed, action = self._act(i, text)
            result = {"reward": reward, "terminated": terminated, "truncated": truncated,
                      "parsed": parsed, "action": action}
            self.episode_return[i] += reward
            self.episode_length[i] += 1
            if terminated or truncated:
                if truncated and not terminated:
                    result["final_obs"] = (obs, self.envs[i].unwrapped.prompt())
                self.episodes.append({"return": float(self.episode_return[i]),
                                      "length": int(self.episode_length[i]),
                                      "success": bool(info.get("success", False))})
                self.episode_return[i], self.episode_length[i] = 0.0, 0
                obs, _ = self.envs[i].reset()
            self.obs[i] = obs
            results.append(result)
        return results

    def prompts(self, active=None):
        """The current prompt of every (active) environment."""
        return [self.envs[i].unwrapped.prompt() for i in (active if active is not None else range(len(self.envs)))]

    def collect(self, policy, steps, temperature=0.2, max_new_tokens=256, guidance="none",
                format_reward=(3.0, -2.0), kl_estimator="clip"):
        zeros = lambda: torch.zeros(steps, len(self.envs))  # [T, N]
        out = Batch(prompts=[], encoded=[], responses=[], old_logprobs=zeros(), values=zeros(),
                    next_values=zeros(), rewards=zeros(), format_rewards=zeros(), terminated=zeros(),
                    truncated=zeros(), format_valid=zeros(), actions=zeros(), entropy=zeros(),
                    thought_tokens=zeros(), teacher_kl=zeros())
        self.episodes = []
        teacher_answers = teacher_parsed = 0
        bootstrap = {}  # (t, i) -> encoded final observation of an episode truncated at step t
        for t in range(steps):
            prompts = self.prompts()
            encoded = policy.encode(self.obs, prompts)
            responses, texts = policy.generate(encoded, temperature, max_new_tokens)
            with torch.no_grad():
                scored = policy(encoded, responses, temperature)
                if guidance == "kl":
                    # PAPER.md §4.3: the teacher scores the agent's OWN thought tokens (one batched
                    # forward pass with the teacher adapter, no generation).
                    start = time.perf_counter()
                    with policy.use_adapter("teacher"):
                        teacher = policy(encoded, responses, temperature)
                    out.teacher_kl[t] = kl_estimate(scored["logprobs"], teacher["logprobs"],
                                                    scored["thought_mask"] & scored["response_mask"],
                                                    kl_estimator).cpu()
                    out.time_teacher += time.perf_counter() - start
            mask = scored["response_mask"]
            out.old_logprobs[t] = scored["seq_logprob"].cpu()
            out.values[t] = scored["value"].float().cpu()
            out.entropy[t] = masked_mean(scored["entropy"], mask).cpu()
            out.thought_tokens[t] = (scored["thought_mask"] & mask).sum(-1).float().cpu()
            out.prompts += prompts
            out.encoded += encoded
            out.responses += responses

            for i, result in enumerate(self.step(texts)):
                out.rewards[t, i], out.actions[t, i] = result["reward"], result["action"]
                out.terminated[t, i], out.truncated[t, i] = result["terminated"], result["truncated"]
                out.format_valid[t, i] = result["parsed"]
                out.format_rewards[t, i] = format_reward[0] if result["parsed"] else format_reward[1]
                if "final_obs" in result:
                    final_obs, final_prompt = result["final_obs"]
                    bootstrap[(t, i)] = policy.encode([final_obs], [final_prompt])[0]

            if guidance == "sft":
                start = time.perf_counter()
                targets, parsed = self.teacher_answers(policy, encoded, out.actions[t], max_new_tokens)
                out.sft_targets += targets
                teacher_answers += len(targets)
                teacher_parsed += parsed
                out.time_teacher += time.perf_counter() - start

        # V(s_{t+1}): the next step's value, or a fresh evaluation where that is not the true
        # next state (after a truncation, and after the last step of the rollout).
        with torch.no_grad():
            out.next_values[:-1] = out.values[1:]
            out.next_values[-1] = policy.value(policy.encode(self.obs, self.prompts())).float().cpu()
            if bootstrap:
                values = policy.value(list(bootstrap.values())).float().cpu()
                for (t, i), v in zip(bootstrap, values):
                    out.next_values[t, i] = v
        out.episodes = self.episodes
        if guidance == "sft":
            out.teacher_parse_rate = teacher_parsed / max(teacher_answers, 1)
        return out

    def teacher_answers(self, policy, encoded, actions, max_new_tokens):
        """PAPER.md §4.2: the teacher answers the step's observations; an unparseable answer is
        resampled at rising temperatures (x1.1 up to 0.9, 20 tries) and dropped after the last.
        The agent's own action replaces the teacher's, so only the teacher's thoughts are imitated.

        Retries are batched: a round samples each pending observation at its next few
        temperatures in one generate call (per-row temperatures) and keeps the lowest-temperature
        answer that parses. Samples are independent, so this gives the same answer distribution
        as trying one temperature after another, in far fewer model calls.

        Returns (one target per environment: token ids of the answer, or None; count parsed).
        """
        temperatures = retry_temperatures()
        targets = [None] * len(encoded)
        pending, tried = list(range(len(encoded))), 0
        with policy.use_adapter("teacher"):
            while pending and tried < len(temperatures):
                # Fill about one batch of rows: pending observations x their next temperatures.
                width = min(max(1, len(encoded) // len(pending)), len(temperatures) - tried)
                rows = [(i, temperatures[tried + j]) for i in pending for j in range(width)]
                _, texts = policy.generate([encoded[i] for i, _ in rows], [t for _, t in rows], max_new_tokens)
                for (i, _), text in zip(rows, texts):  # rows of one i are in rising temperature
                    env = self.envs[i].unwrapped
                    thoughts, teacher_action = gtr_envs.extract_thoughts(text), env.parse(text)
                    if targets[i] is not None or thoughts is None or teacher_action is None:
                        continue
                    action = int(actions[i])
                    # An unparsed agent answer named no action (penalty mode): keep the teacher's.
                    played = env.actions[action if action >= 0 else teacher_action]
                    targets[i] = policy.answer_ids(gtr_envs.format_answer(thoughts, played))
                pending = [i for i in pending if targets[i] is None]
                tried += width
        return targets, len(encoded) - len(pending)


def evaluate(policy, envs, episodes, seed, temperature=0.0, max_new_tokens=256, unparsed_action="random"):
    """Play `episodes` fresh episodes with the environments in lockstep (env i reset with seed + i).

    Each environment plays a fixed share of the episodes, so short episodes are not favoured by
    whichever environments finish first. temperature 0 is greedy. Returns the episode dicts.
    """
    quota = [len(range(i, episodes, len(envs))) for i in range(len(envs))]
    runner = Rollout(envs, seed=seed, unparsed_action=unparsed_action)
    while any(q > 0 for q in quota):
        active = [i for i, q in enumerate(quota) if q > 0]
        encoded = policy.encode([runner.obs[i] for i in active], runner.prompts(active))
        _, texts = policy.generate(encoded, temperature, max_new_tokens)
        for i, result in zip(active, runner.step(texts, active)):
            quota[i] -= result["terminated"] or result["truncated"]
    return runner.episodes


def expert_demonstrations(envs, rng, explore=0.2):
    """An endless stream of (observation, prompt, expert answer) from the environments' `expert()`.

    The environments follow the expert, with a random action `explore` of the time so that the
    demonstrations also cover states an imperfect agent reaches (the expert then shows how to
    recover). Episodes continue from one batch to the next, so late states (a long Points24
    formula) are shown as often as early ones. Used for the SFT warm start: the paper starts RL
    from an SFT checkpoint. Take a batch with `itertools.islice(stream, n)`.
    """
    observations = [env.reset(seed=int(rng.integers(2**31)))[0] for env in envs]
    while True:
        for i, env in enumerate(envs):
            game = env.unwrapped
            thoughts, action = game.expert()
            yield observations[i], game.prompt(), gtr_envs.format_answer(thoughts, game.actions[action])
            if rng.random() < explore:
                action = int(rng.integers(len(game.actions)))
            observations[i], _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                observations[i], _ = env.reset(seed=int(rng.integers(2**31)))
