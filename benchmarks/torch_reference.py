"""The public PyTorch VQ-VAE-2 and PixelSNAIL (rosinality/vq-vae-2-pytorch), written anew.

Written from that code's architecture (vqvae.py: VQVAE, Encoder, Decoder, Quantize,
ResBlock; pixelsnail.py: PixelSNAIL, CausalConv2d, GatedResBlock, CausalAttention,
PixelBlock, CondResNet, WNConv2d) with its module names, so `state_dict()` has the keys of
the files its scripts save (weight norm as there, torch.nn.utils.weight_norm: `weight_g` /
`weight_v`). Layout is PyTorch's default NCHW, as in the public code. Two users:

  * benchmarks: `bench_vqvae.py --torch` and `bench_prior.py --torch` build these with the
    JAX model's widths and time both in one process;
  * tests/test_import_torch.py: checkpoints of the public layout, imported by
    `python -m vqvae2_jax.import_torch` and compared with these models' outputs.

The one difference between the two uses is `TorchPixelSNAIL(public_widths=...)`: the
benchmark's top prior widens the attention half of each block (see PixelBlock).

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

Prior (`TorchPixelSNAIL`): one-hot input; a down-shifted [k//2, k] causal conv plus a
right-shifted [(k+1)//2, k//2] down-right conv; `n_block` blocks, each `n_res_block` gated
residual blocks with masked k x k causal convs (x + GLU(conv2(elu(conv1(elu(x)))))), then
either attention over [input, out, coordinates] keys and [out, coordinates] queries (each
through a 1x1 gated block, `channel // 2` attention width, 8 heads), merged by a 1x1 gated
block with the attention output as auxiliary input, or (attention=False) a 1x1 conv of
[out, coordinates]; optional conditioning on upper codes (a gated CondResNet, upsampled
x2, added inside every causal gated block); head: `n_out_res_block` 1x1 gated blocks, elu,
conv1x1 to the K logits. Convolutions and attention projections are weight-normalised.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F

# ----------------------------------------------------------------------------- stage 1


class QuantizeEMA(nn.Module):
  """EMA vector quantizer over the last axis: z float [..., D] -> (q, latent loss, codes).

  Buffers as the public Quantize: embed [D, K], cluster_size [K], embed_avg [D, K]."""

  def __init__(self, dim: int, n_embed: int, decay: float = 0.99, eps: float = 1e-5):
    super().__init__()
    self.dim, self.n_embed, self.decay, self.eps = dim, n_embed, decay, eps
    embed = torch.randn(dim, n_embed)
    self.register_buffer("embed", embed)
    self.register_buffer("cluster_size", torch.zeros(n_embed))
    self.register_buffer("embed_avg", embed.clone())

  def distances(self, z: torch.Tensor) -> torch.Tensor:
    """z [..., D] -> squared distances [N, K] as the public code computes them."""
    flat = z.reshape(-1, self.dim)
    return (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed
            + self.embed.pow(2).sum(0, keepdim=True))

  def forward(self, z: torch.Tensor):
    codes = self.distances(z).argmin(1).view(*z.shape[:-1])
    quantized = self.embed_code(codes)  # looked up before this step's update
    if self.training:  # the EMA step: counts, sums, Laplace-smoothed codebook
      with torch.no_grad():
        onehot = F.one_hot(codes.reshape(-1), self.n_embed).type(z.dtype)
        flat = z.reshape(-1, self.dim)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(flat.transpose(0, 1) @ onehot,
                                             alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.n_embed * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(0))
    loss = (quantized.detach() - z).pow(2).mean()
    return z + (quantized - z).detach(), loss, codes

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

  def encode(self, x, return_latents: bool = False):
    """-> (q_t [B, D, H/8, W/8], q_b [B, D, H/4, W/4], latent loss, codes_t, codes_b), as
    the public code; with return_latents also the quantizers' inputs (z_t [B, H/8, W/8, D],
    z_b [B, H/4, W/4, D])."""
    enc_b = self.enc_b(x)
    z_t = self.quantize_conv_t(self.enc_t(enc_b)).permute(0, 2, 3, 1)
    q_t, diff_t, id_t = self.quantize_t(z_t)
    q_t = q_t.permute(0, 3, 1, 2)
    z_b = self.quantize_conv_b(torch.cat([self.dec_t(q_t), enc_b], 1)).permute(0, 2, 3, 1)
    q_b, diff_b, id_b = self.quantize_b(z_b)
    out = (q_t, q_b.permute(0, 3, 1, 2), diff_t + diff_b, id_t, id_b)
    return out + ((z_t, z_b),) if return_latents else out

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


def weight_normed(module: nn.Module) -> nn.Module:
  """The public code's weight norm (parameters `weight_g`, `weight_v`), whose state-dict
  keys its checkpoints have; torch deprecates this form for the parametrized one."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    return nn.utils.weight_norm(module)


class WNConv2d(nn.Module):
  def __init__(self, cin: int, cout: int, kernel, padding=0, bias: bool = True):
    super().__init__()
    self.conv = weight_normed(nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias))

  def forward(self, x):
    return self.conv(x)


class CausalConv2d(nn.Module):
  """Zero-pad then conv. 'down': [kh, kw] window above (and on) the row; 'downright':
  window above-left; 'causal': k x k window with the current row's right half masked."""

  def __init__(self, cin: int, cout: int, kernel, padding: str = "downright"):
    super().__init__()
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    if padding == "downright":
      pad = (kw - 1, 0, kh - 1, 0)
    elif padding in ("down", "causal"):
      pad = (kw // 2, kw // 2, kh - 1, 0)
    else:
      raise ValueError(f"unknown causal padding {padding!r}")
    self.causal = kw // 2 if padding == "causal" else 0
    self.pad = nn.ZeroPad2d(pad)
    self.conv = WNConv2d(cin, cout, (kh, kw))

  def forward(self, x):
    if self.causal:
      # The last kernel row may only see columns left of (and at) the centre.
      self.conv.conv.weight_v.data[:, :, -1, self.causal:].zero_()
    return self.conv(self.pad(x))


class GatedResBlock(nn.Module):
  """x + GLU(conv2(dropout(elu(conv1(elu(x)) + aux_conv(elu(aux))))) + condition(c))."""

  def __init__(self, cin: int, ch: int, kernel: int, conv: str = "wnconv2d",
               dropout: float = 0.1, auxiliary_channel: int = 0, condition_dim: int = 0):
    super().__init__()
    if conv == "wnconv2d":
      make = lambda a, b: WNConv2d(a, b, kernel, padding=kernel // 2)
    else:
      make = lambda a, b: CausalConv2d(a, b, kernel, padding=conv)
    self.conv1 = make(cin, ch)
    if auxiliary_channel:
      self.aux_conv = WNConv2d(auxiliary_channel, ch, 1)
    self.dropout = nn.Dropout(dropout)
    self.conv2 = make(ch, cin * 2)
    if condition_dim:
      self.condition = WNConv2d(condition_dim, cin * 2, 1, bias=False)

  def forward(self, x, aux=None, condition=None):
    out = self.conv1(F.elu(x))
    if aux is not None:
      out = out + self.aux_conv(F.elu(aux))
    out = self.conv2(self.dropout(F.elu(out)))
    if condition is not None:
      out = out + self.condition(condition)
    return x + F.glu(out, 1)


class CausalAttention(nn.Module):
  """Strictly causal multi-head attention: query [B, Cq, H, W], key [B, Ck, H, W]."""

  def __init__(self, q_ch: int, k_ch: int, ch: int, n_head: int = 8, dropout: float = 0.1):
    super().__init__()
    self.query = weight_normed(nn.Linear(q_ch, ch))
    self.key = weight_normed(nn.Linear(k_ch, ch))
    self.value = weight_normed(nn.Linear(k_ch, ch))
    self.n_head, self.dim_head = n_head, ch // n_head
    self.dropout = nn.Dropout(dropout)

  def forward(self, query, key):
    b, _, h, w = key.shape
    heads = lambda t: t.view(b, -1, self.n_head, self.dim_head).transpose(1, 2)
    k_flat = key.flatten(2).transpose(1, 2)
    q = heads(self.query(query.flatten(2).transpose(1, 2)))
    k, v = heads(self.key(k_flat)), heads(self.value(k_flat))
    attn = q @ k.transpose(2, 3) / math.sqrt(self.dim_head)
    n = h * w
    later = torch.ones(n, n, dtype=torch.bool, device=key.device).triu(0)  # keep < p only
    start = torch.ones(n, 1, device=key.device)
    start[0] = 0
    attn = self.dropout(torch.softmax(attn.masked_fill(later, -1e4), 3) * start)
    out = (attn @ v).transpose(1, 2).reshape(b, h, w, self.dim_head * self.n_head)
    return out.permute(0, 3, 1, 2)


class PixelBlock(nn.Module):
  """`n_res_block` causal gated blocks, then attention merged by a 1x1 gated block (or,
  without attention, a 1x1 conv of [out, coordinates]).

  public_widths: the key and query gated blocks `ch` wide inside, the merging block `ch`
  wide, as in the public code. False: the key and query blocks as wide as their inputs
  (2ch+2, ch+2) and the merging block `res_ch` wide, the widths of the benchmark's top
  prior (86.5M parameters at TorchPixelSNAIL's defaults, 84.9M with the public widths).
  """

  def __init__(self, ch: int, res_ch: int, kernel: int, n_res_block: int,
               attention: bool = True, dropout: float = 0.1, condition_dim: int = 0, *,
               public_widths: bool):
    super().__init__()
    self.resblocks = nn.ModuleList([
        GatedResBlock(ch, res_ch, kernel, conv="causal", dropout=dropout,
                      condition_dim=condition_dim) for _ in range(n_res_block)])
    self.attention = attention
    if attention:
      key_ch, query_ch = ch * 2 + 2, ch + 2
      key_inner, query_inner, out_inner = ((ch, ch, ch) if public_widths
                                           else (key_ch, query_ch, res_ch))
      self.key_resblock = GatedResBlock(key_ch, key_inner, 1, dropout=dropout)
      self.query_resblock = GatedResBlock(query_ch, query_inner, 1, dropout=dropout)
      self.causal_attention = CausalAttention(query_ch, key_ch, ch // 2, dropout=dropout)
      self.out_resblock = GatedResBlock(ch, out_inner, 1, auxiliary_channel=ch // 2,
                                        dropout=dropout)
    else:
      self.out = WNConv2d(ch + 2, ch, 1)

  def forward(self, x, background, condition=None):
    out = x
    for block in self.resblocks:
      out = block(out, condition=condition)
    if not self.attention:
      return self.out(torch.cat([out, background], 1))
    key = self.key_resblock(torch.cat([x, out, background], 1))
    query = self.query_resblock(torch.cat([out, background], 1))
    return self.out_resblock(out, self.causal_attention(query, key))


class CondResNet(nn.Module):
  def __init__(self, cin: int, ch: int, kernel: int, n_res_block: int):
    super().__init__()
    self.blocks = nn.Sequential(WNConv2d(cin, ch, kernel, padding=kernel // 2),
                                *[GatedResBlock(ch, ch, kernel) for _ in range(n_res_block)])

  def forward(self, x):
    return self.blocks(x)


class TorchPixelSNAIL(nn.Module):
  """PixelSNAIL prior: int64 codes [B, H, W] (and upper codes [B, H/2, W/2] when
  n_cond_res_block > 0) -> logits [B, K, H, W]. The sizes default to the public
  train_pixelsnail.py top prior's; `public_widths` as in PixelBlock (off: the benchmark's
  widths; the public checkpoints need it on)."""

  def __init__(self, shape=(32, 32), n_class: int = 512, channel: int = 256,
               kernel_size: int = 5, n_block: int = 4, n_res_block: int = 4,
               res_channel: int = 256, attention: bool = True, dropout: float = 0.1,
               n_cond_res_block: int = 0, cond_res_channel: int = 0,
               cond_res_kernel: int = 3, n_out_res_block: int = 0,
               public_widths: bool = False):
    super().__init__()
    self.n_class = n_class
    k = kernel_size + 1 if kernel_size % 2 == 0 else kernel_size
    self.horizontal = CausalConv2d(n_class, channel, [k // 2, k], padding="down")
    self.vertical = CausalConv2d(n_class, channel, [(k + 1) // 2, k // 2], padding="downright")
    h, w = shape
    rows = ((torch.arange(h).float() - h / 2) / h).view(1, 1, h, 1).expand(1, 1, h, w)
    cols = ((torch.arange(w).float() - w / 2) / w).view(1, 1, 1, w).expand(1, 1, h, w)
    self.register_buffer("background", torch.cat([rows, cols], 1))
    self.blocks = nn.ModuleList([
        PixelBlock(channel, res_channel, kernel_size, n_res_block, attention=attention,
                   dropout=dropout, condition_dim=cond_res_channel,
                   public_widths=public_widths) for _ in range(n_block)])
    if n_cond_res_block:
      self.cond_resnet = CondResNet(n_class, cond_res_channel, cond_res_kernel,
                                    n_cond_res_block)
    self.out = nn.Sequential(*[GatedResBlock(channel, res_channel, 1)
                               for _ in range(n_out_res_block)],
                             nn.ELU(), WNConv2d(channel, n_class, 1))

  def forward(self, codes, condition=None):
    b, h, w = codes.shape
    x = F.one_hot(codes, self.n_class).permute(0, 3, 1, 2).type_as(self.background)
    out = (F.pad(self.horizontal(x), [0, 0, 1, 0])[:, :, :h]     # rows < i
           + F.pad(self.vertical(x), [1, 0, 0, 0])[:, :, :, :w])  # row i, columns < j
    background = self.background[:, :, :h].expand(b, 2, h, w)
    if condition is not None:
      c = F.one_hot(condition, self.n_class).permute(0, 3, 1, 2).type_as(self.background)
      condition = F.interpolate(self.cond_resnet(c), scale_factor=2)[:, :, :h]
    for block in self.blocks:
      out = block(out, background, condition=condition)
    return self.out(out)


def prior_loss(model: TorchPixelSNAIL, codes: torch.Tensor) -> torch.Tensor:
  """Mean cross-entropy (nats per latent) of int64 codes [B, H, W]."""
  return F.cross_entropy(model(codes), codes)
