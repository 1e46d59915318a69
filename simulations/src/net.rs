//! The simulated network: a virtual clock and a queue of deliveries.
//!
//! Each client has a link each way that carries one message at a time, so
//! messages on a connection arrive in order (as on a QUIC connection whose
//! streams the receiver reads in order): a message starts when it is ready
//! and the link is free, takes size / bandwidth, then the latency. A
//! partition loses every message that would arrive at or from a cut-off
//! client while it lasts (the sender doesn't know; QUIC would retransmit
//! into the void and the protocol's deadlines take over).
//!
//! Virtual-time arithmetic is checked: `Duration::from_secs_f64`,
//! `Duration + Duration` and `Instant + Duration` panic on overflow. The
//! scenario's bounds keep each step small; the checks keep an arbitrarily
//! long run from panicking.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::SimError;
use crate::scenario::NetworkSpec;

/// What arrives.
pub(crate) enum Delivery {
    /// Client `i` connects.
    Connect(usize),
    /// A frame from client `i` reaches the server, with its stateless work
    /// done ahead where the sender did it ([`tally_protocol::Preparer`]).
    ToServer(usize, Vec<u8>, Option<Box<tally_protocol::Prepared>>),
    /// A frame from the server reaches client `i`.
    ToClient(usize, Arc<[u8]>),
}

struct Queued {
    at: Duration,
    seq: u64,
    what: Delivery,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// The virtual clock, the pending deliveries (by arrival time, then by
/// the order they were sent) and each client's two links.
pub(crate) struct VirtualNet<'a> {
    spec: &'a NetworkSpec,
    clients: usize,
    /// The real instant virtual time 0 maps to (the state machines take
    /// `Instant`s; nothing reported depends on it).
    t0: Instant,
    /// Virtual time now.
    pub(crate) now: Duration,
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    latency: Duration,
    up_free: Vec<Duration>,
    down_free: Vec<Duration>,
    /// Messages lost to a partition.
    pub(crate) dropped: u64,
}

impl<'a> VirtualNet<'a> {
    /// An idle network of `clients` clients at virtual time 0.
    pub(crate) fn new(spec: &'a NetworkSpec, clients: usize) -> Self {
        VirtualNet {
            spec,
            clients,
            t0: Instant::now(),
            now: Duration::ZERO,
            queue: BinaryHeap::new(),
            seq: 0,
            latency: Duration::from_millis(spec.latency_ms),
            up_free: vec![Duration::ZERO; clients],
            down_free: vec![Duration::ZERO; clients],
            dropped: 0,
        }
    }

    /// The `Instant` of virtual time `now` (what the state machines see).
    pub(crate) fn clock(&self) -> Result<Instant, SimError> {
        self.t0.checked_add(self.now).ok_or(SimError::VirtualTime("past the end of Instant"))
    }

    /// The virtual time of a state machine's `Instant`.
    pub(crate) fn since_start(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.t0)
    }

    /// `now + d`.
    pub(crate) fn after(now: Duration, d: Duration) -> Result<Duration, SimError> {
        now.checked_add(d).ok_or(SimError::VirtualTime("event time overflow"))
    }

    /// `x` seconds as a `Duration`.
    pub(crate) fn secs(x: f64) -> Result<Duration, SimError> {
        Duration::try_from_secs_f64(x).map_err(|_| SimError::VirtualTime("duration out of range"))
    }

    /// Queues a delivery at virtual time `at`.
    pub(crate) fn push(&mut self, at: Duration, what: Delivery) {
        self.seq += 1;
        self.queue.push(Reverse(Queued { at, seq: self.seq, what }));
    }

    /// When the next delivery arrives, if any.
    pub(crate) fn next_at(&self) -> Option<Duration> {
        self.queue.peek().map(|q| q.0.at)
    }

    /// The next delivery; advances the clock to its arrival.
    pub(crate) fn pop(&mut self) -> Option<Delivery> {
        let Reverse(q) = self.queue.pop()?;
        self.now = q.at;
        Some(q.what)
    }

    /// When the partition ends (`to_secs`), if the scenario has one.
    pub(crate) fn partition_end(&self) -> Option<Duration> {
        self.spec.partition.as_ref().and_then(|p| Duration::try_from_secs_f64(p.to_secs).ok())
    }

    /// Whether client `slot` is cut off at virtual time `at`.
    pub(crate) fn cut(&self, slot: usize, at: Duration) -> bool {
        self.spec.partition.as_ref().is_some_and(|p| {
            let cut_off = ((p.fraction * self.clients as f64) as usize).min(self.clients);
            slot < cut_off && (p.from_secs..p.to_secs).contains(&at.as_secs_f64())
        })
    }

    /// Sends `frame` from client `slot` to the server once it is `ready`.
    pub(crate) fn send_up(
        &mut self,
        slot: usize,
        ready: Duration,
        frame: Vec<u8>,
        prepared: Option<Box<tally_protocol::Prepared>>,
    ) -> Result<(), SimError> {
        let link = self.up_free.get_mut(slot).ok_or(SimError::UnknownConnection(slot as u64))?;
        let at = transfer(self.spec, self.latency, link, ready, frame.len())?;
        self.push(at, Delivery::ToServer(slot, frame, prepared));
        Ok(())
    }

    /// Sends `bytes` from the server to client `slot` now.
    pub(crate) fn send_down(&mut self, slot: usize, bytes: Arc<[u8]>) -> Result<(), SimError> {
        // `slot` is a connection handle the coordinator got from us (one per
        // client); a stray one is a protocol bug.
        let link = self.down_free.get_mut(slot).ok_or(SimError::UnknownConnection(slot as u64))?;
        let at = transfer(self.spec, self.latency, link, self.now, bytes.len())?;
        self.push(at, Delivery::ToClient(slot, bytes));
        Ok(())
    }
}

/// One message over a link free from `*free`: starts when ready and free,
/// occupies the link for size / bandwidth, arrives a latency later.
fn transfer(
    spec: &NetworkSpec,
    latency: Duration,
    free: &mut Duration,
    ready: Duration,
    bytes: usize,
) -> Result<Duration, SimError> {
    let start = ready.max(*free);
    *free = VirtualNet::after(start, VirtualNet::secs(bytes as f64 * 8.0 / (spec.bandwidth_mbps * 1e6))?)?;
    VirtualNet::after(*free, latency)
}
