//! The stable ascending argsort behind the vote and every ranking
//! ([`vote_order`]): an LSD radix sort of `(key, index)` packed in a u64.

#[cfg(doc)]
use super::FrlVote;
use super::packing::index_bits;
#[cfg(doc)]
use crate::aggregate::Aggregator;

/// Below this many edges a layer is ordered with a comparison sort (the radix
/// sort's histograms would cost more than they save).
const RADIX_MIN_LEN: usize = 1 << 12;

/// Digit width of the radix sort: 2^11 counters (16 KiB) stay in L1, and a
/// LeNet round (sums below 2^26) takes three passes.
const RADIX_DIGIT_BITS: u32 = 11;
/// The stable ascending argsort of `keys`: indices ordered by key, equal
/// keys in index order. This is the order [`FrlVote::finish`] uses (and a
/// DP top-k of vote sums can use). Identical to
/// `(0..n).collect::<Vec<u32>>().sort_by_key(|&i| keys[i])`, computed by an
/// LSD radix sort over `(key, index)` packed into one u64 when they fit (the
/// index in the low bits makes every value distinct, so the sorted packed
/// values are exactly the stable order).
///
/// # Panics
/// If `keys.len() > u32::MAX`.
pub fn vote_order<K: Copy + Into<u64>>(keys: &[K]) -> Vec<u32> {
    let mut out = vec![0u32; keys.len()];
    vote_order_into(keys, &mut out, &mut SortScratch::default());
    out
}

/// The radix sort's two buffers, kept between rounds: a fresh 13 MB buffer
/// costs more in page faults than the sort itself.
#[derive(Clone, Default)]
pub(super) struct SortScratch {
    a: Vec<u64>,
    b: Vec<u64>,
}

pub(super) fn vote_order_into<K: Copy + Into<u64>>(keys: &[K], out: &mut [u32], scratch: &mut SortScratch) {
    let n = keys.len();
    assert!(n <= u32::MAX as usize && out.len() == n, "invariant: at most 2^32 keys, one output per key");
    let idx_bits = index_bits(n);
    let max = keys.iter().fold(0u64, |m, &k| m.max(k.into()));
    let key_bits = u64::BITS - max.leading_zeros();
    if key_bits == 0 {
        for (i, o) in out.iter_mut().enumerate() {
            *o = i as u32;
        }
        return;
    }
    if key_bits + idx_bits > 64 {
        // Sums past 2^40 (a million votes on a big layer): the plain stable sort.
        let mut idx: Vec<u32> = (0..n as u32).collect();
        idx.sort_by_key(|&i| keys[i as usize].into());
        out.copy_from_slice(&idx);
        return;
    }
    let SortScratch { a, b } = scratch;
    a.clear();
    if n < RADIX_MIN_LEN {
        a.extend(keys.iter().enumerate().map(|(i, &k)| (k.into() << idx_bits) | i as u64));
        a.sort_unstable(); // values are distinct: unstable = stable here
    } else {
        radix_sort(keys, idx_bits, key_bits, a, b);
    }
    let idx_mask = (1u64 << idx_bits) - 1;
    for (o, x) in out.iter_mut().zip(a.iter()) {
        *o = (x & idx_mask) as u32;
    }
}

/// Stable LSD radix sort of `(key << shift) | index` values, left in `a`.
/// Built in index order, so sorting by the key bits alone gives the stable
/// order. The histograms of all digits are taken while packing; a pass whose
/// digit is the same for every value is skipped.
fn radix_sort<K: Copy + Into<u64>>(keys: &[K], shift: u32, key_bits: u32, a: &mut Vec<u64>, b: &mut Vec<u64>) {
    let n = keys.len();
    let passes = key_bits.div_ceil(RADIX_DIGIT_BITS);
    let width = key_bits.div_ceil(passes);
    let buckets = 1usize << width;
    let mask = (buckets - 1) as u64;
    let mut hist = vec![0u32; passes as usize * buckets]; // n ≤ 2^32 (checked by the caller)
    a.reserve(n);
    a.extend(keys.iter().enumerate().map(|(i, &k)| {
        let k = k.into();
        for (p, h) in hist.chunks_exact_mut(buckets).enumerate() {
            h[((k >> (p as u32 * width)) & mask) as usize] += 1;
        }
        (k << shift) | i as u64
    }));
    b.clear();
    b.resize(n, 0);
    for (p, h) in hist.chunks_exact_mut(buckets).enumerate() {
        if h.contains(&(n as u32)) {
            continue; // one bucket holds everything: the pass is the identity
        }
        let mut at = 0u32;
        for c in h.iter_mut() {
            let count = *c;
            *c = at;
            at += count;
        }
        let s = shift + p as u32 * width;
        for &x in a.iter() {
            let d = ((x >> s) & mask) as usize;
            b[h[d] as usize] = x;
            h[d] += 1;
        }
        std::mem::swap(a, b);
    }
}
