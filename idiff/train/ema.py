"""Exponential moving averages of the weights, one fp32 copy per rate."""

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, rates):
        self.names = [name for name, _ in model.named_parameters()]
        self.rates = list(rates)
        self.shadows = {rate: [p.detach().float().clone() for p in model.parameters()] for rate in self.rates}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.detach().float() for p in model.parameters()]
        for rate, shadow in self.shadows.items():
            torch._foreach_mul_(shadow, rate)
            torch._foreach_add_(shadow, params, alpha=1 - rate)

    def state_dict(self, rate) -> dict:
        """A model state dict (the parameters' names), as the original's ema_*.pt files hold."""
        return {name: t.detach().cpu().clone() for name, t in zip(self.names, self.shadows[rate])}

    def load_state_dict(self, rate, state: dict) -> None:
        for name, shadow in zip(self.names, self.shadows[rate]):
            shadow.copy_(state[name])
