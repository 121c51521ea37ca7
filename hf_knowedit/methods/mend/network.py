"""MEND's editor network (Mitchell et al. 2022, §3.1-3.2): per weight shape, one MLP shared by the layers of that
shape, mapping the normalised gradient factors `(u, δ)` of each token to `(ũ, δ̃)`.

Each hidden layer is residual and low-rank, initialised to the identity, with a scale and a shift per edited layer
("layer-specific scale and shift", §3.2); the inputs are normalised with running means and variances gathered during
training.
"""

import torch
from torch import nn

from ...distributed import all_reduce, rank_and_world_size


class RunningMoments(nn.Module):
    """Per-dimension running mean and variance (Chan et al.'s parallel update), kept as buffers so checkpoints hold
    them. Before any update, a batch is normalised with its own statistics (a single row is left as it is)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("sum_squares", torch.zeros(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch `(n, dim)`. Under several processes (`accelerate launch`), the batches of all processes are
        added at once, so that every process holds the moments of every input seen (as one process would)."""
        _, world = rank_and_world_size()
        if world > 1:
            n, batch_mean, batch_squares = self._global_batch(x)
        else:
            n = x.shape[0]
            if n == 0:
                return
            batch_mean = x.mean(0)
            batch_squares = ((x - batch_mean) ** 2).sum(0)
        total = self.count + n
        shift = batch_mean - self.mean
        self.mean += shift * (n / total).float()
        self.sum_squares += batch_squares + shift**2 * (self.count * n / total).float()
        self.count.copy_(total)

    def _global_batch(self, x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Size, mean and sum of squared deviations of the union of every process's batch `x`."""
        count = all_reduce(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
        total = all_reduce(x.double().sum(0))
        mean = total / count.clamp(min=1)
        squares = all_reduce(((x.double() - mean) ** 2).sum(0))
        return int(count.item()), mean.to(x.dtype), squares.to(x.dtype)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.count >= 2:
            mean, var = self.mean, self.sum_squares / (self.count - 1).float()
        elif x.shape[0] > 1:
            mean, var = x.mean(0), x.var(0, unbiased=False)
        else:  # one row: centring it on itself would zero it
            mean, var = torch.zeros_like(x[0]), torch.ones_like(x[0])
        return (x - mean) / (var.sqrt() + self.eps)


class LowRankResidualLayer(nn.Module):
    """`x + act(scale[mode] · (B A x + b) + shift[mode])`, with `B = 0` at initialisation (the identity)."""

    def __init__(self, dim: int, rank: int, num_modes: int, relu: bool):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, dim))
        nn.init.xavier_uniform_(self.down)
        self.up = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(num_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(num_modes, dim))
        self.relu = relu

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        hidden = (x @ self.down.T) @ self.up.T + self.bias
        hidden = hidden * self.mode_scale[mode] + self.mode_shift[mode]
        return x + (torch.relu(hidden) if self.relu else hidden)


class GradientTransform(nn.Module):
    """Maps the gradient factors `(u (T, in), δ (T, out))` of the layers of one shape to `(ũ, δ̃)`."""

    def __init__(self, in_features: int, out_features: int, num_modes: int, rank: int, num_hidden: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        width = in_features + out_features
        self.input_moments = RunningMoments(in_features)
        self.grad_moments = RunningMoments(out_features)
        self.layers = nn.ModuleList(
            LowRankResidualLayer(width, min(rank, width), num_modes, relu=index < num_hidden)
            for index in range(num_hidden + 1)
        )

    def forward(self, inputs: torch.Tensor, output_grads: torch.Tensor, mode: int):
        if self.training:
            self.input_moments.update(inputs)
            self.grad_moments.update(output_grads)
        x = torch.cat([self.input_moments.normalise(inputs), self.grad_moments.normalise(output_grads)], dim=-1)
        for layer in self.layers:
            x = layer(x, mode)
        return x[:, : self.in_features], x[:, self.in_features :]


class MENDEditorNetwork(nn.Module):
    """The editor of a set of linear layers: one :class:`GradientTransform` per weight shape and a learned step size
    `η` per layer. :meth:`update_factors` gives `ΔW = up @ down = -η Σ_t δ̃_t ũ_tᵀ` as factors."""

    def __init__(self, shapes: list[tuple[int, int]], rank: int, num_hidden: int, edit_lr: float):
        super().__init__()
        self.shape_keys, self.modes = [], []
        counts: dict[str, int] = {}
        for out_features, in_features in shapes:
            key = f"{in_features}x{out_features}"
            self.shape_keys.append(key)
            self.modes.append(counts.get(key, 0))
            counts[key] = counts.get(key, 0) + 1
        shape_of = {f"{i}x{o}": (i, o) for o, i in shapes}
        self.transforms = nn.ModuleDict(
            {key: GradientTransform(*shape_of[key], count, rank, num_hidden) for key, count in counts.items()}
        )
        self.edit_lrs = nn.Parameter(torch.full((len(shapes),), float(edit_lr)))

    def update_factors(self, index: int, inputs: torch.Tensor, output_grads: torch.Tensor):
        """`(up (out, T), down (T, in))` of layer `index`'s update from its gradient factors."""
        new_inputs, new_grads = self.transforms[self.shape_keys[index]](inputs, output_grads, self.modes[index])
        return -self.edit_lrs[index] * new_grads.T, new_inputs
