//! The live load a policy may read inside `choose` (contract 0.2.0's
//! `load`; from 0.3.0 also traffic and utilization).

use std::cmp::Ordering;

/// One gateway's load now, as the host measures it (contract 0.3.0's
/// `gateway-load`). Rates are per second, smoothed over the host's window;
/// "to" is towards the segw (from initiators), "from" is from it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GatewayLoad {
    /// Tunnels bound to it now (as [`Load::tunnels`]).
    pub tunnels: u64,
    pub bytes_to: u64,
    pub bytes_from: u64,
    pub packets_to: u64,
    pub packets_from: u64,
    /// What the host measured: the larger of its traffic (both ways) over
    /// its throughput capacity and its tunnels over its tunnel capacity
    /// (each only where that capacity is set); 1.0 is full. Tunnels placed
    /// since the last measurement count at the gateway's mean rate per
    /// tunnel, so a burst of placements sees itself.
    pub measured: f64,
    /// What was reported from outside (its CPU, say), while the report is
    /// live.
    pub reported: Option<f64>,
    /// What balancing should use: the larger of `measured` and `reported`.
    pub utilization: f64,
}

/// Tunnels per gateway now, as the host counts them (every placement before
/// this call included). In wasm each read is one call into the host.
pub trait Load {
    /// Tunnels bound to gateway `id` now; 0 for an id not in the set.
    fn tunnels(&self, id: u32) -> u64;

    /// Gateway `id`'s traffic and utilization now. A load that knows only
    /// tunnels (contract 0.2.0, or a test's closure) says so: no traffic,
    /// utilization 0.
    fn gateway(&self, id: u32) -> GatewayLoad {
        GatewayLoad {
            tunnels: self.tunnels(id),
            ..GatewayLoad::default()
        }
    }

    /// [`gateway`](Load::gateway) of each of `ids`, in order, into `out`
    /// (cleared first): in wasm one call into the host however many ids.
    fn gateways_of(&self, ids: &[u32], out: &mut Vec<GatewayLoad>) {
        out.clear();
        out.extend(ids.iter().map(|&id| self.gateway(id)));
    }

    /// The tunnels and the utilization of each of `ids`, in order, into
    /// `tunnels` and `utilization` (cleared first): in wasm one call into
    /// the host, and the cheapest way to read every gateway's utilization.
    fn utilization_of(&self, ids: &[u32], tunnels: &mut Vec<u64>, utilization: &mut Vec<f64>) {
        tunnels.clear();
        utilization.clear();
        for &id in ids {
            let g = self.gateway(id);
            tunnels.push(g.tunnels);
            utilization.push(g.utilization);
        }
    }

    /// [`tunnels`](Load::tunnels) of each of `ids`, in order, into `out`
    /// (cleared first). In wasm this is one call into the host however
    /// many ids, where `tunnels` is one each: a policy that reads every
    /// gateway per decision should use this.
    fn tunnels_of(&self, ids: &[u32], out: &mut Vec<u64>) {
        out.clear();
        out.extend(ids.iter().map(|&id| self.tunnels(id)));
    }
}

/// A load given as a function, for tests: `&|id| counts[id as usize]`.
impl<F: Fn(u32) -> u64> Load for F {
    fn tunnels(&self, id: u32) -> u64 {
        self(id)
    }
}

/// No tunnels anywhere: for load-blind callers and tests.
pub struct Empty;

impl Load for Empty {
    fn tunnels(&self, _: u32) -> u64 {
        0
    }
}

/// Compare two gateways' load per unit of weight, `a.0 / a.1` against
/// `b.0 / b.1`, exactly (integers, no division): `Less` when `a` is the
/// lighter. Weights must be > 0.
pub fn per_weight(a: (u64, u32), b: (u64, u32)) -> Ordering {
    if (a.0 | b.0) >> 32 == 0 {
        // Both products fit in 64 bits: wasm has no 128-bit multiply, and
        // this is on every decision of a load-aware policy.
        (a.0 * u64::from(b.1)).cmp(&(b.0 * u64::from(a.1)))
    } else {
        (u128::from(a.0) * u128::from(b.1)).cmp(&(u128::from(b.0) * u128::from(a.1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnels_of_reads_each_in_order() {
        let load = |id: u32| u64::from(id) * 10;
        let mut out = vec![7];
        load.tunnels_of(&[3, 1, 9], &mut out);
        assert_eq!(out, [30, 10, 90]);
    }

    #[test]
    fn per_weight_is_exact() {
        assert_eq!(per_weight((2, 2), (1, 1)), Ordering::Equal);
        assert_eq!(per_weight((3, 2), (1, 1)), Ordering::Greater);
        assert_eq!(per_weight((u64::MAX, 1), (u64::MAX, 2)), Ordering::Greater);
        assert_eq!(per_weight((1 << 40, 3), (3 << 40, 9)), Ordering::Equal);
        assert_eq!(
            per_weight((u32::MAX.into(), u32::MAX), (1, 1)),
            Ordering::Equal
        );
        assert_eq!(
            per_weight((u32::MAX.into(), 1), (u32::MAX.into(), 2)),
            Ordering::Greater
        );
    }
}
