//! Splitting a training set among clients: IID, label-skewed Dirichlet, or a
//! partition read from JSON.
//!
//! Every partition is a `Vec` with one entry per client holding that client's
//! training-set indices, sorted ascending. The generators are deterministic
//! for a seed: they use ChaCha20 keyed from the seed (key derivation spelled
//! out in [`partition_rng`]) and their own Fisher–Yates shuffle and bounded
//! sampling, so the result does not depend on how a `rand` version implements
//! `shuffle` or `random_range`.

use rand::Rng;
use rand_chacha::ChaCha20Rng;
use rand_distr::Distribution;

use super::DataError;

/// The generator behind the partitions: ChaCha20 with key
/// `seed (8 bytes LE) || "tallypart" || zeros`, stream 0
/// ([`tally_protocol::rng::keyed_chacha20`]).
pub fn partition_rng(seed: u64) -> ChaCha20Rng {
    tally_protocol::rng::keyed_chacha20(seed, b"tallypart")
}

/// Uniform in `0..n` (`n > 0`) by rejection, so it is unbiased and its
/// sequence is fixed by this code alone.
fn below(rng: &mut ChaCha20Rng, n: u64) -> u64 {
    let n = n.max(1);
    let zone = u64::MAX - (u64::MAX % n);
    loop {
        let v = rng.next_u64();
        if v < zone {
            return v % n;
        }
    }
}

/// In-place Fisher–Yates shuffle (Durstenfeld, from the back).
pub(crate) fn shuffle<T>(rng: &mut ChaCha20Rng, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// IID partition of `0..n`: one shuffle, then contiguous slices whose sizes
/// differ by at most one (the first `n % clients` clients get the extra
/// sample). With `clients > n` some clients are empty; `clients == 0` gives an
/// empty partition.
pub fn iid(n: usize, clients: usize, seed: u64) -> Vec<Vec<usize>> {
    if clients == 0 {
        return Vec::new();
    }
    let mut rng = partition_rng(seed);
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut rng, &mut order);
    let (base, extra) = (n / clients, n % clients);
    let mut out = Vec::with_capacity(clients);
    let mut rest = order.as_slice();
    for c in 0..clients {
        let take = base + usize::from(c < extra);
        let (mine, tail) = rest.split_at(take.min(rest.len()));
        let mut mine = mine.to_vec();
        mine.sort_unstable();
        out.push(mine);
        rest = tail;
    }
    out
}

/// Label-skewed Dirichlet partition (Hsu et al. 2019; the NIID-Bench split):
/// for each class in ascending order, its sample indices are shuffled and cut
/// among the clients by proportions `p ~ Dir(alpha · 1)` (drawn as normalised
/// `Gamma(alpha, 1)` variates, one per client in order). Client `j` gets the
/// slice `[floor(P_{j-1} n_k), floor(P_j n_k))` of class `k`'s `n_k` shuffled
/// indices, with `P_j` the cumulative proportion (`P_last = 1` exactly).
///
/// Small `alpha` (0.1) gives each client few classes; large `alpha` (100)
/// approaches IID.
///
/// **No empty clients:** after the split, each empty client in turn (lowest
/// index first) *receives one sample moved* from the currently largest client
/// (lowest index on ties): that client's last-assigned sample. Re-drawing was
/// rejected because with small `alpha` and many clients it may never succeed.
/// This needs `labels.len() >= clients`; with fewer samples some clients stay
/// empty.
///
/// Deterministic for a seed on a given platform. (The Gamma sampler uses
/// `ln`/`exp` from the platform's libm, so another libm might, in principle,
/// round one proportion differently.)
///
/// Errors: `alpha` not finite and positive, `classes == 0`, or a label `>= classes`.
pub fn dirichlet(
    labels: &[u8],
    classes: usize,
    clients: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>, DataError> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(DataError::InvalidParameter(format!("Dirichlet alpha must be finite and > 0, got {alpha}")));
    }
    if classes == 0 {
        return Err(DataError::BadClassCount(0));
    }
    if let Some((index, &label)) = labels.iter().enumerate().find(|&(_, &l)| usize::from(l) >= classes) {
        return Err(DataError::LabelOutOfRange { index, label, classes });
    }
    if clients == 0 {
        return Ok(Vec::new());
    }
    let gamma = rand_distr::Gamma::new(alpha, 1.0)
        .map_err(|e| DataError::InvalidParameter(format!("Gamma({alpha}, 1): {e}")))?;
    let mut rng = partition_rng(seed);
    // Per client, the samples in the order they were assigned (the last one is
    // what the empty-client fix moves).
    let mut assigned: Vec<Vec<usize>> = vec![Vec::new(); clients];
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        if let Some(v) = by_class.get_mut(usize::from(l)) {
            v.push(i);
        }
    }
    let mut props = vec![0f64; clients];
    for mut idx in by_class {
        shuffle(&mut rng, &mut idx);
        // Draw all proportions even for an empty class, so the stream position
        // doesn't depend on which classes happen to be present.
        let mut total = 0.0;
        for p in props.iter_mut() {
            let g: f64 = gamma.sample(&mut rng);
            *p = g;
            total += g;
        }
        let n_k = idx.len();
        let mut start = 0usize;
        let mut cum = 0.0;
        for (j, p) in props.iter().enumerate() {
            cum += p;
            let end = if j + 1 == clients {
                // The last client closes the class exactly.
                n_k
            } else if total > 0.0 {
                // `as` saturates, and clamp keeps the cuts ordered and inside the class.
                ((cum / total * n_k as f64).floor() as usize).clamp(start, n_k)
            } else {
                // Every Gamma draw underflowed to 0 (possible for tiny alpha):
                // the last client takes the whole class.
                start
            };
            if let Some(slice) = idx.get(start..end)
                && let Some(dst) = assigned.get_mut(j)
            {
                dst.extend_from_slice(slice);
            }
            start = end;
        }
    }
    fill_empty_clients(&mut assigned);
    for a in assigned.iter_mut() {
        a.sort_unstable();
    }
    Ok(assigned)
}

/// Moves one sample from the largest client to each empty client (see [`dirichlet`]).
fn fill_empty_clients(assigned: &mut [Vec<usize>]) {
    for empty in 0..assigned.len() {
        if assigned.get(empty).is_some_and(|v| !v.is_empty()) {
            continue;
        }
        // Largest client, lowest index on ties (max_by_key returns the last
        // maximum, hence the reversed index in the key).
        let Some(donor) =
            assigned.iter().enumerate().max_by_key(|(i, v)| (v.len(), std::cmp::Reverse(*i))).map(|(i, _)| i)
        else {
            return;
        };
        if assigned.get(donor).is_none_or(|v| v.len() < 2) {
            return; // fewer samples than clients: nothing left to move
        }
        let moved = assigned.get_mut(donor).and_then(Vec::pop);
        if let (Some(sample), Some(dst)) = (moved, assigned.get_mut(empty)) {
            dst.push(sample);
        }
    }
}

/// Reads a partition from JSON: a list (one entry per client) of lists of
/// training-set indices, e.g. `[[0, 5, 9], [1, 2]]`.
///
/// Every index must be `< n_train`, and no client may list an index twice.
/// The same index in two clients is allowed (overlapping partitions), and so
/// is an empty client (it has nothing to train on; the host decides). Each
/// client's indices are returned sorted ascending.
pub fn from_json(bytes: &[u8], n_train: usize) -> Result<Vec<Vec<usize>>, DataError> {
    let mut parts: Vec<Vec<usize>> = serde_json::from_slice(bytes)?;
    for (client, part) in parts.iter_mut().enumerate() {
        part.sort_unstable();
        if let Some(&index) = part.iter().find(|&&i| i >= n_train) {
            return Err(DataError::IndexOutOfRange { index, len: n_train });
        }
        if let Some(w) = part.windows(2).find(|w| w.first() == w.get(1)) {
            let index = w.first().copied().unwrap_or_default();
            return Err(DataError::DuplicateIndex { client, index });
        }
    }
    Ok(parts)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn assert_sorted(parts: &[Vec<usize>]) {
        for p in parts {
            assert!(p.windows(2).all(|w| w[0] < w[1]), "not sorted ascending: {p:?}");
        }
    }

    #[test]
    fn iid_covers_everything_once_balanced_and_deterministic() {
        let p = iid(103, 10, 7);
        assert_eq!(p.len(), 10);
        assert_sorted(&p);
        let sizes: Vec<usize> = p.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![11, 11, 11, 10, 10, 10, 10, 10, 10, 10]);
        let mut all: Vec<usize> = p.concat();
        all.sort_unstable();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        assert_eq!(p, iid(103, 10, 7));
        assert_ne!(p, iid(103, 10, 8));
        // Actually shuffled: client 0 is not 0..11.
        assert_ne!(p[0], (0..11).collect::<Vec<_>>());
        assert!(iid(5, 0, 1).is_empty());
        let tiny = iid(2, 4, 1);
        assert_eq!(tiny.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 0, 0]);
    }

    #[test]
    fn shuffle_is_a_uniform_permutation() {
        // Each of the 6 permutations of 3 items should appear ~1/6 of the time.
        let mut rng = partition_rng(1);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..6000 {
            let mut v = [0, 1, 2];
            shuffle(&mut rng, &mut v);
            *counts.entry(v).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 6);
        assert!(counts.values().all(|&c| (850..1150).contains(&c)), "{counts:?}");
    }

    fn labels(n: usize, classes: usize) -> Vec<u8> {
        (0..n).map(|i| ((i * 7 + i / 3) % classes) as u8).collect()
    }

    #[test]
    fn dirichlet_is_a_partition_and_deterministic() {
        let l = labels(1000, 10);
        let p = dirichlet(&l, 10, 20, 0.5, 3).unwrap();
        assert_eq!(p.len(), 20);
        assert_sorted(&p);
        let mut all = p.concat();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert!(p.iter().all(|c| !c.is_empty()));
        assert_eq!(p, dirichlet(&l, 10, 20, 0.5, 3).unwrap());
        assert_ne!(p, dirichlet(&l, 10, 20, 0.5, 4).unwrap());
    }

    /// Mean over clients of the fraction of its samples in its top class.
    fn skew(parts: &[Vec<usize>], l: &[u8]) -> f64 {
        let mut s = 0.0;
        for p in parts {
            let mut h = [0usize; 10];
            for &i in p {
                h[l[i] as usize] += 1;
            }
            s += *h.iter().max().unwrap() as f64 / p.len() as f64;
        }
        s / parts.len() as f64
    }

    #[test]
    fn dirichlet_alpha_controls_skew() {
        let l = labels(5000, 10);
        let skewed = skew(&dirichlet(&l, 10, 10, 0.05, 1).unwrap(), &l);
        let flat = skew(&dirichlet(&l, 10, 10, 1000.0, 1).unwrap(), &l);
        assert!(skewed > 0.6, "alpha 0.05 should be strongly skewed, top-class share {skewed}");
        assert!(flat < 0.2, "alpha 1000 should be near IID, top-class share {flat}");
    }

    #[test]
    fn dirichlet_never_leaves_a_client_empty_when_possible() {
        // Tiny alpha, many clients, few classes: most clients get nothing from the split.
        let l = labels(300, 3);
        for seed in 0..5 {
            let p = dirichlet(&l, 3, 100, 0.01, seed).unwrap();
            assert!(p.iter().all(|c| !c.is_empty()), "seed {seed}");
            assert_eq!(p.iter().map(Vec::len).sum::<usize>(), 300);
        }
        // Fewer samples than clients: no panic, everything still assigned once.
        let p = dirichlet(&[0, 1], 2, 5, 1.0, 0).unwrap();
        assert_eq!(p.iter().map(Vec::len).sum::<usize>(), 2);
        assert_eq!(p.iter().filter(|c| !c.is_empty()).count(), 2);
    }

    #[test]
    fn dirichlet_rejects_bad_parameters() {
        let l = labels(10, 2);
        for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(dirichlet(&l, 2, 2, alpha, 0), Err(DataError::InvalidParameter(_))));
        }
        assert!(matches!(dirichlet(&[0, 5], 2, 2, 1.0, 0), Err(DataError::LabelOutOfRange { index: 1, .. })));
        assert!(dirichlet(&l, 2, 0, 1.0, 0).unwrap().is_empty());
    }

    #[test]
    fn json_partitions() {
        let p = from_json(b"[[3, 0, 2], [], [1, 2]]", 4).unwrap();
        assert_eq!(p, vec![vec![0, 2, 3], vec![], vec![1, 2]]);
        assert!(matches!(from_json(b"[[0, 4]]", 4), Err(DataError::IndexOutOfRange { index: 4, len: 4 })));
        assert!(matches!(from_json(b"[[1], [0, 2, 0]]", 4), Err(DataError::DuplicateIndex { client: 1, index: 0 })));
        assert!(matches!(from_json(b"[[0, -1]]", 4), Err(DataError::Json(_))));
        assert!(matches!(from_json(b"{\"a\": 1}", 4), Err(DataError::Json(_))));
        assert!(matches!(from_json(b"[[0]] trailing", 4), Err(DataError::Json(_))));
    }
}
