"""Shared fixtures: the tiny offline VLM is built once per test session into a temp folder.

The `slow` marker is on tests that start processes (train.py, torchrun, the scripts) or train
for hundreds of steps: `pytest -m "not slow" tests` is the quick tier to run while editing.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes or trains at length (the quick "
                                       "tier is pytest -m 'not slow')")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folder holding the tiny model cache (seed0-112px/), shared by every test of the session."""
    return str(tmp_path_factory.mktemp("session") / "tiny-vlm")


@pytest.fixture(scope="session")
def make_policy(tiny_dir):
    """Factory for fresh policies on the tiny model (small LoRA rank keeps tests fast)."""
    import envs
    from plumbing.loader import load_policy
    from plumbing.tinyvlm import tiny_model

    def make(**kwargs):
        lora = dict(lora_r=8, lora_alpha=16, lora_dropout=0.0) | kwargs
        return load_policy(tiny_model(tiny_dir), envs.action_span, **lora)

    return make
