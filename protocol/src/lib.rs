//! Tally's deterministic, sans-IO protocol core.
//!
//! What it does: the wire types and their codec ([`wire`], [`codec`]), client
//! identities and signatures ([`identity`]), the server's [`Coordinator`] and
//! the client's [`Participant`] state machines, aggregation ([`aggregate`]),
//! update kinds as plug-ins ([`kind`]: one module each, [`fedavg`],
//! [`fedavgm`], [`spsa`], [`frl`], [`ferret`], [`dpftrl`]) and aggregation rules over vectors
//! ([`rule`]), model shapes shared by every party ([`model`]; networks
//! described layer by layer and their shape inference, [`sequential`]; FRL's
//! seed-derived networks in [`supermask`]; the files models leave the
//! system in, [`model_file`]), and differential privacy under
//! continual release ([`dp`]: exact samplers, the tree counter, sparse
//! vector, accounting; the tree drives the [`dpftrl`] kind, whose secret
//! noise seed the host draws).
//!
//! What it never does: open sockets, read the clock (every input carries the
//! host's `now`), draw OS randomness (every generator is seeded by the host),
//! or link an ML framework. Given the same inputs it produces the same
//! outputs, which is what lets the simulator replay a run byte for byte.

pub mod aggregate;
pub mod codec;
pub mod coordinator;
pub mod dp;
pub mod dpftrl;
pub mod durable;
pub mod error;
pub mod fedavg;
pub mod fedavgm;
pub mod ferret;
pub mod frl;
// Entry points of the cargo-fuzz targets in `fuzz/`, here so stable tests can
// run them over the checked-in corpus. They read files and the clock, so
// they are compiled only for tests and for the fuzzer (feature `fuzz`),
// never into the sans-IO core that the binaries link.
#[cfg(any(test, feature = "fuzz"))]
#[doc(hidden)]
pub mod fuzz_entry;
pub mod identity;
pub mod kind;
pub mod metrics;
pub mod model;
pub mod model_file;
pub mod participant;
pub mod prng;
pub mod replica;
pub mod rng;
pub mod rule;
pub mod sequential;
pub mod spsa;
pub mod supermask;
pub mod wire;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

pub use aggregate::{Aggregator, ClientIndex};
pub use coordinator::{
    ConnectionHandle, Coordinator, CoordinatorConfig, Event, Phase, Prepared, Preparer, RoundSummary, Transmit,
};
pub use error::Error;
pub use fedavg::FedAvg;
pub use identity::Identity;
pub use kind::{AlgorithmSpec, KindSettings, RuleSpec, UpdateKind};
pub use participant::{Participant, ParticipantEvent};
