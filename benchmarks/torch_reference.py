"""A PyTorch VQ-VAE-2 and PixelSNAIL top prior shaped like the most used public PyTorch port.

Written from the public architecture's description (rosinality/vq-vae-2-pytorch), for
side-by-side timing only: `benchmarks/bench_vqvae.py --torch` and
`benchmarks/bench_prior.py --torch` build these with the same widths as the JAX model and
time both in one process. Layout is PyTorch's default NCHW, as in the public code.

Stage 1 (`TorchVQVAE`, two levels, bottom stride 4, top stride 8):
  enc_b:  conv4x4/2 (C/2) - relu - conv4x4/2 (C) - relu - conv3x3 (C) - res blocks - relu
  enc_t:  conv4x4/2 (C/2) - relu - conv3x3 (C) - res blocks - relu
  q_t  = Quantize(conv1x1(enc_t) -> D)
  dec_t: conv3x3 (C) - res blocks - relu - convT4x4/2 (D)         (top decoded to stride 4)
  q_b  = Quantize(conv1x1([dec_t(q_t), enc_b]) -> D)
  dec:   conv3x3 on [convT4x4/2(q_t), q_b] (C) - res blocks - relu
         - convT4x4/2 (C/2) - relu - convT4x4/2 (3)
  res block: x + conv1x1(relu(conv3x3(relu(x)))) with `n_res_channel` inner channels.
  Quantize: EMA codebook (decay 0.99, Laplace-smoothed counts, eps 1e-5), straight-through,
  latent loss mean((sg[q] - z)^2). Training loss: MSE + 0.25 * latent loss, Adam.

Top prior (`TorchPixelSNAIL`, unconditional, 32x32): one-hot input; a down-shifted
[k//2, k] causal conv plus a right-shifted [(k+1)//2, k//2] down-right conv; `n_block`
blocks, each `n_res_block` gated residual blocks with masked k x k causal convs
(x + GLU(conv2(elu(conv1(elu(x)))))), then attention over [input, out, coordinates] keys
and [out, coordinates] queries (each through a 1x1 gated block, `channel // 2` attention
width, 8 heads), merged by a 1x1 gated block with the attention output as auxiliary input;
head: elu - conv1x1 to the K logits. Convolutions are weight-normalised.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations


# ----------------------------------------------------------------------------- stage 1


class QuantizeEMA(nn.Module):
  """EMA vector quantizer over the last axis: z float [..., D] -> (q, latent loss, codes)."""

  def __init__(self, dim: int, n_embed: int, decay: float = 0.99, eps: float = 1e-5):
    super().__init__()
    self.dim, self.n_embed, self.decay, self.eps = dim, n_embed, decay, eps
    embed = torch.randn(dim, n_embed)
    self.register_buffer("embed", embed)
    self.register_buffer("cluster_size", torch.zeros(n_embed))
    self.register_buffer("embed_avg", embed.clone())

  def forward(self, z: torch.Tensor):
    flat = z.reshape(-1, self.dim)
    dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed
            + self.embed.pow(2).sum(0, keepdim=True))
    codes = dist.argmin(1)
    onehot = F.one_hot(codes, self.n_embed).type(flat.dtype)
    codes = codes.view(*z.shape[:-1])
    quantized = self.embed_code(codes)
    if self.training:
      with torch.no_grad():
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(flat.transpose(0, 1) @ onehot,
                                             alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.n_embed * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(0))
    loss = (quantized.detach() - z).pow(2).mean()
    quantized = z + (quantized - z).detach()
    return quantized, loss, codes

  def embed_code(self, codes: torch.Tensor) -> torch.Tensor:
    """int64 [...] -> float [..., D]."""
    return F.embedding(codes, self.embed.transpose(0, 1))


class ResBlock(nn.Module):
  """x + conv1x1(relu(conv3x3(relu(x))))."""

  def __init__(self, channel: int, res_channel: int):
    super().__init__()
    self.conv = nn.Sequential(nn.ReLU(), nn.Conv2d(channel, res_channel, 3, padding=1),
                              nn.ReLU(inplace=True), nn.Conv2d(res_channel, channel, 1))

  def forward(self, x):
    return x + self.conv(x)


class Encoder(nn.Module):
  """Strided 4x4 convs (stride 4 or 2 overall), 3x3 conv, residual blocks, ReLU."""

  def __init__(self, in_ch: int, ch: int, n_res: int, res_ch: int, stride: int):
    super().__init__()
    if stride == 4:
      layers = [nn.Conv2d(in_ch, ch // 2, 4, 2, 1), nn.ReLU(inplace=True),
                nn.Conv2d(ch // 2, ch, 4, 2, 1), nn.ReLU(inplace=True),
                nn.Conv2d(ch, ch, 3, padding=1)]
    elif stride == 2:
      layers = [nn.Conv2d(in_ch, ch // 2, 4, 2, 1), nn.ReLU(inplace=True),
                nn.Conv2d(ch // 2, ch, 3, padding=1)]
    else:
      raise ValueError(f"encoder stride must be 2 or 4, got {stride}")
    layers += [ResBlock(ch, res_ch) for _ in range(n_res)] + [nn.ReLU(inplace=True)]
    self.blocks = nn.Sequential(*layers)

  def forward(self, x):
    return self.blocks(x)


class Decoder(nn.Module):
  """3x3 conv, residual blocks, ReLU, then 4x4 stride-2 transposed convs (x2 or x4)."""

  def __init__(self, in_ch: int, out_ch: int, ch: int, n_res: int, res_ch: int,
               stride: int):
    super().__init__()
    layers = [nn.Conv2d(in_ch, ch, 3, padding=1)]
    layers += [ResBlock(ch, res_ch) for _ in range(n_res)] + [nn.ReLU(inplace=True)]
    if stride == 4:
      layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1), nn.ReLU(inplace=True),
                 nn.ConvTranspose2d(ch // 2, out_ch, 4, 2, 1)]
    elif stride == 2:
      layers += [nn.ConvTranspose2d(ch, out_ch, 4, 2, 1)]
    else:
      raise ValueError(f"decoder stride must be 2 or 4, got {stride}")
    self.blocks = nn.Sequential(*layers)

  def forward(self, x):
    return self.blocks(x)


class TorchVQVAE(nn.Module):
  """Two-level VQ-VAE-2 (top stride 8, bottom stride 4) on float images [B, 3, H, W]."""

  def __init__(self, in_channel: int = 3, channel: int = 128, n_res_block: int = 2,
               n_res_channel: int = 32, embed_dim: int = 64, n_embed: int = 512,
               decay: float = 0.99):
    super().__init__()
    self.enc_b = Encoder(in_channel, channel, n_res_block, n_res_channel, 4)
    self.enc_t = Encoder(channel, channel, n_res_block, n_res_channel, 2)
    self.quantize_conv_t = nn.Conv2d(channel, embed_dim, 1)
    self.quantize_t = QuantizeEMA(embed_dim, n_embed, decay)
    self.dec_t = Decoder(embed_dim, embed_dim, channel, n_res_block, n_res_channel, 2)
    self.quantize_conv_b = nn.Conv2d(embed_dim + channel, embed_dim, 1)
    self.quantize_b = QuantizeEMA(embed_dim, n_embed, decay)
    self.upsample_t = nn.ConvTranspose2d(embed_dim, embed_dim, 4, 2, 1)
    self.dec = Decoder(embed_dim * 2, in_channel, channel, n_res_block, n_res_channel, 4)

  def forward(self, x):
    """x float [B, 3, H, W] -> (reconstruction, latent loss)."""
    quant_t, quant_b, diff, _, _ = self.encode(x)
    return self.decode(quant_t, quant_b), diff

  def encode(self, x):
    """-> (q_t [B, D, H/8, W/8], q_b [B, D, H/4, W/4], latent loss, codes_t, codes_b)."""
    enc_b = self.enc_b(x)
    enc_t = self.enc_t(enc_b)
    q_t, diff_t, id_t = self.quantize_t(self.quantize_conv_t(enc_t).permute(0, 2, 3, 1))
    q_t = q_t.permute(0, 3, 1, 2)
    dec_t = self.dec_t(q_t)
    q_b, diff_b, id_b = self.quantize_b(
        self.quantize_conv_b(torch.cat([dec_t, enc_b], 1)).permute(0, 2, 3, 1))
    return q_t, q_b.permute(0, 3, 1, 2), diff_t + diff_b, id_t, id_b

  def decode(self, q_t, q_b):
    return self.dec(torch.cat([self.upsample_t(q_t), q_b], 1))

  def decode_code(self, code_t, code_b):
    """int64 codes [B, H/8, W/8], [B, H/4, W/4] -> float images [B, 3, H, W]."""
    q_t = self.quantize_t.embed_code(code_t).permute(0, 3, 1, 2)
    q_b = self.quantize_b.embed_code(code_b).permute(0, 3, 1, 2)
    return self.decode(q_t, q_b)


def vqvae_loss(model: TorchVQVAE, images: torch.Tensor, beta: float = 0.25) -> torch.Tensor:
  """MSE + beta * latent loss on float images [B, 3, H, W] in [-1, 1]."""
  recon, latent = model(images)
  return F.mse_loss(recon, images) + beta * latent.mean()


def num_params(model: nn.Module) -> int:
  """Trainable parameters (EMA codebooks are buffers, as in the JAX model's vq_stats)."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- prior


def wn_conv(cin: int, cout: int, kernel, padding=0, bias: bool = True) -> nn.Module:
  return parametrizations.weight_norm(nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias))


def wn_linear(cin: int, cout: int) -> nn.Module:
  return parametrizations.weight_norm(nn.Linear(cin, cout))


class CausalConv(nn.Module):
  """Zero-pad then conv. 'down': [kh, kw] window above (and on) the row; 'downright':
  window above-left; 'causal': k x k window with the current row's right half masked."""

  def __init__(self, cin: int, cout: int, kernel, padding: str):
    super().__init__()
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    if padding == "downright":
      pad = (kw - 1, 0, kh - 1, 0)
    elif padding in ("down", "causal"):
      pad = (kw // 2, kw // 2, kh - 1, 0)
    else:
      raise ValueError(f"unknown causal padding {padding!r}")
    self.masked_cols = kw // 2 if padding == "causal" else 0
    self.pad = nn.ZeroPad2d(pad)
    self.conv = wn_conv(cin, cout, (kh, kw))

  def forward(self, x):
    if self.masked_cols:
      # The last kernel row may only see columns left of (and at) the centre.
      with torch.no_grad():
        self.conv.parametrizations.weight.original1[:, :, -1, self.masked_cols:].zero_()
    return self.conv(self.pad(x))


class GatedResBlock(nn.Module):
  """x + GLU(conv2(dropout(elu(conv1(elu(x)) + aux_conv(elu(aux))))) + cond)."""

  def __init__(self, cin: int, ch: int, kernel: int, conv: str = "wn", dropout: float = 0.1,
               aux_channel: int = 0):
    super().__init__()
    if conv == "wn":
      make = lambda a, b: wn_conv(a, b, kernel, padding=kernel // 2)
    else:
      make = lambda a, b: CausalConv(a, b, kernel, conv)
    self.conv1 = make(cin, ch)
    self.aux_conv = wn_conv(aux_channel, ch, 1) if aux_channel else None
    self.dropout = nn.Dropout(dropout)
    self.conv2 = make(ch, cin * 2)

  def forward(self, x, aux=None):
    out = self.conv1(F.elu(x))
    if self.aux_conv is not None:
      out = out + self.aux_conv(F.elu(aux))
    out = self.conv2(self.dropout(F.elu(out)))
    return x + F.glu(out, 1)


class CausalAttention(nn.Module):
  """Strictly causal multi-head attention: query [B, Cq, H, W], key [B, Ck, H, W]."""

  def __init__(self, q_ch: int, k_ch: int, ch: int, n_head: int = 8, dropout: float = 0.1):
    super().__init__()
    self.query, self.key, self.value = (wn_linear(q_ch, ch), wn_linear(k_ch, ch),
                                        wn_linear(k_ch, ch))
    self.n_head, self.dim_head = n_head, ch // n_head
    self.dropout = nn.Dropout(dropout)

  def forward(self, query, key):
    b, _, h, w = key.shape
    heads = lambda t: t.view(b, -1, self.n_head, self.dim_head).transpose(1, 2)
    q_flat = query.flatten(2).transpose(1, 2)
    k_flat = key.flatten(2).transpose(1, 2)
    q, k, v = heads(self.query(q_flat)), heads(self.key(k_flat)), heads(self.value(k_flat))
    attn = q @ k.transpose(2, 3) / math.sqrt(self.dim_head)
    n = h * w
    mask = torch.ones(n, n, dtype=torch.bool, device=key.device).triu(0)  # strict: < p
    start = torch.ones(n, 1, device=key.device)
    start[0] = 0
    attn = torch.softmax(attn.masked_fill(mask, -1e4), 3) * start
    out = self.dropout(attn) @ v
    return out.transpose(1, 2).reshape(b, h, w, -1).permute(0, 3, 1, 2)


class PixelBlock(nn.Module):
  """`n_res_block` causal gated blocks, then attention merged by a 1x1 gated block."""

  def __init__(self, ch: int, res_ch: int, kernel: int, n_res_block: int, dropout: float):
    super().__init__()
    self.res = nn.ModuleList([GatedResBlock(ch, res_ch, kernel, "causal", dropout)
                              for _ in range(n_res_block)])
    self.key_res = GatedResBlock(ch * 2 + 2, ch * 2 + 2, 1, dropout=dropout)
    self.query_res = GatedResBlock(ch + 2, ch + 2, 1, dropout=dropout)
    self.attn = CausalAttention(ch + 2, ch * 2 + 2, ch // 2, dropout=dropout)
    self.out_res = GatedResBlock(ch, res_ch, 1, dropout=dropout, aux_channel=ch // 2)

  def forward(self, x, background):
    out = x
    for block in self.res:
      out = block(out)
    key = self.key_res(torch.cat([x, out, background], 1))
    query = self.query_res(torch.cat([out, background], 1))
    return self.out_res(out, self.attn(query, key))


class TorchPixelSNAIL(nn.Module):
  """Unconditional PixelSNAIL top prior: int64 codes [B, H, W] -> logits [B, K, H, W]."""

  def __init__(self, shape=(32, 32), n_class: int = 512, channel: int = 256,
               kernel_size: int = 5, n_block: int = 4, n_res_block: int = 4,
               res_channel: int = 256, dropout: float = 0.1):
    super().__init__()
    self.n_class = n_class
    k = kernel_size
    self.horizontal = CausalConv(n_class, channel, [k // 2, k], "down")
    self.vertical = CausalConv(n_class, channel, [(k + 1) // 2, k // 2], "downright")
    h, w = shape
    ys = (torch.arange(h).float() - h / 2) / h
    xs = (torch.arange(w).float() - w / 2) / w
    grid = torch.stack([ys[:, None].expand(h, w), xs[None, :].expand(h, w)])
    self.register_buffer("background", grid[None])
    self.blocks = nn.ModuleList([PixelBlock(channel, res_channel, k, n_res_block, dropout)
                                 for _ in range(n_block)])
    self.out = nn.Sequential(nn.ELU(), wn_conv(channel, n_class, 1))

  def forward(self, codes):
    x = F.one_hot(codes, self.n_class).permute(0, 3, 1, 2).float()
    down = F.pad(self.horizontal(x), (0, 0, 1, 0))[:, :, :-1]   # rows < i
    right = F.pad(self.vertical(x), (1, 0, 0, 0))[:, :, :, :-1]  # row i, columns < j
    out = down + right
    bg = self.background.expand(codes.shape[0], -1, -1, -1)
    for block in self.blocks:
      out = block(out, bg)
    return self.out(out)


def prior_loss(model: TorchPixelSNAIL, codes: torch.Tensor) -> torch.Tensor:
  """Mean cross-entropy (nats per latent) of int64 codes [B, H, W]."""
  return F.cross_entropy(model(codes), codes)
