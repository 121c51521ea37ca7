"""KE's hypernetwork (De Cao et al. 2021, §3): an LSTM encoding of the fact, and per edited weight the heads that
predict the constrained update `ΔW = −s · σ(η) · (σ(α) γᵀ ⊙ ∇W + σ(β) dᵀ)` in factored form."""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class FactEncoder(nn.Module):
    """A bidirectional LSTM over token embeddings, averaged over the tokens, then `tanh(Linear)`: the condition `h`."""

    def __init__(self, embedding_size: int, hidden_size: int):
        super().__init__()
        self.lstm = nn.LSTM(embedding_size, hidden_size, batch_first=True, bidirectional=True)
        self.project = nn.Linear(2 * hidden_size, 2 * hidden_size)

    def forward(self, embeddings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(embeddings, lengths.cpu(), batch_first=True, enforce_sorted=False)
        states, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)
        mask = (torch.arange(states.shape[1], device=states.device)[None] < lengths.to(states.device)[:, None])
        pooled = (states * mask[..., None]).sum(1) / lengths.to(states.device)[:, None]
        return torch.tanh(self.project(pooled))


class ConstrainedUpdateHead(nn.Module):
    """Predicts `α, β` (out), `γ, d` (in) and `η` from the condition, for one weight `(out, in)`.

    Initialised so that the untrained update is a plain gradient step `−s · ½ · ½ · ∇W`: `γ = 1`, `d = 0`,
    `σ(α) = σ(η) = ½`.
    """

    def __init__(self, condition_size: int, in_features: int, out_features: int):
        super().__init__()
        self.alpha = nn.Linear(condition_size, out_features)
        self.beta = nn.Linear(condition_size, out_features)
        self.gamma = nn.Linear(condition_size, in_features)
        self.shift = nn.Linear(condition_size, in_features)
        self.eta = nn.Linear(condition_size, 1)
        for linear in (self.alpha, self.beta, self.gamma, self.shift, self.eta):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.ones_(self.gamma.bias)

    def factors(self, condition: torch.Tensor, inputs: torch.Tensor, output_grads: torch.Tensor, scale: float):
        """`(up (out, T+1), down (T+1, in))` with `up @ down = ΔW` for one fact."""
        step = scale * torch.sigmoid(self.eta(condition))
        up = torch.cat([torch.sigmoid(self.alpha(condition))[:, None] * output_grads.T,
                        torch.sigmoid(self.beta(condition))[:, None]], dim=1)
        down = torch.cat([inputs * self.gamma(condition)[None], self.shift(condition)[None]], dim=0)
        return -step * up, down


class KEHypernetwork(nn.Module):
    """The fact encoder and one :class:`ConstrainedUpdateHead` per edited weight."""

    def __init__(self, embedding_size: int, condition_size: int, shapes: list[tuple[int, int]], edit_scale: float):
        super().__init__()
        self.encoder = FactEncoder(embedding_size, condition_size)
        self.heads = nn.ModuleList(ConstrainedUpdateHead(2 * condition_size, i, o) for o, i in shapes)
        self.edit_scale = edit_scale

    def update_factors(self, index: int, conditions: torch.Tensor, inputs: torch.Tensor, output_grads: torch.Tensor,
                       request_index: torch.Tensor):
        """The summed update of all facts of a batch at weight `index`, as factors (their ranks add up)."""
        ups, downs = [], []
        for request, condition in enumerate(conditions):
            tokens = request_index == request
            up, down = self.heads[index].factors(condition, inputs[tokens], output_grads[tokens], self.edit_scale)
            ups.append(up)
            downs.append(down)
        return torch.cat(ups, dim=1), torch.cat(downs, dim=0)
