"""Spreading the residual of the target values over several layers (MEMIT, Meng et al. 2023, Alg. 1).

The target `z_i = h_i^L + δ_i` is optimised once on the residual stream leaving the last edited layer `L`. Then, for
each edited layer `l` in order, with the updates of the earlier layers applied: the keys `K_l` are read again, the
remaining residual `z_i - h_i^L` is measured, and layer `l` takes the share `1 / (number of layers left)` of it
(Eq. 20), solved in closed form by the method (:meth:`ResidualSpreadEditor.solve_layer`).
"""

import torch

from ..deltas import LowRankDelta
from ..errors import EditFailedError
from ..utils import get_logger
from .base import LocateThenEditEditor
from .keys import compute_subject_keys
from .values import optimize_target_values


logger = get_logger(__name__)


class ResidualSpreadEditor(LocateThenEditEditor):
    """Editors that write a batch of facts into several consecutive MLPs (MEMIT, AlphaEdit).

    Subclasses implement :meth:`solve_layer`, which returns the factors `(up, down)` of `ΔW` at one layer; every
    layer's update is a :class:`~hf_knowedit.deltas.LowRankDelta` of rank at most the batch size.
    """

    def edit(self, edited_model, requests, layers, prefixes):
        config = self.config
        layout = edited_model.layout
        statistics = self.statistics(edited_model, layers) if self.needs_statistics() else {}
        last = layers[-1]
        with self.phase("values"):
            targets, _, value_stats = optimize_target_values(
                edited_model, requests, last, prefixes, config, site="block_out"
            )
        self.stats.update(value_stats)
        updates: dict[str, LowRankDelta] = {}
        for position, layer in enumerate(layers):
            with edited_model.temporary_components(dict(updates)):
                with self.phase("keys"):
                    keys = compute_subject_keys(edited_model, requests, layer, prefixes, config.keys_batch_size)
                    current = compute_subject_keys(edited_model, requests, last, [""], config.keys_batch_size,
                                                   site="block_out")
            with self.phase("solve"):
                residuals = (targets - current) / (len(layers) - position)
                logger.debug("Layer %d: mean residual norm %.4f", layer, float(residuals.norm(dim=-1).mean()))
                up, down = self.solve_layer(edited_model, layer, position, keys, residuals, statistics.get(layer))
                if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
                    raise EditFailedError(f"The update at layer {layer} has NaN or Inf values; nothing was changed.")
                updates[layout.mlp_out_path(layer)] = LowRankDelta(up, down)
            self.after_layer(edited_model, requests, layer, keys)
        self.stats["ranks"] = {str(layer): updates[layout.mlp_out_path(layer)].rank for layer in layers}
        return updates

    def needs_statistics(self) -> bool:
        return bool(self.config.mom2_adjustment)

    def solve_layer(self, edited_model, layer, position, keys, residuals, statistics):
        """The factors `(up (d_v, r), down (r, d_k))` of `ΔW` at `layer`, for keys `(N, d_k)`, residuals `(N, d_v)`."""
        raise NotImplementedError

    def after_layer(self, edited_model, requests, layer, keys) -> None:
        """Called with each layer's keys once its update is solved (AlphaEdit accumulates them)."""
