//! The reference values `s̄` of a run ([`reference`]) and a process-wide
//! cache of them ([`ReferenceCache`]).

use super::{FrlConfig, FrlError, FrlRun, MaskRule, Ranking, rank_value};

/// The initial global ranking and `s̄` of a run: the ranking of the initial
/// scores `S⁰` (all layers concatenated) under `cfg.mask`, and the values in
/// that order (signed for [`MaskRule::TwoSided`], `|S⁰|` for
/// [`MaskRule::OneSidedTopK`]).
pub fn reference(cfg: &FrlConfig, initial_scores: &[f32]) -> Result<(Ranking, Vec<f32>), FrlError> {
    let global = Ranking::from_scores(initial_scores, &cfg.layer_sizes, cfg.mask)?;
    let mut sorted = vec![0f32; initial_scores.len()];
    for w in global.offsets.windows(2) {
        let scores = &initial_scores[w[0]..w[1]];
        for (s, &e) in sorted[w[0]..w[1]].iter_mut().zip(&global.order[w[0]..w[1]]) {
            *s = rank_value(scores[e as usize], cfg.mask);
        }
    }
    Ok((global, sorted))
}

/// `s̄` of FRL runs, computed once per network and shared: a simulation of a
/// thousand clients of one run must not hold a thousand copies (6.5 MB each
/// for LeNet), and a client that reconnects should not regenerate it.
#[derive(Debug, Default)]
pub struct ReferenceCache {
    entries: std::sync::Mutex<Vec<(ReferenceKey, std::sync::Arc<[f32]>)>>,
}

type ReferenceKey = (crate::supermask::FrlArch, u64, MaskRule);

/// Networks a [`ReferenceCache`] keeps: a process serves one run at a time,
/// a few are plenty, and the bound keeps a hostile sequence of runs from
/// growing it without limit.
const REFERENCE_CACHE_ENTRIES: usize = 4;

impl ReferenceCache {
    /// `s̄` of the run `run` over `net`, computed on first use.
    pub fn sorted_scores(
        &self,
        net: &crate::supermask::FrlArch,
        run: &FrlRun,
    ) -> Result<std::sync::Arc<[f32]>, FrlError> {
        let key = (*net, run.seed, run.vote.mask);
        // A poisoned lock only means another thread panicked mid-insert; the
        // entries are still whole `Arc`s, so keep using them.
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, v)) = entries.iter().find(|(k, _)| *k == key) {
            return Ok(v.clone());
        }
        let initial = crate::supermask::initial_scores(net, run.seed);
        let (_, sorted) = reference(&run.vote, &initial)?;
        let sorted: std::sync::Arc<[f32]> = sorted.into();
        if entries.len() >= REFERENCE_CACHE_ENTRIES {
            entries.remove(0);
        }
        entries.push((key, sorted.clone()));
        Ok(sorted)
    }
}
