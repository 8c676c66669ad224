"""Multi-turn rollouts: N environments stepped in lockstep by ONE batched model call per step.

docs/ALGORITHM.md §3 (RL4VLM): every step the VLM reads each environment's image and prompt,
answers with `{"thoughts": ..., "action": ...}`, and the parsed action moves that environment.
The reference generates for one environment at a time; here all N observations of a step go
through one `generate` and one scoring pass, which is what makes rollouts fast (scripts/bench.py).

This is plain RL4VLM: no teacher. Per step and environment the rollout keeps what PPO
(ppo.py) and, in GTR-Turbo, the teacher (teacher.py) need: the encoded observation, the
response tokens with their per-token and lambda-weighted log-probs, the value, the reward and
termination flags, the format reward, the played action, the mean token entropy and the
thought length; for the thought-collapse measures (docs/ALGORITHM.md §4.5), the answer's text
and the facts of the state it replied to; where the environment judges commands (Household,
ALFWorld), whether the answer named an admissible one. Finished episodes are recorded with their
return, length, success and, there, their number of admissible commands.

It imports torch, numpy and gymnasium. What it needs of the caller: environments with an
`unwrapped` that has `read(text) -> (thoughts, action id)` (None where the answer has none),
`actions`, `prompt()`, `facts()` and `invalid_step()` (envs/base.py), and a policy with
`encode`, `generate` and a forward pass that scores answers (policy.py:ActorCritic).

Use (`import envs` registers the games):
    games = [gym.make("gtr/NumberLine-v0") for _ in range(8)]
    runner = Rollout(games, seed=0)
    batch = runner.collect(policy, steps=8, temperature=0.2, max_new_tokens=64)
"""

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch



@dataclass
class Batch:
    """One rollout of `steps` x `num_envs`; tensors are [T, N], lists are flat in (t, n) order."""
    encoded: list                 # T*N model inputs: prompt ids and the image as pixel patches
    responses: list               # T*N response token ids
    token_logprobs: list          # T*N per-token log-probs of the responses at sampling time
    old_logprobs: torch.Tensor    # lambda-weighted sequence log-prob at sampling time
    values: torch.Tensor          # V(s_t)
    next_values: torch.Tensor     # V(s_{t+1}) of the true next state (see ppo.gae)
    rewards: torch.Tensor         # environment rewards
    format_rewards: torch.Tensor  # docs/ALGORITHM.md §3: +3 parsed / -2 not, added after GAE
    terminated: torch.Tensor
    truncated: torch.Tensor
    format_valid: torch.Tensor    # the answer parsed into "thoughts" and a legal "action"
    actions: torch.Tensor         # the action played (random for an unparsed answer, see _act)
    entropy: torch.Tensor         # mean per-token entropy of the response
    thought_tokens: torch.Tensor  # length of the thought part in tokens
    opening_prob: torch.Tensor | None = None  # P(the format's first token) as the first answer
                                              # token
    admissible: torch.Tensor | None = None  # the answer named an admissible command; NaN where
                                            # the environment does not judge commands
    episodes: list = field(default_factory=list)  # finished episodes: return, length, success
    texts: list = field(default_factory=list)     # T*N answers as sampled (decoded)
    facts: list = field(default_factory=list)     # T*N facts() of the state each answer replied to
    kl_token_logprobs: list = field(default_factory=list)  # T*N per-token log-probs at the
                                  # teacher KL's temperature (collect's kl_temperature), or empty
    observations: list = field(default_factory=list)  # T*N (frame, prompt) each answer replied
                                  # to: 8-bit pixels, smaller to keep than `encoded` (SFT replay)


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
        self.episode_admissible = np.zeros(len(envs), dtype=int)  # answers naming one
        self.episodes = []  # finished episodes since the last collect

    def _act(self, i, text):
        """Step env i with the answer `text`; returns (step result, parsed?, action played,
        admissible?). Admissible is None where the environment does not judge commands (its info
        has no "admissible"), and False for an answer that named no command."""
        env = self.envs[i].unwrapped
        thoughts, action = env.read(text)
        parsed = action is not None and thoughts is not None
        named = action is not None
        if action is None and self.unparsed_action == "penalty":
            # The environment's own penalty for a non-move (see each env's invalid_step).
            action, result = -1, env.invalid_step()
        else:
            if action is None:
                # The reference plays a uniformly random action: the episode goes on and the
                # environment's own reward judges the move; the format penalty marks the answer.
                action = int(self.rng.integers(len(env.actions)))
            result = self.envs[i].step(action)
        admissible = None
        if "admissible" in result[4]:
            admissible = named and result[4]["admissible"]
        return result, parsed, action, admissible

    def step(self, texts, active=None):
        """Play one answer per (active) environment; finished episodes are recorded and reset.

        Returns one dict per played env: reward, terminated, truncated, parsed, action,
        admissible (see _act) and, for an episode cut by truncation, `final_obs` (its last
        observation, to bootstrap from).
        """
        results = []
        for i, text in zip(active if active is not None else range(len(self.envs)), texts):
            step, parsed, action, admissible = self._act(i, text)
            obs, reward, terminated, truncated, info = step
            result = {"reward": reward, "terminated": terminated, "truncated": truncated,
                      "parsed": parsed, "action": action, "admissible": admissible}
            self.episode_return[i] += reward
            self.episode_length[i] += 1
            self.episode_admissible[i] += bool(admissible)
            if terminated or truncated:
                if truncated and not terminated:
                    result["final_obs"] = (obs, self.envs[i].unwrapped.prompt())
                episode = {"return": float(self.episode_return[i]),
                           "length": int(self.episode_length[i]),
                           "success": bool(info.get("success", False))}
                if admissible is not None:
                    episode["admissible_steps"] = int(self.episode_admissible[i])
                self.episodes.append(episode)
                self.episode_return[i], self.episode_length[i] = 0.0, 0
                self.episode_admissible[i] = 0
                obs, _ = self.envs[i].reset()
            self.obs[i] = obs
            results.append(result)
        return results

    def prompts(self, active=None):
        """The current prompt of every (active) environment."""
        return [self.envs[i].unwrapped.prompt()
                for i in (active if active is not None else range(len(self.envs)))]

    def collect(self, policy, steps, temperature=0.2, max_new_tokens=256, format_reward=3.0,
                format_penalty=-2.0, kl_temperature=None):
        """Play `steps` lockstep steps; returns a Batch of steps x num_envs. `kl_temperature`:
        also keep each answer's per-token log-probs at that temperature, from the same scoring
        pass (the teacher's KL compares the policy with the teacher there, teacher.py)."""
        def zeros():
            return torch.zeros(steps, len(self.envs))  # [T, N]

        out = Batch(encoded=[], responses=[], token_logprobs=[], old_logprobs=zeros(),
                    values=zeros(), next_values=zeros(), rewards=zeros(), format_rewards=zeros(),
                    terminated=zeros(), truncated=zeros(), format_valid=zeros(), actions=zeros(),
                    entropy=zeros(), opening_prob=zeros(), thought_tokens=zeros(),
                    admissible=torch.full((steps, len(self.envs)), float("nan")))
        self.episodes = []
        bootstrap = {}  # (t, i) -> encoded final observation of an episode truncated at step t
        for t in range(steps):
            prompts = self.prompts()
            encoded = policy.encode(self.obs, prompts)
            out.observations += list(zip(self.obs, prompts))
            responses, texts = policy.generate(encoded, temperature, max_new_tokens)
            with torch.no_grad():
                scored = policy(encoded, responses, temperature, extra_temperature=kl_temperature)
            mask = scored["response_mask"]  # [N, width], right-aligned
            out.old_logprobs[t] = scored["seq_logprob"].cpu()
            out.values[t] = scored["value"].float().cpu()
            entropy = (scored["entropy"] * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [N]
            out.entropy[t] = entropy.cpu()  # the mean over each answer's tokens
            if "opening_logprob" in scored:
                out.opening_prob[t] = scored["opening_logprob"].exp().cpu()
            out.thought_tokens[t] = (scored["thought_mask"] & mask).sum(-1).float().cpu()
            out.encoded += encoded
            out.responses += responses
            out.texts += texts
            # before the step below changes the state
            out.facts += [env.unwrapped.facts() for env in self.envs]
            out.token_logprobs += [row[row.shape[0] - len(r):].cpu()
                                   for row, r in zip(scored["logprobs"], responses)]
            if kl_temperature is not None:
                out.kl_token_logprobs += [row[row.shape[0] - len(r):].cpu()
                                          for row, r in zip(scored["extra_logprobs"], responses)]

            for i, result in enumerate(self.step(texts)):
                out.rewards[t, i], out.actions[t, i] = result["reward"], result["action"]
                out.terminated[t, i] = result["terminated"]
                out.truncated[t, i] = result["truncated"]
                out.format_valid[t, i] = result["parsed"]
                if result["admissible"] is not None:
                    out.admissible[t, i] = result["admissible"]
                out.format_rewards[t, i] = format_reward if result["parsed"] else format_penalty
                if "final_obs" in result:
                    final_obs, final_prompt = result["final_obs"]
                    bootstrap[(t, i)] = policy.encode([final_obs], [final_prompt])[0]

        # V(s_{t+1}): the next step's value, or a fresh evaluation where that is not the true
        # next state (after a truncation, and after the last step of the rollout).
        with torch.no_grad():
            out.next_values[:-1] = out.values[1:]
            out.next_values[-1] = policy.value(
                policy.encode(self.obs, self.prompts())).float().cpu()
            if bootstrap:
                values = policy.value(list(bootstrap.values())).float().cpu()
                for (t, i), v in zip(bootstrap, values):
                    out.next_values[t, i] = v
        out.episodes = self.episodes
        return out


def evaluate(policy, env_id, episodes, num_envs, seed, temperature=0.0, max_new_tokens=256,
             unparsed_action="random"):
    """Play `episodes` fresh episodes of `env_id` with up to `num_envs` environments in lockstep
    (env i reset with seed + i); temperature 0 is greedy. Returns the episode dicts. `env_id`
    is a registered gymnasium id (`import envs` registers this repository's games).

    Each environment plays a fixed share of the episodes, so short episodes are not favoured by
    whichever environments finish first. Sampling draws from its own generator, seeded by
    `seed`, so evaluating in the middle of training does not change the training run.
    """
    if episodes <= 0:
        return []
    policy.eval()
    envs = [gym.make(env_id) for _ in range(min(num_envs, episodes))]
    quota = [len(range(i, episodes, len(envs))) for i in range(len(envs))]
    runner = Rollout(envs, seed=seed, unparsed_action=unparsed_action)
    with torch.random.fork_rng(
            devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        while any(q > 0 for q in quota):
            active = [i for i, q in enumerate(quota) if q > 0]
            encoded = policy.encode([runner.obs[i] for i in active], runner.prompts(active))
            _, texts = policy.generate(encoded, temperature, max_new_tokens)
            for i, result in zip(active, runner.step(texts, active)):
                quota[i] -= result["terminated"] or result["truncated"]
    return runner.episodes
