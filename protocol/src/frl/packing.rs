//! The packed wire format of a ranking (module docs of [`super`]):
//! [`encode`], [`decode`], [`packed_len`], and the block scanner the vote
//! reads payloads with.

use super::ranking::{mark, offsets_of};
use super::{FrlError, Ranking, check_layer_sizes};
#[cfg(doc)]
use super::{MAX_RANKED_EDGES, MAX_RANKED_LAYERS};

/// Bits per entry for a layer of `n` edges: `⌈log₂ n⌉`, 0 for `n ≤ 1`.
pub const fn index_bits(n: usize) -> u32 {
    if n <= 1 { 0 } else { usize::BITS - (n - 1).leading_zeros() }
}

/// Bytes of a layer's block: `⌈n·⌈log₂ n⌉ / 8⌉`.
fn block_len(n: usize) -> usize {
    (n * index_bits(n) as usize).div_ceil(8)
}

/// Exact length of a packed ranking over `layer_sizes` (checked first).
pub fn packed_len(layer_sizes: &[usize]) -> Result<usize, FrlError> {
    check_layer_sizes(layer_sizes)?;
    Ok(layer_sizes.iter().map(|&n| block_len(n)).sum())
}
/// Encodes a ranking in the packed wire format (module docs).
pub fn encode(ranking: &Ranking) -> Vec<u8> {
    let mut out = Vec::with_capacity(ranking.layer_sizes().map(block_len).sum());
    for layer in ranking.layers() {
        pack_layer(layer, index_bits(layer.len()), &mut out);
    }
    out
}

/// Appends one layer's block: a 64-bit accumulator flushed 32 bits at a time.
pub(super) fn pack_layer(layer: &[u32], bits: u32, out: &mut Vec<u8>) {
    if bits == 0 {
        return;
    }
    let mut acc = 0u64;
    let mut held = 0u32; // bits in `acc`, < 32 between entries
    for &v in layer {
        acc |= u64::from(v) << held;
        held += bits; // < 32 + 24
        if held >= 32 {
            out.extend_from_slice(&(acc as u32).to_le_bytes());
            acc >>= 32;
            held -= 32;
        }
    }
    // The rest of the last word; bits above `held` are zero (padding).
    let tail = held.div_ceil(8) as usize;
    out.extend_from_slice(&(acc as u32).to_le_bytes()[..tail]);
}

/// Reads 8 bytes at `byte` as a little-endian u64, zero-extended past the end.
#[inline(always)]
fn load_le_u64(block: &[u8], byte: usize) -> u64 {
    match block.get(byte..).and_then(<[u8]>::first_chunk::<8>) {
        Some(chunk) => u64::from_le_bytes(*chunk),
        None => {
            let rest = block.get(byte..).unwrap_or(&[]);
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            u64::from_le_bytes(buf)
        }
    }
}

/// Calls `f(i, entry_i)` for the `n` entries of a `bits`-wide block in order
/// while it returns true; returns the index at which it returned false. Each
/// entry is one unaligned 64-bit load, a shift and a mask (no per-bit work).
#[inline(always)]
pub(super) fn scan_block(block: &[u8], n: usize, bits: u32, mut f: impl FnMut(usize, u32) -> bool) -> Option<usize> {
    let mask = (1u64 << bits) - 1; // bits ≤ MAX_INDEX_BITS < 64
    let mut bit = 0usize;
    for i in 0..n {
        let v = ((load_le_u64(block, bit >> 3) >> (bit & 7)) & mask) as u32;
        if !f(i, v) {
            return Some(i);
        }
        bit += bits as usize;
    }
    None
}

/// Checks a payload's length and every layer's padding; returns each
/// layer's block (no entry is read).
pub(super) fn split_blocks<'a>(bytes: &'a [u8], layer_sizes: &[usize]) -> Result<Vec<&'a [u8]>, FrlError> {
    let expected = packed_len(layer_sizes)?;
    if bytes.len() < expected {
        return Err(FrlError::Truncated { expected, got: bytes.len() });
    }
    if bytes.len() > expected {
        return Err(FrlError::TrailingBytes { extra: bytes.len() - expected });
    }
    let mut blocks = Vec::with_capacity(layer_sizes.len());
    let mut rest = bytes;
    for (layer, &n) in layer_sizes.iter().enumerate() {
        let (block, tail) = rest.split_at(block_len(n));
        let used = (n * index_bits(n) as usize) % 8;
        if used != 0 && block.last().is_some_and(|&last| last >> used != 0) {
            return Err(FrlError::NonZeroPadding { layer });
        }
        blocks.push(block);
        rest = tail;
    }
    Ok(blocks)
}

/// Decodes a packed ranking for a run with `layer_sizes` (module docs),
/// refusing wrong lengths, non-zero padding and non-permutations. Never
/// panics: the only sizes it allocates for come from `layer_sizes`, which are
/// checked against [`MAX_RANKED_EDGES`] and [`MAX_RANKED_LAYERS`].
pub fn decode(bytes: &[u8], layer_sizes: &[usize]) -> Result<Ranking, FrlError> {
    let blocks = split_blocks(bytes, layer_sizes)?;
    let offsets = offsets_of(layer_sizes);
    let mut order = vec![0u32; offsets[layer_sizes.len()]];
    let mut seen = Vec::new();
    for (layer, (block, w)) in blocks.iter().zip(offsets.windows(2)).enumerate() {
        let (n, out) = (w[1] - w[0], &mut order[w[0]..w[1]]);
        seen.clear();
        seen.resize(n.div_ceil(64), 0);
        let mut dup = false;
        let stop = scan_block(block, n, index_bits(n), |i, v| {
            out[i] = v;
            mark(&mut seen, n, v).map_err(|d| dup = d).is_ok()
        });
        if let Some(index) = stop {
            return Err(if dup {
                FrlError::DuplicateIndex { layer, index }
            } else {
                FrlError::NotAPermutation { layer, index }
            });
        }
    }
    Ok(Ranking { order, offsets })
}

/// Packs arbitrary (possibly invalid) layers as the encoder would: for
/// tests that need malformed payloads.
#[cfg(test)]
pub(crate) fn tests_pack_raw(layers: &[Vec<u32>]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in layers {
        pack_layer(l, index_bits(l.len()), &mut out);
    }
    out
}
