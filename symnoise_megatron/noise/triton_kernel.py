"""The Triton kernel behind :mod:`symnoise_megatron.noise.fused` (imported only when used).

fmix32 here is counter_rng's on uint32 words: Triton types the constants above 2**31 as
uint32, so every multiply wraps modulo 2**32 like the reference's 16-bit-split products.
The per-token work (the sample and token keys, the scale in float64 as noise_scale computes
it, the padding mask) happens in the same launch, once per program.
"""

import triton
import triton.language as tl


@triton.jit
def fmix32(x):
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def unit_interval(bits):
    return ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23


@triton.jit
def rounded_product(a, b):
    """a * b rounded on its own (PTX mul.rn is never contracted into an FMA with the add that
    follows; the reference rounds the noise before adding it)."""
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def noise_kernel(x_ptr, out_ptr, uid_ptr, position_ptr, length_ptr, sign_ptr, alpha_ptr, seed_key, sign_value,
                 tokens, seq, hidden, x_stride_b, x_stride_s, out_stride_b, out_stride_s, uid_stride_b, uid_stride_s,
                 position_stride_b, position_stride_s, length_stride_b, length_stride_s,
                 KIND: tl.constexpr, PER_ROW_SIGN: tl.constexpr, ROUNDED_PRODUCT: tl.constexpr,
                 TOKENS: tl.constexpr, BLOCK: tl.constexpr):
    # A program noises a [TOKENS, BLOCK] tile: the per-token work is done once per token and
    # the tile is large enough to keep several 16-byte loads in flight per thread.
    token = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    live = token < tokens
    row, column = token // seq, token % seq
    uid = tl.load(uid_ptr + row * uid_stride_b + column * uid_stride_s, mask=live, other=0)
    position = tl.load(position_ptr + row * position_stride_b + column * position_stride_s, mask=live, other=-1)
    length = tl.load(length_ptr + row * length_stride_b + column * length_stride_s, mask=live, other=0)
    key = fmix32((uid & 0xFFFFFFFF).to(tl.uint32) ^ seed_key.to(tl.uint32))
    key = fmix32(key ^ (uid >> 32).to(tl.uint32))
    key = fmix32(key ^ (position & 0xFFFFFFFF).to(tl.uint32))
    # float64 division and square root are IEEE-rounded on the GPU, as in torch's noise_scale.
    scale = (tl.load(alpha_ptr) / tl.sqrt(tl.maximum(length, 1).to(tl.float64) * hidden)).to(tl.float32)
    real = (position >= 0) & (position < length)
    scale = tl.where(real, scale, 0.0)
    if PER_ROW_SIGN:
        scale = scale * tl.load(sign_ptr + row, mask=live, other=1).to(tl.float32)
    else:
        scale = scale * sign_value
    hidden_index = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = live[:, None] & (hidden_index < hidden)[None, :]
    bits = fmix32(key[:, None] ^ hidden_index.to(tl.uint32)[None, :])
    if KIND == 0:
        eps = unit_interval(bits) * 2.0 - 1.0
    elif KIND == 1:
        eps = 1.0 - 2.0 * (bits >> 31).to(tl.float32)
    else:
        second = fmix32(key[:, None] ^ (hidden_index.to(tl.uint32) | 0x80000000)[None, :])
        radius = tl.sqrt(-2.0 * tl.log(unit_interval(bits)))
        eps = radius * tl.cos(6.283185307179586 * unit_interval(second))
    if ROUNDED_PRODUCT:
        product = rounded_product(eps, tl.broadcast_to(scale[:, None], eps.shape))
    else:
        product = eps * scale[:, None]
    x_offsets = (row * x_stride_b + column * x_stride_s)[:, None] + hidden_index[None, :]
    x = tl.load(x_ptr + x_offsets, mask=inside)
    out_offsets = (row * out_stride_b + column * out_stride_s)[:, None] + hidden_index[None, :]
    tl.store(out_ptr + out_offsets, x + product.to(x.dtype), mask=inside)
