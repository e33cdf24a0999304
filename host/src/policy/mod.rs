//! Balancing policies as the core sees them: a [`Policy`] trait, whether the
//! policy is a wasm component ([`wasm`]) or a native twin ([`native`]).
//!
//! The core never calls a policy directly: it goes through [`Guarded`],
//! which checks every answer against the gateway set and falls back to a
//! deterministic choice when the policy fails, so a misbehaving policy can
//! cost a tunnel its ideal placement but never the tunnel itself.

mod breaker;
mod guard;
pub mod load;
pub mod native;
pub mod wasm;

use std::time::Duration;

pub use guard::{Choice, FallbackReason, Guarded, PolicyStats, Refusal};
pub use load::Load;
pub use segwlb_policy_sdk::{Gateway, Opener, TunnelKey};

/// The contract version of `wit/policy.wit`, what new policies are built against.
pub const CONTRACT: &str = "segwlb:policy@0.3.0";
/// Every contract version this host runs (older ones frozen in `wit/vX.Y.Z/`).
pub const CONTRACTS: [&str; 3] = ["segwlb:policy@0.1.0", "segwlb:policy@0.2.0", CONTRACT];

/// Why one call into a policy produced no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("trapped: {0}")]
    Trap(String),
    #[error("ran past its time budget of {0:?}")]
    Timeout(Duration),
    #[error("tried to grow its memory past the cap of {0} bytes")]
    MemoryCap(usize),
    /// The policy could not be brought back after an earlier failure.
    #[error("is unavailable: {0}")]
    Unavailable(String),
    /// A fresh instance is being started off the data path after a failure.
    #[error("is restarting after a failure")]
    Restarting,
}

/// A balancing policy: told the gateway set when it changes, asked for the
/// gateway of each new tunnel. See `wit/policy.wit` for the contract.
pub trait Policy: Send {
    /// Short name for logs and reports (the file stem for wasm policies).
    fn name(&self) -> &str;

    /// The whole gateway set, after any change.
    fn set_gateways(&mut self, gateways: &[Gateway]) -> Result<(), CallError>;

    /// The gateway id for one new tunnel, or `None` for "no answer";
    /// `load` is the live view: tunnels, traffic and utilization per gateway.
    fn choose(&mut self, key: &TunnelKey, load: &Load) -> Result<Option<u32>, CallError>;

    /// The worker's time its calls took since this was last asked, for the
    /// breaker. Zero unless measured: a wasm policy on the data path
    /// measures; native policies and simulations (which must stay a
    /// function of their seed) do not.
    fn spent(&mut self) -> Duration {
        Duration::ZERO
    }
}

impl Policy for Box<dyn Policy> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn set_gateways(&mut self, gateways: &[Gateway]) -> Result<(), CallError> {
        (**self).set_gateways(gateways)
    }
    fn choose(&mut self, key: &TunnelKey, load: &Load) -> Result<Option<u32>, CallError> {
        (**self).choose(key, load)
    }
    fn spent(&mut self) -> Duration {
        (**self).spent()
    }
}
