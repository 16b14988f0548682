"""What a client's group reply releases of its users' mixtures (privacy.mixtures), decided here only:

  share   the users' mixtures (shuffled, no ids) and the routing mass, as computed
  noise   each mixture value plus Gaussian noise of std privacy.mixture_noise; the reply's examples
          for every expert in place of the routing mass
  local   no mixtures (the constraint loss keeps to this client's own users); examples for the mass

The mass of a one-user client, normalised per layer, is that user's mixture: sent under noise or
local it would hand the server what those options keep back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig


@dataclass(frozen=True)
class Release:
    how: str                    # privacy.mixtures
    noise_std: float            # privacy.mixture_noise
    noise_seed: int | None      # privacy.dp.seed: reproducible noise; None: fresh noise
    client_seed: int            # the client's seed (ClientTrainer.seed)

    @classmethod
    def of(cls, cfg: DictConfig, client_seed: int) -> Release:
        p = cfg.privacy
        return cls(str(p.mixtures), float(p.mixture_noise), None if p.dp.seed is None else int(p.dp.seed),
                   client_seed)

    @property
    def sends_mixtures(self) -> bool:
        return self.how != "local"

    def mass(self, mass: torch.Tensor, num_examples: int) -> torch.Tensor:
        """What the reply carries as the group average's per-expert weights."""
        if self.how == "share":
            return mass
        return torch.full_like(mass, float(num_examples))

    def mixtures(self, mixtures: torch.Tensor, server_round: int) -> torch.Tensor:
        """What the reply carries of the users' mixtures."""
        if self.how == "local":
            return mixtures[:0]
        if self.how == "noise" and len(mixtures):
            gen = torch.Generator()
            if self.noise_seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.noise_seed * 1_000_003 + self.client_seed * 7919 + server_round)
            return mixtures + self.noise_std * torch.randn(mixtures.shape, generator=gen, dtype=mixtures.dtype)
        return mixtures
