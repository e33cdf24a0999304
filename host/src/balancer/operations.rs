//! What the operator and the control plane change: the gateway set (add,
//! remove, weight, capacity, throughput, drain, health), the ports' MACs
//! and proxied prefixes, the policy (a swap, with or without a rebalance,
//! and the rebalance's steps), and idle expiry.

use crate::packet::Mac;
use crate::policy::{Load, Policy};
use crate::time::Timestamp;

use super::affinity::{TunnelId, TunnelState};
use super::gateways::{GatewayError, GatewaySpec, GatewayState, GwId, PortId};
use super::prefix::Prefix;
use super::{key_of, Balancer, DropReason, Rebalancing};

impl<P: Policy> Balancer<P> {
    pub fn add_gateway(&mut self, spec: GatewaySpec, now: Timestamp) -> Result<GwId, GatewayError> {
        let id = self.gateways.add(spec)?;
        self.fast_path_changed();
        self.push_set(now);
        Ok(id)
    }

    /// Remove a gateway; its tunnels are re-placed on their next packet.
    pub fn remove_gateway(&mut self, name: &str, now: Timestamp) -> Result<(), GatewayError> {
        self.gateways.remove(name)?;
        self.fast_path_changed();
        self.push_set(now);
        Ok(())
    }

    pub fn set_weight(
        &mut self,
        name: &str,
        weight: u32,
        now: Timestamp,
    ) -> Result<(), GatewayError> {
        self.update(name, now, |g| g.spec.weight = weight)
    }

    /// The most tunnels `name` may hold (0: no limit). Lowering it below
    /// what the gateway holds evicts nothing: it takes no new tunnels until
    /// it is under the limit again.
    pub fn set_capacity(
        &mut self,
        name: &str,
        capacity: u64,
        now: Timestamp,
    ) -> Result<(), GatewayError> {
        self.update(name, now, |g| g.spec.capacity = capacity)
    }

    /// The traffic `name` can carry, bytes/s both ways (0: not given):
    /// what its utilization is measured against. Refuses nothing.
    pub fn set_throughput(
        &mut self,
        name: &str,
        throughput: u64,
        now: Timestamp,
    ) -> Result<(), GatewayError> {
        self.update(name, now, |g| g.spec.throughput = throughput)
    }

    /// Draining: no new tunnels; existing ones stay.
    pub fn set_draining(
        &mut self,
        name: &str,
        draining: bool,
        now: Timestamp,
    ) -> Result<(), GatewayError> {
        self.update(name, now, |g| g.draining = draining)
    }

    /// Down: no new tunnels; its tunnels are re-placed on their next packet.
    pub fn set_healthy(
        &mut self,
        name: &str,
        healthy: bool,
        now: Timestamp,
    ) -> Result<(), GatewayError> {
        if self
            .gateways
            .by_name(name)
            .is_some_and(|g| g.healthy != healthy)
        {
            self.fast_path_changed();
        }
        self.update(name, now, |g| g.healthy = healthy)
    }

    /// Change one gateway and tell the policy the new set.
    pub(super) fn update(
        &mut self,
        name: &str,
        now: Timestamp,
        change: impl FnOnce(&mut GatewayState),
    ) -> Result<(), GatewayError> {
        change(self.gateways.by_name_mut(name)?);
        self.push_set(now);
        Ok(())
    }

    /// Tell the policy the gateway set. Weights, capacities, throughputs
    /// and draining are the policy's business only: a change of those
    /// leaves the fast path's entries as they are (at a million tunnels a
    /// full resync is millions of lookups); whoever changes what the fast
    /// path reads says so with [`fast_path_changed`](Self::fast_path_changed).
    pub(super) fn push_set(&mut self, now: Timestamp) {
        self.policy.set_gateways(self.gateways.views(), now);
    }

    /// Something every fast-path entry may depend on changed: a segw's
    /// health or MAC, the set, a port's MAC, the first next hop.
    pub(super) fn fast_path_changed(&mut self) {
        self.epoch += 1;
    }

    /// Our MAC on `port` (a port added at runtime, or a NIC replaced).
    pub fn set_port_mac(&mut self, port: PortId, mac: Mac) {
        let i = usize::from(port);
        if self.config.port_macs.len() <= i {
            self.config.port_macs.resize(i + 1, [0; 6]);
        }
        if self.config.port_macs[i] != mac {
            self.config.port_macs[i] = mac;
            self.fast_path_changed();
        }
    }

    /// Replace the proxied prefixes (a config reload).
    pub fn set_proxy(&mut self, uplink: Vec<Prefix>, gateways: Vec<Prefix>) {
        self.config.proxy = uplink;
        self.config.proxy_gateways = gateways;
    }

    /// Put another policy in place. Without `rebalance` no tunnel moves;
    /// with it, every tunnel is placed afresh and the moves are counted
    /// (returned), all at once: for simulations and tests. The live
    /// balancer re-places a slice at a time ([`swap_policy`](Self::swap_policy),
    /// [`rebalance_step`](Self::rebalance_step)). Returns the old policy too.
    pub fn replace_policy(&mut self, policy: P, rebalance: bool, now: Timestamp) -> (P, u64) {
        let old = self.swap_policy(policy, rebalance, now);
        let moved = loop {
            if let Some(moved) = self.rebalance_step(usize::MAX, now) {
                break moved;
            }
        };
        (old, moved)
    }

    /// Put another policy in place; with `rebalance`, begin placing every
    /// tunnel afresh, which [`rebalance_step`](Self::rebalance_step) does a
    /// slice at a time (a rebalance still under way ends: its policy is
    /// gone). Returns the old policy.
    ///
    /// "Afresh" is what the policy is told: the set with every tunnel count
    /// at 0, then one `choose` per tunnel on the load it has placed so far,
    /// then the real counts. A policy that bounds loads (`weighted`) would
    /// otherwise see every gateway full before it placed the first tunnel.
    pub fn swap_policy(&mut self, policy: P, rebalance: bool, now: Timestamp) -> P {
        let old = self.policy.replace(policy);
        self.rebalancing = None;
        if rebalance {
            let mut empty = self.gateways.views();
            for g in &mut empty {
                g.tunnels = 0;
            }
            self.policy.set_gateways(empty, now);
            self.rebalancing = Some(Rebalancing {
                cursor: 0,
                began: now,
                fresh: Load::fresh_from(&self.load),
                moved: 0,
                graceful: false,
            });
        }
        old
    }

    /// Place up to `budget` more slots' tunnels afresh. `Some(moved)` once
    /// the rebalance is over (the policy is then told the real set), or
    /// when none is under way (`Some(0)`).
    ///
    /// A tunnel first seen after the rebalance began was placed by the new
    /// policy already, and is not visited. A tunnel with no room anywhere
    /// stays where it is (and counts there): a rebalance never evicts.
    pub fn rebalance_step(&mut self, budget: usize, now: Timestamp) -> Option<u64> {
        let Some(mut r) = self.rebalancing.take() else {
            return Some(0);
        };
        let end = self.table.slots().min(r.cursor.saturating_add(budget));
        for slot in r.cursor..end {
            let id = slot as TunnelId;
            let Some(t) = self.table.get(id) else {
                continue;
            };
            if t.since > r.began {
                continue;
            }
            let (key, current, since) = (key_of(t), t.gateway, t.since);
            let working = t.state() == TunnelState::Established;
            let placed = match self.policy.choose_in_background(&key, &r.fresh, now) {
                Ok(choice) if r.graceful && working && choice.gateway != current => {
                    if self.moves.enqueue(id, since, Some(choice.gateway)) {
                        r.moved += 1;
                    }
                    choice.gateway
                }
                Ok(choice) => {
                    let before = self.counters.moved;
                    self.move_tunnel(id, choice.gateway);
                    r.moved += self.counters.moved - before;
                    choice.gateway
                }
                Err(_) => current,
            };
            r.fresh.add(placed, 1);
        }
        r.cursor = end;
        if r.cursor < self.table.slots() {
            self.rebalancing = Some(r);
            return None;
        }
        self.push_set(now);
        Some(r.moved)
    }

    /// A rebalance is under way.
    pub fn is_rebalancing(&self) -> bool {
        self.rebalancing.is_some()
    }

    /// Forget idle tunnels (up to `budget` slots per call; see
    /// [`AffinityTable::expire`]), old fragment decisions, and held
    /// fragments whose first fragment did not come (counted as dropped).
    pub fn expire(&mut self, now: Timestamp, budget: usize) -> usize {
        let t = self.config.timeouts;
        let stale = self.fragments.expire(now, t.fragment_hold, t.fragment);
        self.counters.drops[DropReason::FragmentTimeout as usize] += stale as u64;
        let gone = self.table.expire(now, budget);
        for t in &gone {
            self.forget(t);
        }
        self.age(now, budget);
        gone.len()
    }

    /// Half-open tunnels past the handshake window stop holding a place
    /// (at most `budget` looked at).
    pub fn age(&mut self, now: Timestamp, budget: usize) {
        let load = &mut self.load;
        self.table.age(now, budget, |gw| load.add(gw, -1));
    }
}
