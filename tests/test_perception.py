"""The policy reads the image: after a warm start, shuffling the images among observations
drops its action accuracy (a policy that learned only the answer format would not care)."""
import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401  (registers the environments)

pytestmark = pytest.mark.slow  # warm starts of hundreds of steps


def held_out_states(n, seed=123):
    """n NumberLine states (image, prompt, expert action) with fresh seeds."""
    env = gym.make("gtr/NumberLine-v0").unwrapped
    states = []
    for i in range(n):
        obs, _ = env.reset(seed=seed + i)
        states.append((obs, env.prompt(), env.expert()[1]))
    return states


def action_accuracy(policy, game, images, prompts, actions):
    """Share of greedy answers that name the expert's action."""
    with torch.no_grad():
        _, texts = policy.generate(policy.encode(images, prompts), temperature=0.0,
                                   max_new_tokens=32)
    return float(np.mean([game.parse(t) == a for t, a in zip(texts, actions)]))


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: on one thread every sum is taken in the same order,
    whatever OMP_NUM_THREADS says."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_warm_started_policy_reads_the_image(make_policy, one_thread):
    from config import Args
    from demonstrations import warm_start
    torch.manual_seed(0)
    policy = make_policy(lora_r=128, lora_alpha=256, lora_dropout=0.05)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    # NumberLine's warm start: on until its held-out loss says it reads the picture (warm starts
    # begin to read the digits after 200 to more than 500 steps, by seed and by rounding).
    args = Args(warmup_sft_steps=1000, warmup_target_loss=0.05, warmup_batch_size=32,
                micro_batch_size=32, seed=0)
    warm_start(policy, policy, trainable, args, rank=0, world=1)
    policy.eval()
    game = gym.make("gtr/NumberLine-v0").unwrapped
    images, prompts, actions = zip(*held_out_states(96))
    # The same prompts and expert actions, with each state's image replaced by another state's.
    shuffled = [images[i] for i in np.random.default_rng(0).permutation(len(images))]
    seen = action_accuracy(policy, game, images, prompts, actions)
    blind = action_accuracy(policy, game, shuffled, prompts, actions)
    print(f"action accuracy: own images {seen:.3f}, shuffled images {blind:.3f}")
    assert seen >= 0.75 and seen - blind >= 0.2, (seen, blind)

