"""Which code made a run: a digest of the files that shape training, and the git commit.

Every run's config.json records both (plumbing/report.py), so a table can tell runs of the
current code from runs of an older one: scripts/compare.py retrains a warm start (and reruns
the runs that start from it) whose digest is not the current code's, so no table pairs an RL
run of one version with a warm start of another.

    code_version()   # {"code_digest": "3f2a...", "commit": "9cc833b..." or None}
"""

import hashlib
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The folders whose Python files shape what a run computes (tests and scripts do not).
TRAINING_FOLDERS = ("", "envs", "plumbing")


def code_digest():
    """SHA-256 over the Python files of TRAINING_FOLDERS, by name and content."""
    digest = hashlib.sha256()
    for folder in TRAINING_FOLDERS:
        path = os.path.join(ROOT, folder)
        for name in sorted(os.listdir(path)):
            if name.endswith(".py"):
                digest.update(os.path.join(folder, name).encode())
                with open(os.path.join(path, name), "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def code_version():
    """The code digest and, where the files are a git checkout, its commit (None elsewhere;
    the digest is what decides)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"code_digest": code_digest(), "commit": commit}
