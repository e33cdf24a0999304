//! The shipped policies compiled into the host: the wasm policies' twins.
//!
//! Same crates, same code as the `.wasm` files, so a difference between a
//! twin and its component is a bug in the contract's plumbing. Used by the
//! differential tests, by the overhead benchmark, and as the built-in
//! fallback (`weighted`).

use segwlb_policy_sdk::{Balance, Params};

use super::{CallError, Gateway, Load, Policy, TunnelKey};

/// The names of the policies that ship with segwlb.
pub const SHIPPED: [&str; 6] = [
    "round-robin",
    "consistent-hash",
    "weighted",
    "least-tunnels",
    "two-choices",
    "least-utilization",
];

/// A [`Balance`] implementation behind the [`Policy`] trait.
pub struct Native<B> {
    name: String,
    inner: B,
}

impl<B: Balance> Native<B> {
    pub fn new(name: &str, params: &[(String, String)]) -> Result<Self, String> {
        let inner = B::configure(Params::new(params.to_vec()))?;
        Ok(Native {
            name: name.to_string(),
            inner,
        })
    }
}

impl<B: Balance + Send> Policy for Native<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn set_gateways(&mut self, gateways: &[Gateway]) -> Result<(), CallError> {
        self.inner.set_gateways(gateways);
        Ok(())
    }

    fn choose(&mut self, key: &TunnelKey, load: &Load) -> Result<Option<u32>, CallError> {
        Ok(self.inner.choose(key, load))
    }
}

/// The native twin of a shipped policy, by name.
pub fn shipped(name: &str, params: &[(String, String)]) -> Result<Box<dyn Policy>, String> {
    fn boxed<B: Balance + Send + 'static>(
        name: &str,
        params: &[(String, String)],
    ) -> Result<Box<dyn Policy>, String> {
        Ok(Box::new(Native::<B>::new(name, params)?))
    }
    match name {
        "round-robin" => boxed::<round_robin::RoundRobin>(name, params),
        "consistent-hash" => boxed::<consistent_hash::ConsistentHash>(name, params),
        "weighted" => boxed::<weighted::Weighted>(name, params),
        "least-tunnels" => boxed::<least_tunnels::LeastTunnels>(name, params),
        "two-choices" => boxed::<two_choices::TwoChoices>(name, params),
        "least-utilization" => boxed::<least_utilization::LeastUtilization>(name, params),
        _ => Err(format!(
            "no native policy `{name}`; shipped: {}",
            SHIPPED.join(", ")
        )),
    }
}
