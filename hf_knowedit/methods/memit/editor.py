import torch

from ...locate import batch_update
from ...locate.spread import ResidualSpreadEditor
from .config import MEMITConfig


class MEMITEditor(ResidualSpreadEditor):
    """MEMIT: the batch's residuals spread over the window, each layer solving `ΔW = R Kᵀ (λC + KKᵀ)⁻¹` (Eq. 14)."""

    config_class = MEMITConfig
    method_name = "MEMIT"

    def solve_layer(self, edited_model, layer, position, keys, residuals, statistics):
        if statistics is not None:
            second_moment = statistics.second_moment.to(keys.device)
        else:
            second_moment = torch.eye(keys.shape[1], device=keys.device)
        return batch_update(keys, residuals, second_moment, self.config.mom2_update_weight)
