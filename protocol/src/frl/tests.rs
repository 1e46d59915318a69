use super::packing::pack_layer;
use super::vote::Sums;
use super::*;
use crate::aggregate::{AggregateError, Aggregator};
use crate::error::Misbehaviour;
use crate::wire::ClientUpdate;
use proptest::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn shuffled(n: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    p
}

fn random_ranking(sizes: &[usize], rng: &mut ChaCha8Rng) -> Ranking {
    Ranking::new(sizes.iter().map(|&n| shuffled(n, rng)).collect(), sizes).unwrap()
}

/// Uniform in (−1, 1) from 24 random bits.
fn uniform(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1 << 23) as f32 - 1.0
}

/// Packs arbitrary (possibly invalid) layers as the encoder would.
fn pack_raw(layers: &[Vec<u32>]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in layers {
        pack_layer(l, index_bits(l.len()), &mut out);
    }
    out
}

fn upd(bytes: Vec<u8>) -> ClientUpdate {
    ClientUpdate { num_samples: 10, train_loss: 0.5, payload: crate::wire::UpdatePayload { kind: ID, data: bytes } }
}

fn sums_of(v: &FrlVote) -> Vec<u64> {
    match &v.sums {
        Sums::Narrow(s) => s.iter().map(|&x| u64::from(x)).collect(),
        Sums::Wide(s) => s.clone(),
    }
}

/// Sorted scores `s̄` for `sizes`: random uniform values, sorted per layer.
fn sorted_scores(sizes: &[usize], rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut out = Vec::new();
    for &n in sizes {
        let mut layer: Vec<f32> = (0..n).map(|_| uniform(rng)).collect();
        layer.sort_by(f32::total_cmp);
        out.extend(layer);
    }
    out
}

fn vote_with(cfg: FrlConfig, rng: &mut ChaCha8Rng) -> FrlVote {
    let sorted = sorted_scores(&cfg.layer_sizes, rng);
    let g = random_ranking(&cfg.layer_sizes, rng);
    FrlVote::from_parts(cfg, g, sorted).unwrap()
}

/// The reference vote: materialise every client's positions, sum them,
/// `sort_by_key` (stable), assign `s̄`.
fn reference_vote(sizes: &[usize], rankings: &[Ranking], sorted: &[f32]) -> (Vec<u32>, Vec<f32>) {
    let (mut order, mut scores, mut off) = (Vec::new(), Vec::new(), 0);
    for (l, &n) in sizes.iter().enumerate() {
        let mut v = vec![0u64; n];
        for r in rankings {
            for (e, p) in r.positions(l).into_iter().enumerate() {
                v[e] += u64::from(p);
            }
        }
        assert_eq!(v.iter().sum::<u64>(), rankings.len() as u64 * (n as u64 * (n as u64 - 1) / 2));
        let mut g: Vec<u32> = (0..n as u32).collect();
        g.sort_by_key(|&e| v[e as usize]);
        let mut s = vec![0f32; n];
        for (j, &e) in g.iter().enumerate() {
            s[e as usize] = sorted[off + j];
        }
        order.extend(g);
        scores.extend(s);
        off += n;
    }
    (order, scores)
}

#[test]
fn doc_example_packs_to_the_documented_bytes() {
    let r = Ranking::new(vec![vec![2, 0, 1], vec![4, 1, 3, 0, 2]], &[3, 5]).unwrap();
    let bytes = encode(&r);
    assert_eq!(bytes, vec![0x12, 0xcc, 0x20]);
    assert_eq!(decode(&bytes, &[3, 5]).unwrap(), r);
    assert_eq!(r.positions(1), vec![3, 1, 4, 2, 0]);
}

#[test]
fn widths_and_lengths() {
    assert_eq!([1, 2, 3, 4, 5, 1024, 1025].map(index_bits), [0, 1, 2, 2, 3, 10, 11]);
    assert_eq!(MAX_INDEX_BITS, 24);
    // §1.12: a LeNet ranking is 4.25 MB (20.9 bits per edge).
    let len = packed_len(&LENET_MNIST_LAYER_SIZES).unwrap();
    assert_eq!(len, 324 + 34_560 + 4_214_784 + 1_760);
    assert_eq!(LENET_MNIST_LAYER_SIZES.iter().sum::<usize>(), 1_625_632);
    // A layer of one edge takes no bytes and decodes to [0].
    let r = decode(&[], &[1]).unwrap();
    assert_eq!(r.layer(0), &[0]);
    assert_eq!(encode(&r), Vec::<u8>::new());
    assert_eq!(packed_len(&[]), Err(FrlError::BadLayerCount { got: 0, limit: MAX_RANKED_LAYERS }));
    assert_eq!(packed_len(&[3, 0]), Err(FrlError::EmptyLayer { layer: 1 }));
    assert_eq!(
        packed_len(&[MAX_RANKED_EDGES, 1]),
        Err(FrlError::TooManyEdges { got: MAX_RANKED_EDGES + 1, limit: MAX_RANKED_EDGES })
    );
    assert!(packed_len(&[usize::MAX, usize::MAX]).is_err());
    assert!(packed_len(&vec![1; MAX_RANKED_LAYERS + 1]).is_err());
}

#[test]
fn checked_constructor_refuses_each_invalid_shape() {
    let sizes = [3, 4];
    let ok = vec![vec![0, 1, 2], vec![3, 2, 1, 0]];
    assert!(Ranking::new(ok.clone(), &sizes).is_ok());
    assert_eq!(Ranking::new(vec![vec![0, 1, 2]], &sizes), Err(FrlError::WrongLayerCount { expected: 2, got: 1 }));
    assert_eq!(
        Ranking::new(vec![vec![0, 1, 2], vec![0, 1, 2]], &sizes),
        Err(FrlError::WrongLayerSize { layer: 1, expected: 4, got: 3 })
    );
    assert_eq!(
        Ranking::new(vec![vec![0, 1, 2], vec![3, 4, 1, 0]], &sizes),
        Err(FrlError::NotAPermutation { layer: 1, index: 1 })
    );
    assert_eq!(
        Ranking::new(vec![vec![0, 2, 2], vec![3, 2, 1, 0]], &sizes),
        Err(FrlError::DuplicateIndex { layer: 0, index: 2 })
    );
    assert_eq!(Ranking::from_flat(vec![0, 1, 2, 3, 2, 1, 0], &sizes).unwrap(), Ranking::new(ok, &sizes).unwrap());
    assert!(matches!(Ranking::from_flat(vec![0, 1, 2], &sizes), Err(FrlError::WrongLength { .. })));
    assert_eq!(
        Ranking::from_flat(vec![0, 1, 2, 3, 2, 1, 1], &sizes),
        Err(FrlError::DuplicateIndex { layer: 1, index: 3 })
    );
}

#[test]
fn ranking_of_scores_is_ascending_with_index_ties() {
    let s = [0.5, -1.0, 0.5, 0.0, -0.0, 2.0, -3.0];
    let signed = Ranking::from_scores(&s, &[5, 2], MaskRule::TwoSided).unwrap();
    assert_eq!(signed.layer(0), &[1, 3, 4, 0, 2]); // -1, +0 = -0 (index 3 first), 0.5 (index 0 first), 0.5
    assert_eq!(signed.layer(1), &[1, 0]);
    let magnitude = Ranking::from_scores(&s, &[5, 2], MaskRule::OneSidedTopK).unwrap();
    assert_eq!(magnitude.layer(0), &[3, 4, 0, 2, 1]);
    assert_eq!(magnitude.layer(1), &[0, 1]);
    assert_eq!(
        Ranking::from_scores(&[0.0, f32::NAN], &[2], MaskRule::TwoSided),
        Err(FrlError::NonFiniteScore { index: 1 })
    );
    // Big enough for the radix path, with many ties (and zeros of both
    // signs, which are equal): matches a stable sort by value.
    let mut r = rng(4);
    let s: Vec<f32> = (0..20_000).map(|_| (uniform(&mut r) * 50.0).round() / 7.0).collect();
    let got = Ranking::from_scores(&s, &[20_000], MaskRule::TwoSided).unwrap();
    let mut want: Vec<u32> = (0..20_000).collect();
    want.sort_by(|&a, &b| s[a as usize].partial_cmp(&s[b as usize]).unwrap());
    assert_eq!(got.layer(0), &want[..]);
    // write_scores inverts from_scores on s̄ = sorted(s).
    let mut sorted = s.clone();
    sorted.sort_by(f32::total_cmp);
    let mut back = vec![0f32; s.len()];
    got.write_scores(&sorted, &mut back).unwrap();
    assert_eq!(back, s);
}

#[test]
fn vote_order_is_the_stable_argsort() {
    let mut r = rng(7);
    for (n, range) in [(10, 3), (5_000, 1), (5_000, 40), (70_000, 1 << 26), (70_000, u64::MAX >> 1), (70_000, 0)] {
        let keys: Vec<u64> = (0..n).map(|_| if range == 0 { 0 } else { r.next_u64() % range }).collect();
        // The same keys far from zero: the high digits are constant and
        // their passes are skipped.
        let offset: Vec<u64> = keys.iter().map(|k| k + (5 << 40)).collect();
        assert_eq!(vote_order(&offset), vote_order(&keys));
        let mut want: Vec<u32> = (0..n as u32).collect();
        want.sort_by_key(|&i| keys[i as usize]);
        assert_eq!(vote_order(&keys), want, "n={n} range={range}");
        if range <= u64::from(u32::MAX) {
            let narrow: Vec<u32> = keys.iter().map(|&k| k as u32).collect();
            assert_eq!(vote_order(&narrow), want);
        }
    }
}

#[test]
fn streaming_vote_matches_the_reference() {
    let mut r = rng(11);
    for (case, sizes) in [vec![7], vec![1, 2, 300], vec![5_000, 33, 9_000]].into_iter().enumerate() {
        for m in [1usize, 2, 5, 25] {
            let cfg = FrlConfig::new(sizes.clone());
            let mut vote = vote_with(cfg, &mut r);
            let rankings: Vec<Ranking> = (0..m).map(|_| random_ranking(&sizes, &mut r)).collect();
            vote.begin_round(1, &[]);
            for (c, rk) in rankings.iter().enumerate() {
                vote.absorb(c as u32, &upd(encode(rk))).unwrap();
            }
            let mut scores = vec![0f32; vote.sorted_scores().len()];
            let stats = vote.finish(&mut scores).unwrap();
            assert_eq!(stats.updates, m);
            let (order, want_scores) = reference_vote(&sizes, &rankings, vote.sorted_scores());
            assert_eq!(vote.global_ranking().as_flat(), &order[..], "case {case}, m={m}");
            assert_eq!(scores, want_scores);
            assert_eq!(vote.global_scores(), want_scores);
            // New scores are a permutation of s̄, layer by layer.
            for w in vote.offsets.windows(2) {
                let mut s = scores[w[0]..w[1]].to_vec();
                s.sort_by(f32::total_cmp);
                assert_eq!(s, vote.sorted_scores()[w[0]..w[1]]);
            }
            // The sums were cleared for the next round.
            assert!(sums_of(&vote).iter().all(|&v| v == 0));
        }
    }
}

#[test]
fn identical_rankings_come_back_unchanged() {
    let mut r = rng(12);
    let sizes = [300, 5_000];
    let mut vote = vote_with(FrlConfig::new(sizes.to_vec()), &mut r);
    let rk = random_ranking(&sizes, &mut r);
    vote.begin_round(1, &[]);
    for c in 0..9 {
        vote.absorb(c, &upd(encode(&rk))).unwrap();
    }
    vote.finish(&mut []).unwrap();
    assert_eq!(vote.global_ranking(), &rk);
}

#[test]
fn widened_sums_give_the_same_vote() {
    let mut r = rng(13);
    let sizes = [4_500, 17];
    let rankings: Vec<Ranking> = (0..6).map(|_| random_ranking(&sizes, &mut r)).collect();
    let base = vote_with(FrlConfig::new(sizes.to_vec()), &mut r);
    let run = |narrow_votes: usize| {
        let mut v = base.clone();
        v.narrow_votes = narrow_votes;
        v.begin_round(1, &[]);
        for (c, rk) in rankings.iter().enumerate() {
            v.absorb(c as u32, &upd(encode(rk))).unwrap();
        }
        let wide = matches!(v.sums, Sums::Wide(_));
        v.finish(&mut []).unwrap();
        assert!(matches!(v.sums, Sums::Narrow(_)), "back to u32 after the round");
        (wide, v.global.clone())
    };
    let (wide_a, a) = run(usize::MAX);
    let (wide_b, b) = run(3);
    assert!(!wide_a && wide_b);
    assert_eq!(a, b);
    assert_eq!(a.as_flat(), &reference_vote(&sizes, &rankings, base.sorted_scores()).0[..]);
}

#[test]
fn arrival_order_does_not_matter() {
    let mut r = rng(14);
    let sizes = [600, 4_200];
    let base = vote_with(FrlConfig::new(sizes.to_vec()), &mut r);
    let updates: Vec<(u32, ClientUpdate)> = (0..12)
        .map(|c| {
            let mut u = upd(encode(&random_ranking(&sizes, &mut r)));
            u.num_samples = 1 + c as u64 * 7;
            u.train_loss = 0.1 + c as f32 / 3.0;
            (c * 5 + 1, u)
        })
        .collect();
    let run = |perm: &[u32]| {
        let mut v = base.clone();
        v.begin_round(2, &[]);
        for &i in perm {
            let (c, u) = &updates[i as usize];
            v.absorb(*c, u).unwrap();
        }
        let mut s = vec![0f32; v.sorted_scores().len()];
        let stats = v.finish(&mut s).unwrap();
        (v.global.clone(), s.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), stats.train_loss.to_bits())
    };
    let first = run(&(0..12).collect::<Vec<_>>());
    for seed in 0..5 {
        assert_eq!(run(&shuffled(12, &mut rng(100 + seed))), first);
    }
}

#[test]
fn malformed_rankings_are_refused_and_leave_no_trace() {
    let mut r = rng(15);
    let sizes = [5, 300, 6_000]; // 3, 9 and 13 bits: every layer has padding
    let base = vote_with(FrlConfig::new(sizes.to_vec()), &mut r);
    let good_a = random_ranking(&sizes, &mut r);
    let good_b = random_ranking(&sizes, &mut r);
    let raw: Vec<Vec<u32>> = good_b.layers().map(<[u32]>::to_vec).collect();
    let full = packed_len(&sizes).unwrap();
    let with = |f: &dyn Fn(&mut Vec<Vec<u32>>)| {
        let mut l = raw.clone();
        f(&mut l);
        pack_raw(&l)
    };
    let mut padded = encode(&good_b);
    // The last byte of layer 1's block: 300 × 9 bits = 337.5 bytes.
    padded[packed_len(&sizes[..2]).unwrap() - 1] |= 0x80;
    let cases: Vec<(Vec<u8>, FrlError)> = vec![
        (encode(&good_b)[..full - 1].to_vec(), FrlError::Truncated { expected: full, got: full - 1 }),
        (vec![], FrlError::Truncated { expected: full, got: 0 }),
        ([encode(&good_b), vec![0]].concat(), FrlError::TrailingBytes { extra: 1 }),
        (padded, FrlError::NonZeroPadding { layer: 1 }),
        // Out of range in the last layer, late: layers 0 and 1 and most of
        // layer 2 were already added and must be taken back out.
        (with(&|l| l[2][5_990] = 6_000), FrlError::NotAPermutation { layer: 2, index: 5_990 }),
        (with(&|l| l[0][0] = 7), FrlError::NotAPermutation { layer: 0, index: 0 }),
        (
            with(&|l| {
                let v = l[1][3];
                l[1][200] = v;
            }),
            FrlError::DuplicateIndex { layer: 1, index: 200 },
        ),
        // A ranking for other layer sizes: the length no longer matches.
        (
            encode(&random_ranking(&[5, 300, 5_999], &mut r)),
            FrlError::Truncated { expected: full, got: packed_len(&[5, 300, 5_999]).unwrap() },
        ),
    ];
    let mut control = base.clone();
    control.begin_round(1, &[]);
    control.absorb(0, &upd(encode(&good_a))).unwrap();
    control.absorb(2, &upd(encode(&good_b))).unwrap();

    let mut v = base.clone();
    v.begin_round(1, &[]);
    v.absorb(0, &upd(encode(&good_a))).unwrap();
    let before = sums_of(&v);
    for (bytes, want) in cases {
        assert_eq!(decode(&bytes, &sizes), Err(want.clone()));
        assert_eq!(v.absorb(1, &upd(bytes)), Err(bad_payload(want.clone())), "{want}");
        assert_eq!(sums_of(&v), before, "{want}: sums changed");
        assert_eq!(v.votes(), 1);
    }
    // Wrong kind, bad sample count and a duplicate client are refused too.
    let dense = ClientUpdate {
        num_samples: 1,
        train_loss: 0.0,
        payload: crate::fedavg::encode_delta(crate::fedavg::ID, &[0.0]),
    };
    assert!(matches!(v.absorb(1, &dense), Err(Misbehaviour::KindMismatch { .. })));
    let mut zero = upd(encode(&good_b));
    zero.num_samples = 0;
    assert_eq!(v.absorb(1, &zero), Err(Misbehaviour::BadSampleCount(0)));
    assert_eq!(v.absorb(0, &upd(encode(&good_b))), Err(Misbehaviour::Duplicate(1)));
    assert_eq!(sums_of(&v), before);
    v.absorb(2, &upd(encode(&good_b))).unwrap();
    assert_eq!(v.finish(&mut []).unwrap(), control.finish(&mut []).unwrap());
    assert_eq!(v.global_ranking(), control.global_ranking());
}

#[test]
fn finish_without_votes_keeps_everything() {
    let mut r = rng(16);
    let mut v = vote_with(FrlConfig::new(vec![10, 20]), &mut r);
    let before = v.global_ranking().clone();
    let mut g = vec![7.0f32; 30];
    v.begin_round(1, &g);
    assert_eq!(v.finish(&mut g), Err(AggregateError::Empty));
    assert_eq!(g, vec![7.0f32; 30]);
    assert_eq!(v.global_ranking(), &before);
    // A `global` of another length is left alone on success too.
    let rk = random_ranking(&[10, 20], &mut r);
    v.absorb(3, &upd(encode(&rk))).unwrap();
    let mut other = vec![7.0f32; 4];
    v.finish(&mut other).unwrap();
    assert_eq!(other, vec![7.0f32; 4]);
    assert_eq!(v.global_ranking(), &rk);
}

#[test]
fn reject_codes() {
    let code = |e: FrlError| crate::Error::from(bad_payload(e)).reject_code();
    use crate::wire::RejectCode;
    assert_eq!(code(FrlError::DuplicateIndex { layer: 0, index: 1 }), Some(RejectCode::NotAPermutation));
    assert_eq!(code(FrlError::NotAPermutation { layer: 0, index: 1 }), Some(RejectCode::NotAPermutation));
    assert_eq!(code(FrlError::NonZeroPadding { layer: 0 }), Some(RejectCode::NotAPermutation));
    assert_eq!(code(FrlError::TrailingBytes { extra: 1 }), Some(RejectCode::WrongShape));
    assert_eq!(code(FrlError::Truncated { expected: 2, got: 1 }), Some(RejectCode::WrongShape));
}

#[test]
fn masks_keep_the_configured_count() {
    // s̄ symmetric around 0: the two-sided mask keeps both ends equally.
    let n = 1_001;
    let sorted: Vec<f32> = (0..n).map(|j| j as f32 - 500.0).collect();
    let cfg = FrlConfig::new(vec![n]);
    let v = FrlVote::from_parts(cfg.clone(), Ranking::identity(&[n]).unwrap(), sorted.clone()).unwrap();
    let keep = n - (0.5 * n as f64) as usize;
    assert_eq!(keep, 501);
    let [low, high] = v.kept_positions(0);
    assert_eq!(low.len() + high.len(), keep);
    assert_eq!((low, high), (0..250, 750..n)); // ties |−250| = |250| go high
    let mask = v.mask();
    assert_eq!(mask.iter().filter(|&&k| k).count(), keep);
    assert!(mask[0] && mask[n - 1] && !mask[500]);
    // The mask is exactly TopFrac(|S|): the kept |S| all exceed the dropped.
    let s = v.global_scores();
    let kept_min = s.iter().zip(&mask).filter(|p| *p.1).map(|p| p.0.abs()).fold(f32::MAX, f32::min);
    let dropped_max = s.iter().zip(&mask).filter(|p| !*p.1).map(|p| p.0.abs()).fold(0.0, f32::max);
    assert!(kept_min >= dropped_max);
    // One-sided: the top positions.
    let one = FrlConfig { mask: MaskRule::OneSidedTopK, k_fraction: 0.3, ..cfg };
    let v = FrlVote::from_parts(one, Ranking::identity(&[n]).unwrap(), sorted).unwrap();
    assert_eq!(v.kept_positions(0), [0..0, n - (n - (0.7 * n as f64) as usize)..n]);
    // Config checks.
    let bad = |k: f64| FrlConfig { k_fraction: k, ..FrlConfig::new(vec![3]) }.validate().is_err();
    assert!(bad(0.0) && bad(1.5) && bad(f64::NAN) && !bad(1.0));
}

#[test]
fn new_derives_ranking_and_sorted_scores_from_initial_scores() {
    let s0 = [0.3, -0.7, 0.1, -0.2, 0.9];
    let v = FrlVote::new(FrlConfig::new(vec![3, 2]), &s0).unwrap();
    assert_eq!(v.global_ranking().as_flat(), &[1, 2, 0, 0, 1]);
    assert_eq!(v.sorted_scores(), &[-0.7, 0.1, 0.3, -0.2, 0.9]);
    assert_eq!(v.global_scores(), s0);
    let one = FrlConfig { mask: MaskRule::OneSidedTopK, ..FrlConfig::new(vec![3, 2]) };
    let v = FrlVote::new(one, &s0).unwrap();
    assert_eq!(v.global_ranking().as_flat(), &[2, 0, 1, 0, 1]);
    assert_eq!(v.sorted_scores(), &[0.1, 0.3, 0.7, 0.2, 0.9]);
    assert!(matches!(FrlVote::new(FrlConfig::new(vec![3, 3]), &s0), Err(FrlError::WrongLength { .. })));
    let unsorted = FrlVote::from_parts(FrlConfig::new(vec![3]), Ranking::identity(&[3]).unwrap(), vec![0.0, 2.0, 1.0]);
    assert_eq!(unsorted.err(), Some(FrlError::UnsortedScores { index: 2 }));
}

/// §1.7: every malicious client submits the reversed consensus of the
/// attackers' own benign rankings. With 20% malicious (5 of 25) the
/// honest consensus mask survives; a malicious majority would flip the
/// one-sided mask (which is why FRL resamples rounds with ≥ m/2).
#[test]
fn reversal_attack_with_20_percent_malicious_preserves_the_consensus() {
    let mut r = rng(17);
    let sizes = [1_000, 4_000];
    let total: usize = sizes.iter().sum();
    let truth: Vec<f32> = (0..total).map(|_| uniform(&mut r)).collect();
    // Client scores are truth + U(−0.5, 0.5): clients that mostly agree.
    // (Measured with this seed, overlap with 20% malicious vs the floor of
    // swapping 5 honest clients: ±0.25 → 0.989/0.988 two-sided,
    // 0.989/0.990 one-sided; ±1.5 → 0.835/0.926 and 0.683/0.866: the
    // more the honest clients disagree, the more the reversal bites.)
    let noise = 0.5f32;
    let benign = |r: &mut ChaCha8Rng| {
        let s: Vec<f32> = truth.iter().map(|t| t + noise * uniform(r)).collect();
        s
    };
    let honest: Vec<Vec<f32>> = (0..25).map(|_| benign(&mut r)).collect();
    let pool: Vec<Vec<f32>> = (0..25).map(|_| benign(&mut r)).collect();
    let s0: Vec<f32> = (0..total).map(|_| uniform(&mut r)).collect();
    for rule in [MaskRule::TwoSided, MaskRule::OneSidedTopK] {
        let cfg = FrlConfig { mask: rule, ..FrlConfig::new(sizes.to_vec()) };
        let rank = |s: &[f32]| Ranking::from_scores(s, &sizes, rule).unwrap();
        // The attackers' reversed consensus: order edges by Σ positions,
        // descending.
        let mut a = vec![0u64; total];
        for s in &pool {
            let rk = rank(s);
            for l in 0..sizes.len() {
                let off: usize = sizes[..l].iter().sum();
                for (e, p) in rk.positions(l).into_iter().enumerate() {
                    a[off + e] += u64::from(p);
                }
            }
        }
        let mut mal = Vec::new();
        let mut off = 0;
        for &n in &sizes {
            let mut order = vote_order(&a[off..off + n]);
            order.reverse();
            mal.extend(order);
            off += n;
        }
        let mal = encode(&Ranking::from_flat(mal, &sizes).unwrap());
        let run = |honest_n: usize, malicious: usize| {
            let mut v = FrlVote::new(cfg.clone(), &s0).unwrap();
            v.begin_round(1, &[]);
            for (c, s) in honest.iter().take(honest_n).enumerate() {
                v.absorb(c as u32, &upd(encode(&rank(s)))).unwrap();
            }
            for c in 0..malicious {
                v.absorb(100 + c as u32, &upd(mal.clone())).unwrap();
            }
            v.finish(&mut []).unwrap();
            v.mask()
        };
        let overlap = |a: &[bool], b: &[bool]| {
            let both = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
            both as f64 / a.iter().filter(|x| **x).count() as f64
        };
        let consensus = run(20, 0);
        // The noise floor: the same round with 5 more honest clients.
        let floor = overlap(&consensus, &run(25, 0));
        let kept = overlap(&consensus, &run(20, 5));
        let lost = overlap(&consensus, &run(5, 20));
        eprintln!(
            "{rule:?}: mask overlap with the honest consensus: 5 more honest {floor:.3}, 5 malicious {kept:.3}, 20 malicious {lost:.3}"
        );
        assert!(kept >= 0.95 && kept >= floor - 0.03, "{rule:?}: overlap {kept}, floor {floor}");
        match rule {
            // Reversal maps the ends onto the ends: the two-sided mask
            // hardly notices even a malicious majority.
            MaskRule::TwoSided => assert!(lost > 0.85, "{lost}"),
            MaskRule::OneSidedTopK => assert!(lost < 0.2, "a malicious majority flips the one-sided mask: {lost}"),
        }
    }
}

fn sizes_and_seed() -> impl Strategy<Value = (Vec<usize>, u64)> {
    (proptest::collection::vec(1usize..300, 1..5), any::<u64>())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip((sizes, seed) in sizes_and_seed()) {
        let rk = random_ranking(&sizes, &mut rng(seed));
        let bytes = encode(&rk);
        prop_assert_eq!(bytes.len(), packed_len(&sizes).unwrap());
        prop_assert_eq!(decode(&bytes, &sizes).unwrap(), rk);
    }

    /// Every single-bit flip is refused: a bit is either padding or part of
    /// an entry, and changing one entry of a permutation breaks it.
    #[test]
    fn every_bit_flip_is_refused((sizes, seed) in sizes_and_seed(), pick in any::<usize>()) {
        let mut bytes = encode(&random_ranking(&sizes, &mut rng(seed)));
        prop_assume!(!bytes.is_empty());
        let bit = pick % (bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        let err = decode(&bytes, &sizes).unwrap_err();
        prop_assert!(err.is_permutation_error(), "{:?}", err);
    }

    #[test]
    fn truncated_and_trailing_are_refused((sizes, seed) in sizes_and_seed(), cut in any::<usize>(), extra in proptest::collection::vec(any::<u8>(), 1..9)) {
        let bytes = encode(&random_ranking(&sizes, &mut rng(seed)));
        let len = bytes.len();
        if len > 0 {
            let k = cut % len;
            prop_assert_eq!(decode(&bytes[..k], &sizes), Err(FrlError::Truncated { expected: len, got: k }));
        }
        let longer = [bytes, extra.clone()].concat();
        prop_assert_eq!(decode(&longer, &sizes), Err(FrlError::TrailingBytes { extra: extra.len() }));
    }

    #[test]
    fn bad_entries_are_refused_with_their_position((sizes, seed) in sizes_and_seed(), l in any::<usize>(), i in any::<usize>(), h in any::<usize>()) {
        let rk = random_ranking(&sizes, &mut rng(seed));
        let layers: Vec<Vec<u32>> = rk.layers().map(<[u32]>::to_vec).collect();
        let l = l % sizes.len();
        let n = sizes[l];
        prop_assume!(n >= 2);
        let (i, h) = (1 + i % (n - 1), h % (n - 1));
        let h = h.min(i - 1);
        // A repeat of an earlier entry.
        let mut dup = layers.clone();
        dup[l][i] = dup[l][h];
        prop_assert_eq!(decode(&pack_raw(&dup), &sizes), Err(FrlError::DuplicateIndex { layer: l, index: i }));
        prop_assert_eq!(Ranking::new(dup, &sizes), Err(FrlError::DuplicateIndex { layer: l, index: i }));
        // An entry past the layer, when the width can hold one.
        let width_max = (1u64 << index_bits(n)) - 1;
        if width_max >= n as u64 {
            let mut out = layers.clone();
            out[l][i] = n as u32 + (seed % (width_max - n as u64 + 1)) as u32;
            prop_assert_eq!(decode(&pack_raw(&out), &sizes), Err(FrlError::NotAPermutation { layer: l, index: i }));
        }
    }

    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), sizes in proptest::collection::vec(0usize..400, 0..4)) {
        let _ = decode(&bytes, &sizes);
        // And with the exact length, so the permutation checks run.
        if let Ok(len) = packed_len(&sizes) {
            let mut exact = bytes.clone();
            exact.resize(len, 0xa5);
            let _ = decode(&exact, &sizes);
        }
    }
}
