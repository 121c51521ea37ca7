"""Closed-form low-rank weight updates, solved in fp64 and returned as factors `ΔW = up @ down`.

* ROME (Meng et al. 2022), Eq. 2: `ΔW = (v* - W k*) (C⁻¹ k*)ᵀ / ((C⁻¹ k*)ᵀ k*)`, rank 1.
* MEMIT (Meng et al. 2023), Eq. 14: `ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`, rank at most the number of keys.
* AlphaEdit (Fang et al. 2025), Eq. 12: `ΔW = R Kᵀ P (K Kᵀ P + K_p K_pᵀ P + α I)⁻¹`, where `P` projects onto the null
  space of the preserved keys' second moment, so `ΔW k₀ = 0` for every preserved key `k₀`.

Keys are rows here: `keys` is `(N, d_k)`, `residuals` `(N, d_v)`; `C` is the `(d_k, d_k)` second moment `E[k kᵀ]`.
Every function checks that its solve is finite and raises :class:`~hf_knowedit.errors.EditFailedError` otherwise.
"""

import torch

from ..errors import EditFailedError


def _solve(matrix: torch.Tensor, rhs: torch.Tensor, what: str) -> torch.Tensor:
    try:
        solution = torch.linalg.solve(matrix, rhs)
    except torch.linalg.LinAlgError as error:
        raise EditFailedError(
            f"The {what} is singular ({error}); nothing was changed. Collect the second-moment statistics over more "
            "tokens (mom2_num_tokens), or raise the regularisation."
        ) from error
    if not torch.isfinite(solution).all():
        raise EditFailedError(f"Solving the {what} gave NaN or Inf; nothing was changed. Edit in fp32 and check the "
                              "statistics.")
    return solution


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise EditFailedError(f"The {what} has NaN or Inf values; nothing was changed.")


def rank_one_update(key: torch.Tensor, residual: torch.Tensor, second_moment: torch.Tensor | None = None,
                    input_key: torch.Tensor | None = None):
    """ROME Eq. 2 as factors: `up = (v* - W k*) / ((C⁻¹k*)ᵀ k*)` `(d_v, 1)`, `down = (C⁻¹ k*)ᵀ` `(1, d_k)`.

    Args:
        key (`torch.Tensor`): `k*`, `(d_k,)`, the key whose direction `C⁻¹k*` the update takes.
        residual (`torch.Tensor`): `v* - W k`, `(d_v,)`, for `k` = `input_key`.
        second_moment (`torch.Tensor`, *optional*): `C = E[k kᵀ]`; `None` for the identity (no `mom2_adjustment`).
        input_key (`torch.Tensor`, *optional*): the key that must map to `v*`; `None` is `key` itself, the r-ROME
            fix (Gupta et al. 2024). The original ROME code passes the key of the bare prompt here.

    Example:

    ```python
    >>> import torch
    >>> key, residual = torch.randn(8), torch.randn(4)
    >>> up, down = rank_one_update(key, residual, torch.eye(8) * 2)
    >>> torch.allclose((up @ down) @ key, residual, atol=1e-5)
    True

    ```
    """
    _check_finite(key, "subject key")
    _check_finite(residual, "value residual")
    k = key.double()
    c_inv_k = _solve(second_moment.double(), k, "second moment C") if second_moment is not None else k
    denominator = c_inv_k @ (input_key.double() if input_key is not None else k)
    if not torch.isfinite(denominator) or denominator <= 1e-12 * max(float(k @ k), 1e-30):
        raise EditFailedError(
            f"ROME's denominator (C⁻¹k*)ᵀk* is {float(denominator):.3g}, not positive: the second moment C is singular "
            "or not positive definite (too few tokens in the statistics?), or the key is zero. Nothing was changed. "
            "Collect the statistics over more tokens (mom2_num_tokens) or set mom2_adjustment=False."
        )
    up = (residual.double() / denominator)[:, None]
    down = c_inv_k[None, :]
    return up.float(), down.float()


def batch_update(keys: torch.Tensor, residuals: torch.Tensor, second_moment: torch.Tensor, update_weight: float):
    """MEMIT Eq. 14 as factors: `up = Rᵀ` `(d_v, N)`, `down = ((λC + KᵀK)⁻¹ Kᵀ)ᵀ` `(N, d_k)`.

    Example:

    ```python
    >>> import torch
    >>> keys, residuals = torch.randn(3, 8), torch.randn(3, 4)
    >>> up, down = batch_update(keys, residuals, torch.eye(8), update_weight=1e-6)
    >>> torch.allclose(keys @ (up @ down).T, residuals, atol=1e-3)
    True

    ```
    """
    _check_finite(keys, "subject keys")
    _check_finite(residuals, "value residuals")
    k = keys.double()
    system = update_weight * second_moment.double() + k.T @ k
    adjusted = _solve(system, k.T, "MEMIT system λC + KKᵀ")
    return residuals.double().T.float(), adjusted.T.float()


def null_space_update(keys: torch.Tensor, residuals: torch.Tensor, projector: torch.Tensor,
                      preserved_moment: torch.Tensor | None, l2: float):
    """AlphaEdit Eq. 12 as factors: `up = Rᵀ`, `down = (M⁻¹ P K)ᵀ P` with `M = P (KᵀK + K_pᵀK_p) + α I`.

    The trailing `P` is exact algebra (`ΔW P = ΔW`) written out, so `ΔW k₀` vanishes to rounding for `P k₀ = 0`.

    Example:

    ```python
    >>> import torch
    >>> basis = torch.linalg.qr(torch.randn(8, 8))[0]
    >>> projector = basis[:, 4:] @ basis[:, 4:].T  # preserved keys span basis[:, :4]
    >>> up, down = null_space_update(torch.randn(2, 8), torch.randn(2, 4), projector, None, l2=1.0)
    >>> float(((up @ down) @ basis[:, :4]).abs().max()) < 1e-5
    True

    ```
    """
    _check_finite(keys, "subject keys")
    _check_finite(residuals, "value residuals")
    k, p = keys.double(), projector.double()
    moment = k.T @ k
    if preserved_moment is not None:
        moment = moment + preserved_moment.double()
    system = p @ moment + l2 * torch.eye(p.shape[0], dtype=torch.float64, device=p.device)
    solution = _solve(system, p @ k.T, "AlphaEdit system P(KKᵀ + KₚKₚᵀ) + αI")
    return residuals.double().T.float(), (solution.T @ p).float()
