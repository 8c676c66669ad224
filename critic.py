"""The critic's value head: an MLP on the last prompt token's hidden state (docs/ALGORITHM.md §3).

hidden -> 1024 -> 512 -> 1, as in the reference, kept in float32 whatever the backbone's dtype.
With --value-norm the head regresses returns normalised by their running mean and variance, so
EZPoints' returns of +10 and NumberLine's of +-1 are the same regression; the statistics are
buffers, saved and loaded with the head's weights. What the head reads (the policy's state, a
stop-gradient copy of it, or the critic's own adapter) is policy.py's `ActorCritic.value`.

Usage:
    head = ValueHead(hidden)
    head.update(mean, var, count)                 # a batch's return statistics, once per update
    values = head.denormalize(head(states).squeeze(-1))
    loss = ((head.normalize(values) - head.normalize(returns)) ** 2).mean()
"""
import torch
import torch.nn as nn


EPS = 1e-8  # added to the running variance of the returns before its square root


class ValueHead(nn.Sequential):
    """The MLP, with the running mean, variance and count of the returns it regresses."""

    def __init__(self, hidden):
        super().__init__(nn.Linear(hidden, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(),
                         nn.Linear(512, 1))
        self.register_buffer("return_mean", torch.zeros(()))
        self.register_buffer("return_var", torch.ones(()))
        self.register_buffer("return_count", torch.zeros(()))

    def normalize(self, values):
        """(V - mean) / std of the running return statistics: the regression's scale. The
        standard deviation has a floor (EPS), so returns that are all equal give finite values."""
        return (values - self.return_mean) / self.std()

    def denormalize(self, normalized):
        return normalized * self.std() + self.return_mean

    def std(self):
        return (self.return_var + EPS).sqrt()

    @torch.no_grad()
    def update(self, mean, var, count):
        """Merge one batch's return statistics (its mean, variance and size) into the running
        ones (Chan et al.'s parallel update)."""
        old_mean, old_var = self.return_mean.double(), self.return_var.double()
        old_count = self.return_count.double()
        total = old_count + count
        delta = mean - old_mean
        self.return_var.copy_((old_var * old_count + var * count
                               + delta ** 2 * old_count * count / total) / total)
        self.return_mean.copy_(old_mean + delta * count / total)
        self.return_count.copy_(total)
