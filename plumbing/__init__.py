"""What runs around the algorithm: loading a checkpoint as the actor-critic (loader.py), the tiny
offline models (tinyvlm.py), checkpoints and resume (checkpoint.py), what a run reports
(report.py), command-line flags (flags.py) and the process group (distributed.py)."""
