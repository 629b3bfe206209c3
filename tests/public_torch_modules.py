"""The public PyTorch VQ-VAE-2 (rosinality/vq-vae-2-pytorch) in torch, as test reference.

Written from that code's architecture (vqvae.py: VQVAE, Encoder, Decoder, Quantize,
ResBlock; pixelsnail.py: PixelSNAIL, CausalConv2d, GatedResBlock, CausalAttention,
PixelBlock, CondResNet, WNConv2d) with its module names, so `state_dict()` has the keys
of the files its scripts save (weight norm through torch.nn.utils.weight_norm:
`weight_g` / `weight_v`). `randomize` fills every parameter and buffer. Needs torch.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# ----------------------------------------------------------------------------- stage 1


class Quantize(nn.Module):
  """EMA codebook with buffers embed [dim, K], cluster_size [K], embed_avg [dim, K]."""

  def __init__(self, dim: int, n_embed: int, decay: float = 0.99, eps: float = 1e-5):
    super().__init__()
    self.dim, self.n_embed, self.decay, self.eps = dim, n_embed, decay, eps
    embed = torch.randn(dim, n_embed)
    self.register_buffer("embed", embed)
    self.register_buffer("cluster_size", torch.zeros(n_embed))
    self.register_buffer("embed_avg", embed.clone())

  def distances(self, z):
    """z [..., dim] -> squared distances [N, K] as the public code computes them."""
    flat = z.reshape(-1, self.dim)
    return (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed
            + self.embed.pow(2).sum(0, keepdim=True))

  def forward(self, z):
    _, codes = (-self.distances(z)).max(1)
    codes = codes.view(*z.shape[:-1])
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
    return z + (quantized - z).detach(), (quantized.detach() - z).pow(2).mean(), codes

  def embed_code(self, codes):
    return F.embedding(codes, self.embed.transpose(0, 1))


class ResBlock(nn.Module):
  def __init__(self, channel: int, res_channel: int):
    super().__init__()
    self.conv = nn.Sequential(nn.ReLU(), nn.Conv2d(channel, res_channel, 3, padding=1),
                              nn.ReLU(), nn.Conv2d(res_channel, channel, 1))

  def forward(self, x):
    return x + self.conv(x)


class Encoder(nn.Module):
  def __init__(self, in_ch: int, ch: int, n_res: int, res_ch: int, stride: int):
    super().__init__()
    if stride == 4:
      layers = [nn.Conv2d(in_ch, ch // 2, 4, 2, 1), nn.ReLU(), nn.Conv2d(ch // 2, ch, 4, 2, 1),
                nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1)]
    else:
      layers = [nn.Conv2d(in_ch, ch // 2, 4, 2, 1), nn.ReLU(),
                nn.Conv2d(ch // 2, ch, 3, padding=1)]
    layers += [ResBlock(ch, res_ch) for _ in range(n_res)] + [nn.ReLU()]
    self.blocks = nn.Sequential(*layers)

  def forward(self, x):
    return self.blocks(x)


class Decoder(nn.Module):
  def __init__(self, in_ch: int, out_ch: int, ch: int, n_res: int, res_ch: int, stride: int):
    super().__init__()
    layers = [nn.Conv2d(in_ch, ch, 3, padding=1)]
    layers += [ResBlock(ch, res_ch) for _ in range(n_res)] + [nn.ReLU()]
    if stride == 4:
      layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1), nn.ReLU(),
                 nn.ConvTranspose2d(ch // 2, out_ch, 4, 2, 1)]
    else:
      layers += [nn.ConvTranspose2d(ch, out_ch, 4, 2, 1)]
    self.blocks = nn.Sequential(*layers)

  def forward(self, x):
    return self.blocks(x)


class VQVAE(nn.Module):
  def __init__(self, in_channel=3, channel=128, n_res_block=2, n_res_channel=32,
               embed_dim=64, n_embed=512):
    super().__init__()
    self.enc_b = Encoder(in_channel, channel, n_res_block, n_res_channel, 4)
    self.enc_t = Encoder(channel, channel, n_res_block, n_res_channel, 2)
    self.quantize_conv_t = nn.Conv2d(channel, embed_dim, 1)
    self.quantize_t = Quantize(embed_dim, n_embed)
    self.dec_t = Decoder(embed_dim, embed_dim, channel, n_res_block, n_res_channel, 2)
    self.quantize_conv_b = nn.Conv2d(embed_dim + channel, embed_dim, 1)
    self.quantize_b = Quantize(embed_dim, n_embed)
    self.upsample_t = nn.ConvTranspose2d(embed_dim, embed_dim, 4, 2, 1)
    self.dec = Decoder(embed_dim * 2, in_channel, channel, n_res_block, n_res_channel, 4)

  def encode(self, x):
    """x [B, 3, H, W] -> (q_t, q_b, loss, codes_t, codes_b, (z_t, z_b))."""
    enc_b = self.enc_b(x)
    z_t = self.quantize_conv_t(self.enc_t(enc_b)).permute(0, 2, 3, 1)
    q_t, diff_t, id_t = self.quantize_t(z_t)
    q_t = q_t.permute(0, 3, 1, 2)
    z_b = self.quantize_conv_b(torch.cat([self.dec_t(q_t), enc_b], 1)).permute(0, 2, 3, 1)
    q_b, diff_b, id_b = self.quantize_b(z_b)
    return q_t, q_b.permute(0, 3, 1, 2), diff_t + diff_b, id_t, id_b, (z_t, z_b)

  def decode(self, q_t, q_b):
    return self.dec(torch.cat([self.upsample_t(q_t), q_b], 1))

  def decode_code(self, code_t, code_b):
    return self.decode(self.quantize_t.embed_code(code_t).permute(0, 3, 1, 2),
                       self.quantize_b.embed_code(code_b).permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------- PixelSNAIL


class WNConv2d(nn.Module):
  def __init__(self, cin, cout, kernel, padding=0, bias=True):
    super().__init__()
    self.conv = nn.utils.weight_norm(nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias))

  def forward(self, x):
    return self.conv(x)


class CausalConv2d(nn.Module):
  def __init__(self, cin, cout, kernel, padding="downright"):
    super().__init__()
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    pad = [kw - 1, 0, kh - 1, 0] if padding == "downright" else [kw // 2, kw // 2, kh - 1, 0]
    self.causal = kw // 2 if padding == "causal" else 0
    self.pad = nn.ZeroPad2d(pad)
    self.conv = WNConv2d(cin, cout, [kh, kw])

  def forward(self, x):
    if self.causal:
      self.conv.conv.weight_v.data[:, :, -1, self.causal:].zero_()
    return self.conv(self.pad(x))


class GatedResBlock(nn.Module):
  def __init__(self, cin, ch, kernel, conv="wnconv2d", dropout=0.1, auxiliary_channel=0,
               condition_dim=0):
    super().__init__()
    make = ((lambda a, b: WNConv2d(a, b, kernel, padding=kernel // 2)) if conv == "wnconv2d"
            else (lambda a, b: CausalConv2d(a, b, kernel, padding=conv)))
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
  def __init__(self, q_ch, k_ch, ch, n_head=8, dropout=0.1):
    super().__init__()
    self.query = nn.utils.weight_norm(nn.Linear(q_ch, ch))
    self.key = nn.utils.weight_norm(nn.Linear(k_ch, ch))
    self.value = nn.utils.weight_norm(nn.Linear(k_ch, ch))
    self.n_head, self.dim_head = n_head, ch // n_head
    self.dropout = nn.Dropout(dropout)

  def forward(self, query, key):
    b, _, h, w = key.shape
    heads = lambda t: t.view(b, -1, self.n_head, self.dim_head).transpose(1, 2)
    q = heads(self.query(query.view(b, query.shape[1], -1).transpose(1, 2)))
    k_flat = key.view(b, key.shape[1], -1).transpose(1, 2)
    k, v = heads(self.key(k_flat)).transpose(2, 3), heads(self.value(k_flat))
    n = h * w
    allowed = torch.ones(n, n).tril(-1)
    start = torch.ones(n, 1)
    start[0] = 0
    attn = (q @ k / math.sqrt(self.dim_head)).masked_fill(allowed == 0, -1e4)
    attn = self.dropout(torch.softmax(attn, 3) * start)
    out = (attn @ v).transpose(1, 2).reshape(b, h, w, self.dim_head * self.n_head)
    return out.permute(0, 3, 1, 2)


class PixelBlock(nn.Module):
  def __init__(self, ch, res_ch, kernel, n_res_block, attention=True, dropout=0.1,
               condition_dim=0):
    super().__init__()
    self.resblocks = nn.ModuleList([
        GatedResBlock(ch, res_ch, kernel, conv="causal", dropout=dropout,
                      condition_dim=condition_dim) for _ in range(n_res_block)])
    self.attention = attention
    if attention:
      self.key_resblock = GatedResBlock(ch * 2 + 2, ch, 1, dropout=dropout)
      self.query_resblock = GatedResBlock(ch + 2, ch, 1, dropout=dropout)
      self.causal_attention = CausalAttention(ch + 2, ch * 2 + 2, ch // 2, dropout=dropout)
      self.out_resblock = GatedResBlock(ch, ch, 1, auxiliary_channel=ch // 2, dropout=dropout)
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
  def __init__(self, cin, ch, kernel, n_res_block):
    super().__init__()
    self.blocks = nn.Sequential(WNConv2d(cin, ch, kernel, padding=kernel // 2),
                                *[GatedResBlock(ch, ch, kernel) for _ in range(n_res_block)])

  def forward(self, x):
    return self.blocks(x)


class PixelSNAIL(nn.Module):
  def __init__(self, shape, n_class, channel, kernel_size, n_block, n_res_block, res_channel,
               attention=True, dropout=0.1, n_cond_res_block=0, cond_res_channel=0,
               cond_res_kernel=3, n_out_res_block=0):
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
                   dropout=dropout, condition_dim=cond_res_channel) for _ in range(n_block)])
    if n_cond_res_block:
      self.cond_resnet = CondResNet(n_class, cond_res_channel, cond_res_kernel,
                                    n_cond_res_block)
    self.out = nn.Sequential(*[GatedResBlock(channel, res_channel, 1)
                               for _ in range(n_out_res_block)],
                             nn.ELU(), WNConv2d(channel, n_class, 1))

  def forward(self, codes, condition=None):
    b, h, w = codes.shape
    x = F.one_hot(codes, self.n_class).permute(0, 3, 1, 2).type_as(self.background)
    out = (F.pad(self.horizontal(x), [0, 0, 1, 0])[:, :, :h]
           + F.pad(self.vertical(x), [1, 0, 0, 0])[:, :, :, :w])
    background = self.background[:, :, :h].expand(b, 2, h, w)
    if condition is not None:
      c = F.one_hot(condition, self.n_class).permute(0, 3, 1, 2).type_as(self.background)
      condition = F.interpolate(self.cond_resnet(c), scale_factor=2)[:, :, :h]
    for block in self.blocks:
      out = block(out, background, condition=condition)
    return self.out(out)


def randomize(module: nn.Module, seed: int) -> None:
  """Every parameter and buffer (the coordinate background aside) drawn at random, at a
  scale that keeps activations O(1); cluster sizes positive as after training."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
      if name.endswith("background"):
        continue
      if name.endswith("cluster_size"):
        p.copy_(torch.rand(p.shape, generator=g) * 5 + 0.1)
      elif name.endswith("weight_g"):
        p.copy_(torch.rand(p.shape, generator=g) + 0.5)
      else:
        fan_in = max(1, p[0].numel()) if p.dim() > 1 else 4
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def spread_codebooks(vq: VQVAE, images: torch.Tensor, seed: int) -> None:
  """Each codebook set to encoder outputs of `images` (plus noise), so real images use
  many codes as after training; embed_avg stays random (a buffer of its own)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for quantize, which in ((vq.quantize_t, 0), (vq.quantize_b, 1)):
      z = vq.encode(images)[5][which].reshape(-1, quantize.dim)
      rows = torch.randperm(len(z), generator=g)[:quantize.n_embed]
      noise = 0.1 * z.std() * torch.randn(quantize.n_embed, quantize.dim, generator=g)
      quantize.embed.copy_((z[rows] + noise).T)
