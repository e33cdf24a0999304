//! Segw → initiator: steer a segw's packet back to its initiator and learn
//! from it (the responder's IKE SPI, the endpoint a segw answers, SPIs the
//! segw teaches).

use crate::packet::{IkeHeader, IpPacket, Mac, Payload};
use crate::policy::{Policy, TunnelKey};
use crate::time::Timestamp;

use super::affinity::{Tunnel, TunnelId};
use super::gateways::{GwId, PortId, UPLINK};
use super::rules::{Evidence, Find, Keys, Outbound, Placement};
use super::{link_scoped, tunnel_key, Balancer, Bulk, DropReason, Egress};

impl<P: Policy> Balancer<P> {
    /// Segw → initiator: confirm or teach the peer's tunnel (see
    /// [`Outbound`]), then out the uplink to the peer's next hop.
    pub(super) fn segw_to_initiator(
        &mut self,
        ip: &IpPacket,
        ingress: PortId,
        src_mac: Mac,
        now: Timestamp,
        bulk: Option<Bulk>,
    ) -> Result<Egress, DropReason> {
        let Bulk { packets, bytes } = bulk.unwrap_or(Bulk::one(ip.len));
        let gw = {
            let g = self
                .gateways
                .on_port_mut(ingress)
                .ok_or(DropReason::UnknownPort)?;
            if g.spec.mac.is_none() && g.mac != Some(src_mac) {
                g.mac = Some(src_mac);
                self.epoch += 1; // the fast path's entries carry the MAC
            }
            g.probe.heard = true;
            g.counters.frames_from += packets;
            g.counters.bytes_from += bytes;
            g.id
        };
        if link_scoped(ip.dst) {
            return Err(DropReason::LinkScoped);
        }
        let rule = Outbound::of(ip);
        let mut found = self.table.find(rule.find, &rule.keys);
        if !self.moves.is_idle() {
            found = self.segw_moving(found, gw, &ip.payload, now);
        }
        let tunnel = if let Some(evidence) = rule.teaches {
            // The segw's own traffic to the peer: the tunnel is there.
            let key = tunnel_key(ip.dst, ip.src, &rule.keys, &ip.payload);
            let id = self.teach(found.map(|(id, _)| id), key, gw, evidence, now)?;
            if let Payload::Ike { header, .. } = &ip.payload {
                if let Some((_, Find::Endpoint)) = found {
                    self.segw_names_ike_sa(id, gw, header);
                }
                self.learn_responder_spi(id, gw, header);
                if let Some((_, Find::Spi)) = found {
                    self.follow_segw(id, gw, &rule.keys);
                }
            }
            Some(id)
        } else {
            found.map(|(id, _)| id)
        };
        let next_hop = tunnel.and_then(|id| {
            let t = self.table.get_mut(id)?;
            t.frames_back += packets;
            t.bytes_back += bytes;
            t.next_hop
        });
        let dst = next_hop
            .or(self.default_next_hop)
            .ok_or(DropReason::NextHopUnknown)?;
        Ok(Egress::new(UPLINK, dst))
    }

    /// The tunnel's own segw sent IKE to the tunnel's endpoint for an IKE SA
    /// the entry does not name: the peer there has that IKE SA now (a
    /// rekeyed IKE SA, or one opened again after the table was saved and
    /// restored). The entry takes its SPI, as it does when the initiator
    /// speaks first, so the new SA's messages prove a later move.
    pub(super) fn segw_names_ike_sa(&mut self, id: TunnelId, gw: GwId, h: &IkeHeader) {
        if self.table.get(id).is_some_and(|t| t.gateway == gw) {
            self.table.set_spi(id, h.initiator_spi);
        }
    }

    /// The tunnel's segw sent IKE for its IKE SA: the responder SPI it
    /// carries completes the pair that proves the initiator's later frames.
    pub(super) fn learn_responder_spi(&mut self, id: TunnelId, gw: GwId, h: &IkeHeader) {
        let Some(t) = self.table.get_mut(id) else {
            return;
        };
        if t.gateway == gw
            && t.ike_spi == Some(h.initiator_spi)
            && h.responder_spi != 0
            && t.responder_spi != Some(h.responder_spi)
        {
            t.responder_spi = Some(h.responder_spi);
            self.table.note(id);
        }
    }

    /// The tunnel's own segw sent its IKE SA to another endpoint: the segw
    /// accepted the peer's move there (a NAT-T float or MOBIKE it verified:
    /// it answers an IKE SA's messages only when their integrity checks,
    /// and to where they came from). The binding follows, also onto an
    /// endpoint another tunnel held.
    pub(super) fn follow_segw(&mut self, id: TunnelId, gw: GwId, keys: &Keys) {
        let Some(port) = keys.port else { return };
        if self.table.get(id).is_some_and(|t| t.gateway == gw) {
            if let Ok(Some(evicted)) = self.table.rebind(id, (keys.addr, port), true) {
                self.forget(&evicted);
            }
        }
    }

    /// Evidence that segw `gw` holds the tunnel `key` describes: learn the
    /// tunnel (after a restart), confirm it, or move it there when its
    /// placement yields (see [`Placement::is_tentative`]); else a counted
    /// conflict, and the tunnel stays.
    pub(super) fn teach(
        &mut self,
        found: Option<TunnelId>,
        key: TunnelKey,
        gw: GwId,
        evidence: Evidence,
        now: Timestamp,
    ) -> Result<TunnelId, DropReason> {
        let Some(id) = found else {
            let placement = Placement::Guessed.confirmed_by(evidence);
            let id = self.insert(Tunnel::new(&key, gw, placement, now))?;
            self.counters.taught += 1;
            return Ok(id);
        };
        let t = self.table.get(id).expect("found tunnels are live");
        if t.gateway != gw {
            if !t.placement().is_tentative() {
                // A segw the tunnel was moved away from (a rebalance, a
                // segw that came back), still talking to the peer: its
                // frame goes to the peer, the tunnel stays.
                self.counters.conflicts += 1;
                return Ok(id);
            }
            self.move_tunnel(id, gw);
            self.counters.taught += 1;
        }
        let t = self.table.get_mut(id).expect("found above");
        t.last_seen = now;
        let placement = t.placement().confirmed_by(evidence);
        self.set_placement(id, placement);
        Ok(id)
    }
}
