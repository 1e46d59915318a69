//! Where a participant keeps its replica of a replicated run's model.
//!
//! In a replicated run (SPSA, Ferret) every participant holds the global
//! model and moves it by applying each round's log. A device running one
//! participant needs one copy ([`OwnReplica`], the default). A host running
//! many participants in one process (the simulator: thousands of clients)
//! would hold thousands of identical copies; [`SharedReplicas`] lets the
//! participants whose replicas are provably identical share one.
//!
//! "Provably identical" is by construction, never by hash: two participants
//! share a replica when they adopted bit-identical checkpoints (compared bit
//! for bit), or when they applied the same log (compared whole) to the same
//! shared replica (the same allocation, kept alive by the store, so its
//! address cannot be reused). Applying a log is a deterministic function of
//! the parameters and the log, so the shared result is exactly the bits each
//! would have computed. A participant whose replica diverges (a mismatch
//! with the server's hash) simply drops its reference.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::error::Error;
use crate::wire::RoundLog;

/// A replica: the parameters and their [`crate::identity::params_hash`],
/// computed once when the replica is made.
#[derive(Debug, PartialEq)]
pub struct Replica {
    /// The parameters, canonical flat order.
    pub params: Vec<f32>,
    /// Their hash.
    pub hash: [u8; 32],
}

impl Replica {
    /// A replica of `params`, hashed.
    pub fn new(params: Vec<f32>) -> Self {
        let hash = crate::identity::params_hash(&params);
        Replica { params, hash }
    }
}

/// The computation of a round: applies a log to parameters in place.
pub type ApplyLog<'a> = dyn FnMut(&mut Vec<f32>) -> Result<(), Error> + 'a;

/// Keeps replicas (module docs). Implementations must return exactly what
/// applying the log to `from` gives: a store can only choose whether that is
/// a fresh allocation or a shared one.
pub trait ReplicaStore: Send + Sync + std::fmt::Debug {
    /// A checkpoint received in a `Sync`.
    fn adopt(&self, params: Vec<f32>) -> Arc<Replica>;

    /// The replica after `log`: `apply` run on a copy of `from`'s
    /// parameters, or a shared replica that is that result.
    fn advance(&self, from: Arc<Replica>, log: &RoundLog, apply: &mut ApplyLog<'_>) -> Result<Arc<Replica>, Error>;
}

/// One participant, one copy: the default. The log is applied to a copy
/// (the participant keeps its replica until the log has applied, so a log
/// that fails leaves it untouched); the old copy is then dropped.
#[derive(Debug, Default, Clone, Copy)]
pub struct OwnReplica;

impl ReplicaStore for OwnReplica {
    fn adopt(&self, params: Vec<f32>) -> Arc<Replica> {
        Arc::new(Replica::new(params))
    }

    fn advance(&self, from: Arc<Replica>, _log: &RoundLog, apply: &mut ApplyLog<'_>) -> Result<Arc<Replica>, Error> {
        let mut params = Arc::try_unwrap(from).map_or_else(|shared| shared.params.clone(), |own| own.params);
        apply(&mut params)?;
        Ok(Arc::new(Replica::new(params)))
    }
}

/// Replicas remembered by [`SharedReplicas`]: the latest checkpoints
/// adopted and the latest rounds applied. Participants of one run move in
/// step, a round at a time, so a handful covers late joiners and
/// stragglers; each entry keeps its replicas alive (a model each).
const SHARED_REMEMBERED: usize = 8;

#[derive(Debug)]
struct Step {
    from: Arc<Replica>,
    log: RoundLog,
    to: Arc<Replica>,
}

#[derive(Debug, Default)]
struct Memory {
    adopted: VecDeque<Arc<Replica>>,
    steps: VecDeque<Step>,
}

/// Replicas shared by every participant of one process whose replica is
/// provably identical (module docs).
#[derive(Debug, Default)]
pub struct SharedReplicas {
    memory: Mutex<Memory>,
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

impl SharedReplicas {
    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        // A poisoned lock only means a participant panicked mid-update; the
        // entries are whole replicas, so keep using them.
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Distinct replicas the store keeps alive (for tests and reports).
    pub fn remembered(&self) -> usize {
        let m = self.memory();
        m.adopted.len() + m.steps.len()
    }
}

impl ReplicaStore for SharedReplicas {
    fn adopt(&self, params: Vec<f32>) -> Arc<Replica> {
        let mut m = self.memory();
        let known =
            m.adopted.iter().chain(m.steps.iter().map(|s| &s.to)).find(|r| same_bits(&r.params, &params)).cloned();
        if let Some(r) = known {
            return r;
        }
        let r = Arc::new(Replica::new(params));
        m.adopted.push_front(r.clone());
        m.adopted.truncate(SHARED_REMEMBERED);
        r
    }

    fn advance(&self, from: Arc<Replica>, log: &RoundLog, apply: &mut ApplyLog<'_>) -> Result<Arc<Replica>, Error> {
        {
            let m = self.memory();
            if let Some(s) = m.steps.iter().find(|s| Arc::ptr_eq(&s.from, &from) && s.log == *log) {
                return Ok(s.to.clone());
            }
        }
        let mut params = from.params.clone();
        apply(&mut params)?;
        let to = Arc::new(Replica::new(params));
        let mut m = self.memory();
        m.steps.push_front(Step { from, log: log.clone(), to: to.clone() });
        m.steps.truncate(SHARED_REMEMBERED);
        Ok(to)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::wire::LogBody;

    fn log(round: u32, byte: u8) -> RoundLog {
        RoundLog { round, body: LogBody::Combined(vec![byte]), model_hash: [0; 32] }
    }

    /// Adds the log's byte to every parameter: a stand-in for a kind's
    /// deterministic application, counting its calls.
    fn adder<'a>(log: &'a RoundLog, calls: &'a mut u32) -> impl FnMut(&mut Vec<f32>) -> Result<(), Error> + 'a {
        move |p: &mut Vec<f32>| {
            *calls += 1;
            let LogBody::Combined(b) = &log.body else { unreachable!() };
            p.iter_mut().for_each(|x| *x += f32::from(b[0]));
            Ok(())
        }
    }

    #[test]
    fn identical_replicas_share_one_copy_and_anything_different_gets_its_own() {
        let store = SharedReplicas::default();
        let init = vec![0.5f32; 1000];
        let replicas: Vec<Arc<Replica>> = (0..5).map(|_| store.adopt(init.clone())).collect();
        assert!(replicas.iter().all(|r| Arc::ptr_eq(r, &replicas[0])));
        let mut calls = 0;
        let (l1, l1b) = (log(1, 1), log(1, 2));
        let moved: Vec<Arc<Replica>> =
            replicas.into_iter().map(|r| store.advance(r, &l1, &mut adder(&l1, &mut calls)).unwrap()).collect();
        assert_eq!(calls, 1, "computed once for five replicas");
        assert!(moved.iter().all(|r| Arc::ptr_eq(r, &moved[0])));
        assert_eq!(moved[0].params, vec![1.5f32; 1000]);
        assert_eq!(moved[0].hash, crate::identity::params_hash(&moved[0].params));
        // Another log, or another starting replica, computes.
        let other = store.advance(moved[0].clone(), &l1b, &mut adder(&l1b, &mut calls)).unwrap();
        assert_eq!((calls, other.params[0]), (2, 3.5));
        let mut off = init.clone();
        off[7] = f32::from_bits(off[7].to_bits() ^ (1 << 20));
        let lone = store.adopt(off);
        assert!(!Arc::ptr_eq(&lone, &moved[0]));
        let lone = store.advance(lone, &l1, &mut adder(&l1, &mut calls)).unwrap();
        assert_eq!(calls, 3);
        assert!(!Arc::ptr_eq(&lone, &moved[0]));
        // A checkpoint equal to a replica the store made is that replica.
        assert!(Arc::ptr_eq(&store.adopt(vec![1.5f32; 1000]), &moved[0]));
        // The own store computes every time and agrees bit for bit.
        let own = OwnReplica.adopt(init);
        let own = OwnReplica.advance(own, &l1, &mut adder(&l1, &mut calls)).unwrap();
        assert_eq!((calls, &own.params, own.hash), (4, &moved[0].params, moved[0].hash));
    }
}
