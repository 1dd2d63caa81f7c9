"""Gaussian MLP policy used functionally (a dict of tensors per call), as in MAML-RL."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

Params = Mapping[str, Tensor]


class GaussianMLPPolicy(nn.Module):
    """π(a|s) = N(MLP(s), diag(exp(log_std))²): ReLU MLP mean, learned state-independent log-std.

    Every method takes an optional `params` dict (names as in `named_parameters()`); when given,
    the module is evaluated with those tensors through `torch.func.functional_call`, so adapted
    parameters, sampled Bayesian weights θ or batched parameters under `torch.func.vmap` all work.
    The layers start as nn.Linear's do, drawn from `generator` (None: torch's global stream).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (100, 100),
                 init_log_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if obs_dim < 1 or act_dim < 1:
            raise ValueError(f"GaussianMLPPolicy: obs_dim and act_dim must be >= 1, got {obs_dim}, {act_dim}")
        self.obs_dim, self.act_dim, self.hidden = int(obs_dim), int(act_dim), tuple(int(h) for h in hidden)
        layers: list[nn.Module] = []
        last = self.obs_dim
        for h in self.hidden:
            layers += [_linear(last, h, generator), nn.ReLU()]
            last = h
        layers.append(_linear(last, self.act_dim, generator))
        self.mean = nn.Sequential(*layers)
        self.log_std = nn.Parameter(torch.full((self.act_dim,), float(init_log_std)))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Mean [..., act_dim] and log-std broadcast to the same shape."""
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"GaussianMLPPolicy: obs last dim must be {self.obs_dim}, got {tuple(obs.shape)}")
        mean = self.mean(obs)
        return mean, self.log_std.expand_as(mean)

    def params(self) -> dict[str, Tensor]:
        """The module's own parameters as a functional dict."""
        return dict(self.named_parameters())

    def mean_log_std(self, obs: Tensor, params: Params | None = None) -> tuple[Tensor, Tensor]:
        if params is None:
            return self(obs)
        return functional_call(self, dict(params), (obs,))

    def log_prob(self, obs: Tensor, actions: Tensor, params: Params | None = None) -> Tensor:
        """log π(a|s) summed over action dimensions: shape obs.shape[:-1]."""
        mean, log_std = self.mean_log_std(obs, params)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z.pow(2) - log_std - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=z.dtype))).sum(-1)

    def entropy(self, obs: Tensor, params: Params | None = None) -> Tensor:
        """Differential entropy summed over action dimensions: shape obs.shape[:-1]."""
        _, log_std = self.mean_log_std(obs, params)
        return (log_std + 0.5 * (1.0 + torch.log(torch.tensor(2 * torch.pi, dtype=log_std.dtype)))).sum(-1)

    @torch.no_grad()
    def act(self, obs: Tensor, params: Params | None = None, generator: torch.Generator | None = None,
            deterministic: bool = False) -> Tensor:
        """Sample a ~ π(·|s) (or the mean when deterministic) without building a graph."""
        mean, log_std = self.mean_log_std(obs, params)
        if deterministic:
            return mean
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + torch.exp(log_std) * eps


def _linear(n_in: int, n_out: int, generator: torch.Generator | None) -> nn.Linear:
    """nn.Linear with its own initialisation (weight, then bias) drawn from `generator`: the same
    numbers nn.Linear draws from the global stream when both are seeded alike."""
    layer = nn.utils.skip_init(nn.Linear, n_in, n_out)  # allocated without drawing
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    nn.init.uniform_(layer.bias, -1 / math.sqrt(n_in), 1 / math.sqrt(n_in), generator=generator)
    return layer


def gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> Tensor:
    """KL(N_p ‖ N_q) between diagonal Gaussians, summed over the last dimension."""
    var_p, var_q = torch.exp(2 * log_std_p), torch.exp(2 * log_std_q)
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q).pow(2)) / (2 * var_q) - 0.5).sum(-1)
