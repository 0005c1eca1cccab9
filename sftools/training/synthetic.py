"""A known teacher: the exact denoiser of a Gaussian video law, for experiments with a known answer.

A real teacher's distribution is unknown, so "the student moved toward the teacher" can only be
estimated from samples of both. Here the teacher *is* a distribution: latent videos
`x[f] = mu(prompt) + sum_k z_k[f] B_k + s_e eps[f]`, with K orthonormal patterns B_k, coefficients
z_k following a stationary AR(1) process over frames (correlation `a`, variance `s^2`) and white
residual noise. Everything about it is exact: its denoiser E[x0 | x_t] (a linear map, so the
teacher's scores carry no estimation error), its samples of any length (so there is a truth for
blocks far beyond the training length), and the law of every frame (so a distance to it needs no
feature network). It takes the call of a diffusers Wan transformer, so the trainer uses it as it
uses any teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class GaussianVideoLaw:
    channels: int
    height: int  # latent height and width
    width: int
    text_dim: int
    patterns: int = 4  # K
    correlation: float = 0.9  # a: frame-to-frame correlation of the pattern coefficients
    scale: float = 2.0  # s: standard deviation of the coefficients (white noise has 1)
    residual: float = 0.1  # s_e: white noise beside the patterns
    mean_scale: float = 0.5
    seed: int = 0

    @property
    def dim(self) -> int:
        return self.channels * self.height * self.width


def synthetic_teacher(channels: int, latent_height: int, latent_width: int, text_dim: int) -> "GaussianVideoTeacher":
    """The teacher `model.teacher: synthetic` names: the default law at this latent size."""
    return GaussianVideoTeacher(GaussianVideoLaw(channels=channels, height=latent_height, width=latent_width,
                                                 text_dim=text_dim))


class GaussianVideoTeacher(torch.nn.Module):
    """`forward(hidden_states, timestep, encoder_hidden_states, return_dict=False)` gives the exact
    flow (x_t - E[x0 | x_t]) / sigma of the law, with the prompt's mean read from the context."""

    def __init__(self, law: GaussianVideoLaw) -> None:
        super().__init__()
        self.law = law
        g = torch.Generator().manual_seed(law.seed)
        basis, _ = torch.linalg.qr(torch.randn(law.dim, law.patterns, generator=g, dtype=torch.float64))
        self.register_buffer("basis", basis)  # [D, K], orthonormal columns
        self.register_buffer("text_map", torch.randn(law.text_dim, law.dim, generator=g, dtype=torch.float64))

    def mean(self, context: torch.Tensor) -> torch.Tensor:
        """[B, D]: the prompt's mean frame, a fixed random map of its (zero-padded) embeddings."""
        summed = context.double().sum(1)
        direction = summed / summed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.law.mean_scale * direction @ self.text_map

    def frame_covariance(self, frames: int) -> torch.Tensor:
        """[T, T]: covariance over frames of one pattern coefficient of x0 - mean (residual included)."""
        index = torch.arange(frames, dtype=torch.float64)
        ar = self.law.correlation ** (index[:, None] - index[None, :]).abs()
        return self.law.scale ** 2 * ar + self.law.residual ** 2 * torch.eye(frames, dtype=torch.float64)

    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] for x_t = (1 - sigma) x0 + sigma noise; x_t [B, C, T, h, w], sigma [B]."""
        batch, channels, frames, h, w = x_t.shape
        sigma = sigma.double().view(-1, 1, 1)
        mu = self.mean(context)[:, None, :]  # [B, 1, D]
        y = x_t.double().permute(0, 2, 1, 3, 4).reshape(batch, frames, -1) - (1 - sigma) * mu
        coeffs = y @ self.basis  # [B, T, K]
        rest = y - coeffs @ self.basis.T
        cov = self.frame_covariance(frames)[None]
        alpha = (1 - sigma)
        gain = alpha * cov @ torch.linalg.inv(alpha ** 2 * cov + sigma ** 2 * torch.eye(frames, dtype=torch.float64))
        s2 = self.law.residual ** 2
        x0 = mu + (gain @ coeffs) @ self.basis.T + alpha * s2 / (alpha ** 2 * s2 + sigma ** 2) * rest
        return x0.reshape(batch, frames, channels, h, w).permute(0, 2, 1, 3, 4)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        if timestep.dim() > 1:  # per-token timesteps: the law's denoiser needs one level per sample
            if not (timestep == timestep[:, :1]).all():
                raise ValueError("the synthetic teacher denoises one noise level per sample")
            timestep = timestep[:, 0]
        sigma = (timestep.double() / 1000).clamp_min(1e-6)
        x0 = self.denoise(hidden_states, sigma, encoder_hidden_states)
        flow = (hidden_states.double() - x0) / sigma.view(-1, 1, 1, 1, 1)
        return (flow.to(hidden_states.dtype),)

    def sample(self, context: torch.Tensor, frames: int, generator: torch.Generator) -> torch.Tensor:
        """Exact draws [B, C, T, h, w] of the law (one per context row)."""
        law, batch = self.law, context.shape[0]
        chol = torch.linalg.cholesky(self.frame_covariance(frames) - law.residual ** 2 * torch.eye(frames, dtype=torch.float64))
        z = chol @ torch.randn(batch, frames, law.patterns, generator=generator, dtype=torch.float64)
        eps = torch.randn(batch, frames, law.dim, generator=generator, dtype=torch.float64)
        x = self.mean(context)[:, None, :] + z @ self.basis.T + law.residual * eps
        return x.reshape(batch, frames, law.channels, law.height, law.width).permute(0, 2, 1, 3, 4).float()

    def coefficients(self, videos: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """[B, T, K]: each frame's pattern coefficients, its mean removed (the law's coordinates)."""
        batch, _, frames = videos.shape[:3]
        x = videos.double().permute(0, 2, 1, 3, 4).reshape(batch, frames, -1) - self.mean(context)[:, None, :]
        return x @ self.basis

    def frame_distances(self, videos: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """[T]: for each frame f, the Frechet (2-Wasserstein) distance between the Gaussian fitted to
        the videos' coefficients of frames (f-1, f) and the law's exact one (frame 0: its own).

        This is FID's formula, and here it is exact rather than a proxy: the law is Gaussian in these
        coordinates, so two laws agree on them exactly when mean and covariance do. Pairs of frames
        make it see the motion (the frame-to-frame correlation) as well as each frame's look, and the
        2K dimensions are few enough for tens of videos to estimate a covariance."""
        coeffs = self.coefficients(videos, context)
        frames, k = coeffs.shape[1], self.law.patterns
        cov_t = self.frame_covariance(frames)
        out = []
        for f in range(frames):
            span = [f] if f == 0 else [f - 1, f]
            sample = coeffs[:, span].reshape(coeffs.shape[0], -1)
            truth = torch.kron(cov_t[span][:, span], torch.eye(k, dtype=torch.float64))
            out.append(frechet_distance(sample.mean(0), torch.cov(sample.T), torch.zeros(len(truth), dtype=torch.float64), truth))
        return torch.stack(out)


def frechet_distance(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor) -> torch.Tensor:
    """sqrt(||m_a - m_b||^2 + tr(C_a + C_b - 2 (C_b^1/2 C_a C_b^1/2)^1/2)): W2 between two Gaussians."""
    root_b = _sqrt_psd(cov_b)
    cross = _sqrt_psd(root_b @ cov_a @ root_b)
    squared = (mean_a - mean_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross)
    return squared.clamp_min(0).sqrt()


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
