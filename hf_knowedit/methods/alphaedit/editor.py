import weakref

import torch

from ...devices import input_device
from ...errors import ArtifactError
from ...locate import compute_subject_keys, null_space_update
from ...locate.spread import ResidualSpreadEditor
from .config import AlphaEditConfig


# Keys of requests already edited, per EditedModel: {(layer, prefixes): {id(request): (request, key)}}. The request
# object is kept with its key, so its id cannot be reused while the entry exists.
_EDITED_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class AlphaEditEditor(ResidualSpreadEditor):
    """AlphaEdit: each layer solves `ΔW = R Kᵀ P (K Kᵀ P + K_p K_pᵀ P + α I)⁻¹` (Eq. 12).

    `P` comes from `LayerStatistics.null_space_projector(nullspace_threshold)`. `K_p` are the keys of every request
    of the model's active edits (whatever their name or method), taken from those edits' stored requests; each key is
    computed once, when its request is edited (or, for edits loaded from disk, the first time it is needed, on the
    current model) and cached on the `EditedModel`. Deleting or deactivating an edit drops its keys from `K_p`.
    """

    config_class = AlphaEditConfig
    method_name = "AlphaEdit"

    def needs_statistics(self) -> bool:
        return True

    def _cache(self, edited_model, layer, prefixes):
        per_model = _EDITED_KEYS.setdefault(edited_model, {})
        return per_model.setdefault((layer, tuple(prefixes)), {})

    def preserved_moment(self, edited_model, layer, prefixes) -> torch.Tensor | None:
        """`K_p K_pᵀ` `(d_k, d_k)` over the requests of the active edits, or `None` when there are none."""
        cache = self._cache(edited_model, layer, prefixes)
        requests = [r for name in edited_model.active_edits for r in edited_model.get_edit(name).requests]
        missing = [r for r in requests if id(r) not in cache]
        if missing:
            keys = compute_subject_keys(edited_model, missing, layer, prefixes, self.config.keys_batch_size)
            for request, key in zip(missing, keys):
                cache[id(request)] = (request, key)
        if not requests:
            return None
        device = cache[id(requests[0])][1].device
        keys = torch.stack([cache[id(r)][1].to(device) for r in requests]).double()
        return keys.T @ keys

    def edit(self, edited_model, requests, layers, prefixes):
        self._prefixes = prefixes
        with self.phase("keys"):
            self._preserved = {layer: self.preserved_moment(edited_model, layer, prefixes) for layer in layers}
        return super().edit(edited_model, requests, layers, prefixes)

    def solve_layer(self, edited_model, layer, position, keys, residuals, statistics):
        projector = statistics.null_space_projector(
            threshold=self.config.nullspace_threshold, relative=self.config.nullspace_relative
        ).to(keys.device)
        preserved = self._preserved[layer]
        return null_space_update(keys, residuals, projector, preserved.to(keys.device) if preserved is not None
                                 else None, self.config.l2_regularization)

    def after_layer(self, edited_model, requests, layer, keys) -> None:
        cache = self._cache(edited_model, layer, self._prefixes)
        for request, key in zip(requests, keys):
            cache[id(request)] = (request, key)

    @classmethod
    def stream_state(cls, edited_model, edit_name):
        """The cached keys of the edit's requests (`K_p` is made of them), one `(num_requests, d_k)` tensor per layer
        and prefix set: keys recomputed on the edited model after a reload would differ from those of edit time."""
        requests = edited_model.get_edit(edit_name).requests
        tensors, entries = {}, []
        for (layer, prefixes), cache in _EDITED_KEYS.get(edited_model, {}).items():
            if requests and all(id(r) in cache for r in requests):
                tensors[f"keys.{len(entries)}"] = torch.stack([cache[id(r)][1].cpu() for r in requests]).contiguous()
                entries.append({"layer": layer, "prefixes": list(prefixes)})
        return tensors, {"keys": entries}

    @classmethod
    def restore_stream_state(cls, edited_model, edit_name, tensors, meta):
        requests = edited_model.get_edit(edit_name).requests
        device = input_device(edited_model)
        for number, entry in enumerate(meta.get("keys", [])):
            keys = tensors.get(f"keys.{number}")
            if keys is None or len(keys) != len(requests):
                raise ArtifactError(
                    f"The saved AlphaEdit keys #{number} do not match the {len(requests)} requests of edit "
                    f"{edit_name!r}; the snapshot is damaged: delete it to recompute the edits."
                )
            cache = _EDITED_KEYS.setdefault(edited_model, {}).setdefault((entry["layer"], tuple(entry["prefixes"])), {})
            for request, key in zip(requests, keys):
                cache[id(request)] = (request, key.to(device))
