import weakref

from ...deltas import LowRankDelta
from ...locate import LocateThenEditEditor, compute_subject_keys, optimize_target_values, rank_one_update
from ...locate.base import module_output
from .config import ROMEConfig


_CHECKED: "weakref.WeakSet" = weakref.WeakSet()  # statistics whose second moment is known to be invertible


class ROMEEditor(LocateThenEditEditor):
    """ROME: for each request in turn, `k*` (Eq. 3), `v*` (Eq. 4), and the rank-one update of Eq. 2.

    Each request is edited on top of the previous ones of the batch (they are applied as temporary components), so a
    batch of N gives one :class:`~hf_knowedit.deltas.LowRankDelta` of rank N.
    """

    config_class = ROMEConfig
    method_name = "ROME"

    def edit(self, edited_model, requests, layers, prefixes):
        config = self.config
        layer = layers[0]
        model, layout = edited_model.base_model, edited_model.layout
        second_moment = None
        if config.mom2_adjustment:
            statistics = self.statistics(edited_model, [layer])[layer]
            if statistics not in _CHECKED:  # an eigendecomposition: once per statistics object
                statistics.check_nonsingular()
                _CHECKED.add(statistics)
            second_moment = statistics.second_moment
        path = layout.mlp_out_path(layer)
        module = layout.mlp_out(model, layer)
        update: LowRankDelta | None = None
        steps, probabilities = [], []
        for request in requests:
            with edited_model.temporary_components({path: update} if update is not None else {}):
                with self.phase("keys"):
                    key = compute_subject_keys(edited_model, [request], layer, prefixes, config.keys_batch_size)[0]
                    input_key = key
                    if not config.consistent_keys:
                        input_key = compute_subject_keys(edited_model, [request], layer, [""])[0]
                with self.phase("values"):
                    target, _, value_stats = optimize_target_values(
                        edited_model, [request], layer, prefixes, config, site="mlp_out"
                    )
                with self.phase("solve"):
                    residual = target[0] - module_output(module, input_key[None])[0]
            with self.phase("solve"):
                c = second_moment.to(key.device) if second_moment is not None else None
                up, down = rank_one_update(key, residual, c, input_key=input_key)
                one = LowRankDelta(up, down)
                update = one if update is None else update.combine(one)
            steps.append(value_stats["value_steps"])
            probabilities.append(value_stats["target_probability_mean"])
        self.stats.update({"rome_layer": layer, "value_steps_mean": sum(steps) / len(steps),
                           "target_probability_mean": sum(probabilities) / len(probabilities), "rank": update.rank})
        return {path: update}
