//! Admission of new QUIC connections: who gets a connection slot before
//! anyone has authenticated.
//!
//! The policy (also in `docs/reliability.md`, "Admission under
//! unauthenticated load"):
//!
//! 1. **Address validation, always.** An Initial packet whose source address
//!    has not been validated is answered with a QUIC Retry (a token the
//!    client must echo from the same address) and allocates nothing. Only a
//!    peer that receives at its source address gets a connection, so spoofed
//!    or fire-and-forget half-open handshakes cost the server a Retry packet
//!    and no slot, and the per-source limit below counts real addresses.
//!    Always rather than "under load": it costs honest clients one round trip
//!    per connection (they connect once per run, rounds take minutes) and
//!    leaves no window in which a flood allocates state before a load
//!    threshold trips.
//! 2. **Two budgets.** Connections still handshaking or connected but not yet
//!    joined ("pending") have their own budget (`max_pending_connections`),
//!    apart from joined sessions, which are never closed to make room.
//!    Joining moves a connection out of the pending budget. The total
//!    (`max_connections`) bounds memory; by default it is the enrolled
//!    clients plus the pending budget, so a full pending budget never takes
//!    the room of a joined session.
//! 3. **Per-source limit.** At most `max_pending_per_source` pending
//!    connections per source (an IPv4 address, or an IPv6 /64, which one
//!    subscriber usually holds whole), so one address can't take the
//!    whole pending budget.
//! 4. **Deadlines.** A handshake must finish within `handshake_timeout`, and
//!    a connection must join within `join_timeout`; then its pending slot is
//!    free again. (quinn 0.11 has no handshake timeout apart from the idle
//!    timeout, which must stay long for joined clients that train in
//!    silence, so the deadline is the accept task's.)
//!
//! Over a limit, a validated connection is refused at the handshake (QUIC
//! `CONNECTION_REFUSED`), which the client reports and retries with backoff.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The limits of [`Admission`] (validated configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// All connections, pending and joined.
    pub max_connections: usize,
    /// Connections handshaking or not yet joined.
    pub max_pending: usize,
    /// Pending connections from one [`Source`].
    pub max_pending_per_source: usize,
}

/// Where a connection comes from, for the per-source limit: an IPv4
/// address, or the /64 prefix of an IPv6 address (an IPv4-mapped IPv6
/// address counts as its IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// An IPv4 address.
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6Prefix([u8; 8]),
}

impl Source {
    /// The source of a peer at `ip`.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    Source::V6Prefix([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
                }
            },
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` reached.
    Total,
    /// `max_pending_connections` reached.
    Pending,
    /// `max_pending_per_source` reached for this source.
    PerSource,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    pending: usize,
    per_source: HashMap<Source, usize>,
}

/// What admission turned away since the last [`Admission::take_turned_away`]:
/// the summary an operator sees of unauthenticated load.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TurnedAway {
    /// Unvalidated attempts answered with a Retry.
    pub retried: u64,
    /// Refused at `max_connections`.
    pub refused_total: u64,
    /// Refused at `max_pending_connections`.
    pub refused_pending: u64,
    /// Refused at `max_pending_per_source`.
    pub refused_per_source: u64,
    /// Admitted, but closed at the handshake deadline.
    pub handshake_timeouts: u64,
}

impl TurnedAway {
    fn from_counts(
        [retried, refused_total, refused_pending, refused_per_source, handshake_timeouts]: [u64; 5],
    ) -> Self {
        TurnedAway { retried, refused_total, refused_pending, refused_per_source, handshake_timeouts }
    }

    /// Nothing was turned away.
    pub fn is_empty(&self) -> bool {
        *self == TurnedAway::default()
    }
}

/// Connection budgets shared by the accept loop (which admits) and the
/// driver (which marks joins); a [`Ticket`] frees its share when dropped.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    counts: Mutex<Counts>,
    // Counters of `TurnedAway`, in its field order, since the start: never
    // reset, so that the metrics endpoint can expose them as counters.
    turned_away: [AtomicU64; 5],
    // Their values at the last `take_turned_away` (the log's summaries).
    summarised: [AtomicU64; 5],
}

impl Admission {
    /// Empty budgets with these limits.
    pub fn new(limits: AdmissionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            counts: Mutex::new(Counts::default()),
            turned_away: Default::default(),
            summarised: Default::default(),
        })
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // Nothing panics while the lock is held (plain arithmetic and a map
        // update), so a poisoned lock still holds consistent counts.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a pending slot for a validated peer at `ip`, or says which
    /// limit is reached.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<Arc<Ticket>, Refusal> {
        let source = Source::of(ip);
        let mut c = self.counts();
        let from_source = c.per_source.get(&source).copied().unwrap_or(0);
        let refusal = if c.total >= self.limits.max_connections {
            Some(Refusal::Total)
        } else if c.pending >= self.limits.max_pending {
            Some(Refusal::Pending)
        } else if from_source >= self.limits.max_pending_per_source {
            Some(Refusal::PerSource)
        } else {
            None
        };
        if let Some(r) = refusal {
            let i = match r {
                Refusal::Total => 1,
                Refusal::Pending => 2,
                Refusal::PerSource => 3,
            };
            self.turned_away[i].fetch_add(1, Ordering::Relaxed);
            return Err(r);
        }
        c.total += 1;
        c.pending += 1;
        c.per_source.insert(source, from_source + 1);
        Ok(Arc::new(Ticket { admission: self.clone(), source, joined: AtomicBool::new(false) }))
    }

    /// An unvalidated attempt was answered with a Retry.
    pub fn note_retry(&self) {
        self.turned_away[0].fetch_add(1, Ordering::Relaxed);
    }

    /// An admitted connection missed the handshake deadline.
    pub fn note_handshake_timeout(&self) {
        self.turned_away[4].fetch_add(1, Ordering::Relaxed);
    }

    /// What was turned away since the last call.
    pub fn take_turned_away(&self) -> TurnedAway {
        let mut since = [0u64; 5];
        for ((n, total), seen) in since.iter_mut().zip(&self.turned_away).zip(&self.summarised) {
            let now = total.load(Ordering::Relaxed);
            *n = now.saturating_sub(seen.swap(now, Ordering::Relaxed));
        }
        TurnedAway::from_counts(since)
    }

    /// What was turned away since the start (never reset).
    pub fn turned_away_total(&self) -> TurnedAway {
        TurnedAway::from_counts(self.turned_away.each_ref().map(|x| x.load(Ordering::Relaxed)))
    }

    /// (all connections, pending connections) now.
    pub fn load(&self) -> (usize, usize) {
        let c = self.counts();
        (c.total, c.pending)
    }

    fn release_pending(c: &mut Counts, source: Source) {
        c.pending = c.pending.saturating_sub(1);
        if let Some(n) = c.per_source.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Don't keep an entry per address ever seen.
                c.per_source.remove(&source);
            }
        }
    }
}

/// One admitted connection's slot: pending until [`Ticket::joined`], freed
/// when the last reference is dropped (the connection's task and the
/// driver each hold one).
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    source: Source,
    joined: AtomicBool,
}

impl Ticket {
    /// The connection joined: it leaves the pending budget (and its
    /// source's count) and keeps only its place in the total.
    pub fn joined(&self) {
        if !self.joined.swap(true, Ordering::AcqRel) {
            Admission::release_pending(&mut self.admission.counts(), self.source);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.admission.counts();
        c.total = c.total.saturating_sub(1);
        if !self.joined.load(Ordering::Acquire) {
            Admission::release_pending(&mut c, self.source);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pending_budget_per_source_limit_and_joins() {
        let a = Admission::new(AdmissionLimits { max_connections: 6, max_pending: 3, max_pending_per_source: 2 });
        let x1 = a.try_admit(ip("10.0.0.1")).unwrap();
        let x2 = a.try_admit(ip("10.0.0.1")).unwrap();
        // A third from the same address is over its source's limit...
        assert_eq!(a.try_admit(ip("10.0.0.1")).unwrap_err(), Refusal::PerSource);
        // ...another address still gets in, up to the pending budget.
        let y1 = a.try_admit(ip("10.0.0.2")).unwrap();
        assert_eq!(a.try_admit(ip("10.0.0.3")).unwrap_err(), Refusal::Pending);
        assert_eq!(a.load(), (3, 3));
        // Joining frees the pending slot and the source's share, not the total.
        x1.joined();
        x1.joined(); // idempotent
        assert_eq!(a.load(), (3, 2));
        let x3 = a.try_admit(ip("10.0.0.1")).unwrap();
        // Joined sessions are never pushed out: pending connections get
        // only what the total leaves.
        for t in [&x2, &y1, &x3] {
            t.joined();
        }
        let z: Vec<_> = ["10.0.0.4", "10.0.0.5"].iter().map(|s| a.try_admit(ip(s)).unwrap()).collect();
        assert_eq!(a.load(), (6, 2));
        assert_eq!(a.try_admit(ip("10.0.0.6")).unwrap_err(), Refusal::Total);
        // Dropping frees every share, joined or not, exactly once.
        drop((x1, x2, y1, x3, z));
        assert_eq!(a.load(), (0, 0));
        a.note_retry();
        let t = a.take_turned_away();
        assert_eq!(
            t,
            TurnedAway {
                retried: 1,
                refused_total: 1,
                refused_pending: 1,
                refused_per_source: 1,
                handshake_timeouts: 0
            }
        );
        assert!(a.take_turned_away().is_empty());
        // The totals are not reset by the log's summaries.
        a.note_handshake_timeout();
        assert_eq!(a.take_turned_away(), TurnedAway { handshake_timeouts: 1, ..Default::default() });
        assert_eq!(a.turned_away_total(), TurnedAway { handshake_timeouts: 1, ..t });
        assert!(a.counts().per_source.is_empty());
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_prefixes() {
        assert_eq!(Source::of(ip("192.0.2.7")), Source::of(ip("::ffff:192.0.2.7")));
        assert_ne!(Source::of(ip("192.0.2.7")), Source::of(ip("192.0.2.8")));
        // One subscriber's /64 is one source; another /64 is another.
        assert_eq!(Source::of(ip("2001:db8:1:2::1")), Source::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(Source::of(ip("2001:db8:1:2::1")), Source::of(ip("2001:db8:1:3::1")));
        let a = Admission::new(AdmissionLimits { max_connections: 9, max_pending: 9, max_pending_per_source: 1 });
        let _t = a.try_admit(ip("2001:db8::1")).unwrap();
        assert_eq!(a.try_admit(ip("2001:db8::2")).unwrap_err(), Refusal::PerSource);
    }
}
