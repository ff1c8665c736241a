"""Residual-stream targets for an MLP whose output is normalised before it joins the stream.

MEMIT and its descendants write a change R of the residual stream by changing the edited
projection's output by R: the MLP output is added to the stream as it is. Gemma 2 and 3 put an
RMSNorm after the MLP (``post_feedforward_layernorm``): the stream receives y = g * o / rms(o),
so the output o moves the stream only through that norm. Its gain g is large on some units and
zero on others, and it is blind to the length of o, so a change made for the stream itself
moves it by something else (on Gemma-3-270M, MEMIT's updates grew to norms of 10^4 while
efficacy stayed at 67).

Here a stream change R is turned into the output change that gives it to first order at the
current output o: dy = (g / rms(o)) * (do - o (o . do) / |o|^2), so do = rms(o) * P(R / g) with P
removing the component along o (which the norm ignores) and 1/g taken as 0 where the gain is
below GAIN_FLOOR of the median gain. Such a unit passes almost nothing of the MLP output to the
stream, and reaching its share of R through it would take an output change hundreds of times the
rest: Gemma-3-270M's layer 4 has units at gain 0.0015 against a median of 5.7, and with a floor
relative to the mean gain (which its few gains of several hundred inflate) MEMIT wrote an update
of norm 1,278 there (27-105 on the other layers) and specificity fell from 78 to 60 after one
batch of 100. Later layers read the stream again, so the share left out is theirs to write. The editors then solve for that output change; the layers
written after it see what it really did (each reads the stream again), so what the linearisation
misses is left to them. ROME writes one layer exactly, so a large change keeps its first-order
error (on a tiny Gemma it ends 1.5 times the wanted change away from its target, instead of
hundreds of times without the map). The architecture table names the norm (``mlp_out_norm``).
"""

from __future__ import annotations

import torch

# below this share of the median absolute gain a unit counts as not moved by the norm
GAIN_FLOOR = 0.05


@torch.no_grad()
def norm_gain(norm: torch.nn.Module, width: int, device, dtype=torch.float32) -> torch.Tensor:
    """The elementwise gain g of an RMSNorm-type module: its output on a vector of ones (whose
    root mean square is 1), whatever way the module stores its weight (Gemma's 1 + w)."""
    return norm(torch.ones(1, width, device=device, dtype=dtype)).reshape(width).float()


def stream_change_as_output_change(change: torch.Tensor, outputs: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """(d, n) output changes that move the stream by ``change`` (d, n, one column per request) to
    first order, at the current outputs ``outputs`` (n, d) of the normalised MLP."""
    change64, out64, gain64 = change.double(), outputs.double().T, gain.double().to(change.device)[:, None]
    usable = gain64.abs() > GAIN_FLOOR * gain64.abs().median()
    scaled = torch.where(usable, change64 / torch.where(usable, gain64, torch.ones_like(gain64)),
                         torch.zeros_like(change64))
    along = (out64 * scaled).sum(0, keepdim=True) / (out64 * out64).sum(0, keepdim=True).clamp_min(1e-30)
    rms = out64.pow(2).mean(0, keepdim=True).sqrt()
    return (rms * (scaled - out64 * along)).to(change.dtype)
