"""The synthetic data of the MMoE paper: two regression tasks whose relatedness is one number.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts"
(KDD 2018), section 3.2, generate the data of their controlled experiment as follows:

1. two orthogonal unit vectors ``u1, u2`` in ``R^d``;
2. for a correlation ``p`` in [-1, 1], the task weights ``w1 = c u1`` and
   ``w2 = c (p u1 + sqrt(1 - p^2) u2)``, so that ``cos(w1, w2) = p``;
3. inputs ``x ~ N(0, I_d)``;
4. labels ``y_t = w_t^T x + sum_{i=1}^{m} sin(alpha_i w_t^T x + beta_i) + eps_t``, ``eps_t ~ N(0, 0.01)``.

The paper gives ``d = 100`` and leaves ``c``, ``m``, ``alpha_i`` and ``beta_i`` open. Our choice
(:class:`PaperData`'s defaults): ``c = 1``, ``m = 10``, ``alpha_i = 0.1 i`` and ``beta_i = i^2``
(``i = 1..m``), and the noise's *variance* 0.01 (standard deviation 0.1), reading ``N(0, 0.01)`` as mean
and variance. The reference generator Google Research published with the paper's procedure
(``google-research``, multi-task synthetic data) takes ``alpha_i = i`` (``frequency_step: 1``): sines up to
``sin(10 w^T x + 100)``, a function of the projection that 20,000 rows and the paper's model sizes could
not learn (the test loss stayed at 40-50% of the labels' variance whatever the model; docs/results.md,
"The MMoE paper's synthetic experiment"); with frequencies from 0.1 to 1 the models learn the tasks to
near the noise, which is the regime the paper's question is about. With either, ``w^T x ~ N(0, 1)`` and
the sinusoids add about 4-5 to the label's variance of 1 from the linear part: the tasks are mostly
non-linear functions of one projection each, and the cosine ``p`` sets how much their projections share
(the labels' Pearson correlation is lower than ``p``; :func:`label_correlation` measures it).

Everything about one data set is drawn from its seed: the vectors, the inputs and the noise. Two data
sets with the same seed and different correlations share ``u1``, ``u2`` and ``x``: runs are paired across
correlations as well as across models.

Example:
    >>> data = PaperData(rows=1000)
    >>> x, y = data.generate(correlation=0.5, seed=0)
    >>> x.shape, y.shape
    ((1000, 100), (1000, 2))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.checks import check_int, check_number, invalid, is_number


@dataclass(frozen=True)
class PaperData:
    """The generator's constants (see the module docstring for the choices).

    Attributes:
        rows: rows per data set.
        dim: d, the input dimension.
        scale: c, the norm of the task weights.
        sinusoids: m, the number of sine terms.
        noise_std: the label noise's standard deviation.
        frequency_step: ``alpha_i = i * frequency_step`` (the reference generator's 1 gives sines too
            fast to learn from 20,000 rows; see the module docstring).
    """

    rows: int = 10_000
    dim: int = 100
    scale: float = 1.0
    sinusoids: int = 10
    noise_std: float = 0.1
    frequency_step: float = 0.1

    def __post_init__(self) -> None:
        where = "data"
        check_int(where, "rows", self.rows, minimum=1)
        check_int(where, "dim", self.dim, minimum=2)
        check_number(where, "scale", self.scale)
        check_int(where, "sinusoids", self.sinusoids, minimum=0)
        check_number(where, "noise_std", self.noise_std, low_open=False)
        check_number(where, "frequency_step", self.frequency_step)

    @property
    def alphas(self) -> np.ndarray:
        """``alpha_i = i * frequency_step``, i = 1..m: the frequencies of the sine terms."""
        return np.arange(1, self.sinusoids + 1, dtype=np.float64) * self.frequency_step

    @property
    def betas(self) -> np.ndarray:
        """``beta_i = i^2``, i = 1..m: their phases."""
        return np.arange(1, self.sinusoids + 1, dtype=np.float64) ** 2

    def weights(self, correlation: float, seed: int) -> np.ndarray:
        """The ``(2, d)`` task weights of a data set: cosine ``correlation``, norm ``c`` each."""
        if not is_number(correlation) or not -1 <= correlation <= 1:
            raise invalid("data", "correlation", correlation, "expected a number in [-1, 1]")
        rng = np.random.default_rng([seed, 0])
        q, _ = np.linalg.qr(rng.standard_normal((self.dim, 2)))  # two orthonormal columns
        u1, u2 = q[:, 0], q[:, 1]
        w2 = correlation * u1 + np.sqrt(1.0 - correlation**2) * u2
        return self.scale * np.stack([u1, w2])

    def labels(self, x: np.ndarray, weights: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """``(n, 2)`` labels of inputs ``x`` ``(n, d)``: linear part, sine terms and ``noise`` ``(n, 2)``."""
        z = x @ weights.T  # (n, 2): w_t^T x
        waves = np.sin(z[:, :, None] * self.alphas + self.betas).sum(axis=2)
        return z + waves + noise

    def generate(
        self, correlation: float, seed: int, rows: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inputs ``(n, d)`` and labels ``(n, 2)`` (float32) of one data set.

        Args:
            correlation: the cosine between the task weights, in [-1, 1].
            seed: draws the vectors, inputs and noise; the same seed shares them across correlations.
            rows: rows to draw (default :attr:`rows`); the first rows of a longer draw are the same.
        """
        n = self.rows if rows is None else rows
        check_int("data", "rows", n, minimum=1)
        weights = self.weights(correlation, seed)
        rng = np.random.default_rng([seed, 1])
        x = rng.standard_normal((n, self.dim))
        noise = (
            np.random.default_rng([seed, 2]).normal(0.0, self.noise_std, (n, 2)) if self.noise_std else 0.0
        )
        y = self.labels(x, weights, np.zeros((n, 2)) + noise)
        return x.astype(np.float32), y.astype(np.float32)


def label_correlation(y: np.ndarray) -> float:
    """The Pearson correlation of the two labels ``(n, 2)``."""
    return float(np.corrcoef(y[:, 0], y[:, 1])[0, 1])
