"""Orthogonalization by Newton-Schulz iteration: the step of Muon (muon.py) that turns an update U S V^T into
~U V^T, batched over same-shape matrices.

    X = zeropower_via_newtonschulz5(G)                       # G: (..., rows, cols); 5 quintic steps
    X = zeropower_via_newtonschulz5(G, polar_express=True)   # Polar Express's per-step coefficients

The iteration runs on the wide orientation, on the rows x rows Gram side when the matrix is wide enough for
that to save work, in bf16 where the hardware multiplies it natively; tall matrices are never transposed.
"""

import torch

from common import native_bf16

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic that maximizes the slope at zero (Keller Jordan)
# Polar Express (Amsel et al. 2025, arXiv 2505.16932): one quintic per step, optimal for 5 steps with a 2%
# safety margin, as nanochat and modded-nanogpt use it; the input is normalized to a 1.02x Frobenius norm.
# Steps past the fifth repeat the last.
POLAR_EXPRESS_COEFFS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
POLAR_EXPRESS_SAFETY = 1.02
NS_EPS = 1e-7  # floor of the Frobenius norm, as in torch.optim.Muon
GRAM_RESTART = 3  # steps of the rows x rows iteration between recomputations of X X^T


def default_ns_dtype(device: torch.device | str) -> torch.dtype:
    """The Newton-Schulz dtype for `device`: bf16 where the hardware multiplies it natively (common.native_bf16).

    On such a CPU (2-core Zen 4) a bf16 step takes ~0.42x the time of an fp32 one, and its output is
    within ~1% of the fp64 iteration's with the same spread of singular values: noise far below the
    iteration's own departure from U V^T. Decided by the hardware, not timed at run time, so a run
    and its resume follow the same numerics.
    """
    return torch.bfloat16 if native_bf16(device) else torch.float32


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None,
                                polar_express: bool = False) -> torch.Tensor:
    """Orthogonalize G (..., rows, cols): U S V^T -> ~U V^T, for every matrix in the leading dims.

    Five quintic steps do not converge to U V^T but to U S' V^T with S' in ~[0.7, 1.2], which
    trains as well and costs far fewer steps. The iteration runs on the wide orientation so
    that the Gram matrix X X^T is the smaller square, and on that square alone when the matrix
    is wide enough for it to save work (see _newton_schulz_gram). Computes and returns `dtype`
    (default: default_ns_dtype(G.device)); the result is torch.optim.Muon's, batched. `polar_express`: Polar
    Express's per-step coefficients instead of the fixed quintic, which land the singular values nearer 1.
    """
    if G.ndim < 2:
        raise ValueError(f"zeropower_via_newtonschulz5 needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    tall = G.size(-2) > G.size(-1)
    X = G.to(dtype or default_ns_dtype(G.device))
    X = X.mT if tall else X
    wide_shape = X.shape
    X = X.reshape(-1, *wide_shape[-2:])
    # Frobenius norm >= spectral norm, so every singular value starts in [0, 1], where the iteration works.
    norm = X.norm(dim=(-2, -1), keepdim=True).clamp_min(NS_EPS)
    if polar_express:
        norm = norm * POLAR_EXPRESS_SAFETY
    X = torch.div(X, norm, out=torch.empty_like(X))  # keeps a tall input's layout: no transposing copy
    rows, cols = wide_shape[-2:]
    # Polar Express's large first step (a = 8.2) amplifies the Gram path's rounding in bf16: plain steps only
    if not polar_express and _gram_flops(rows, cols, steps) < _plain_flops(rows, cols, steps):
        X = _newton_schulz_gram(X, steps, polar_express)
    else:
        X = _newton_schulz_plain(X, steps, polar_express)
    X = X.reshape(wide_shape)
    return X.mT if tall else X


def _coefficients(steps: int, polar_express: bool) -> list:
    """(a, b, c) of each step: the fixed quintic, or Polar Express's."""
    return [POLAR_EXPRESS_COEFFS[min(k, 4)] if polar_express else NS_COEFFS for k in range(steps)]


def _newton_schulz_plain(X: torch.Tensor, steps: int, polar_express: bool = False) -> torch.Tensor:
    """X <- a X + (b A + c A^2) X with A = X X^T, on a batch of wide matrices (torch.optim.Muon's steps).

    A tall matrix arrives as a wide view of itself (X = T.mT) and is iterated in its own layout,
    transposed (T <- a T + T B^T): out= buffers must be contiguous, or matmul takes a slow path.
    """
    transposed = _is_transposed(X)
    if transposed:
        X = X.mT
    # Two buffers for X and one each for A and B, reused by every step (out=): on CPU every
    # fresh large allocation costs page faults.
    Y = torch.empty_like(X)
    A = X.new_empty(X.size(0), min(X.shape[-2:]), min(X.shape[-2:]))
    B = torch.empty_like(A)
    for a, b, c in _coefficients(steps, polar_express):
        if transposed:
            torch.bmm(X.mT, X, out=A)
            torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)
            torch.baddbmm(X, X, B.mT, beta=a, out=Y)  # (a X + B X)^T
        else:
            torch.bmm(X, X.mT, out=A)
            torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)  # b A + c A^2
            torch.baddbmm(X, B, X, beta=a, out=Y)  # a X + B X
        X, Y = Y, X
    return X.mT if transposed else X


def _is_transposed(X: torch.Tensor) -> bool:
    """True for a column-major batch of matrices: a tall matrix seen as a wide one (T.mT)."""
    return X.size(-1) > 1 and X.stride(-2) == 1


def _newton_schulz_gram(X: torch.Tensor, steps: int, polar_express: bool = False) -> torch.Tensor:
    """The same iteration run on the rows x rows side: cheaper when cols >> rows.

    Every step multiplies X on the left by P = a I + b A + c A^2, a polynomial in A_0 = X_0 X_0^T,
    so X_k = Q_k X_0 with Q_k = P_{k-1} ... P_0, and all these matrices commute: A_{k+1} =
    P_k A_k P_k^T = P_k^2 A_k. Steps then cost only rows^3 products; X is touched only to form
    X X^T and Q X.
    Carried through many steps, rounding in A grows (bf16 blows up the singular values of
    ill-conditioned inputs), so every GRAM_RESTART steps X is formed and A recomputed from it:
    with restarts every 3 steps the output matches the plain iteration's in quality.
    """
    Q = None
    for k, (a, b, c) in enumerate(_coefficients(steps, polar_express)):
        if k % GRAM_RESTART == 0:  # (re)start from X itself
            if Q is not None:
                X = _left_multiply(Q, X)
                Q = None
            A = torch.bmm(X, X.mT)
        P = torch.baddbmm(A, A, A, beta=b, alpha=c)
        P.diagonal(dim1=-2, dim2=-1).add_(a)  # P = a I + b A + c A^2
        Q = P if Q is None else torch.bmm(P, Q)
        if (k + 1) % GRAM_RESTART and k < steps - 1:  # A is needed again before the next restart
            A = torch.bmm(P, torch.bmm(P, A))
    return _left_multiply(Q, X)


def _left_multiply(Q: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Q @ X, written in X's memory layout: a tall matrix passed in as a wide view (X = T.mT)
    comes out laid out tall, so the optimizer adds it to its parameter without a transposing pass."""
    if _is_transposed(X):
        return torch.bmm(X.mT, Q.mT).mT
    return torch.bmm(Q, X)


def _plain_flops(rows: int, cols: int, steps: int) -> int:
    return steps * (4 * rows * rows * cols + 2 * rows ** 3)


def _gram_flops(rows: int, cols: int, steps: int) -> int:
    """Multiply-adds x 2 of _newton_schulz_gram: per block of L steps between restarts, X X^T and
    Q X (rows^2 cols each) and 4 L - 3 products of rows x rows matrices."""
    blocks = [min(GRAM_RESTART, steps - start) for start in range(0, steps, GRAM_RESTART)]
    return sum(4 * rows * rows * cols + 2 * (4 * L - 3) * rows ** 3 for L in blocks)


def ns_flops(rows: int, cols: int, steps: int = 5) -> int:
    """Multiply-adds x 2 of orthogonalizing one rows x cols matrix, on the path zeropower_via_newtonschulz5 takes."""
    small, large = min(rows, cols), max(rows, cols)
    return min(_plain_flops(small, large, steps), _gram_flops(small, large, steps))
