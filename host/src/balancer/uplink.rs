//! Initiator → segw: steer a packet by the affinity table (the policy on a
//! miss only), hold or steer fragments, open and move tunnels, count what
//! each tunnel and gateway carries.

use std::net::IpAddr;

use crate::packet::{rewrite, Fragment, IkeHeader, IpPacket, Mac, Payload, Udp};
use crate::policy::{Policy, Refusal, TunnelKey};
use crate::time::Timestamp;

use super::affinity::{Tunnel, TunnelId};
use super::fragments::FragmentKey;
use super::gateways::{GwId, SpiSteering};
use super::rules::{Evidence, Find, Inbound, Keys, Miss, Placement};
use super::{key_of, tunnel_key, Balancer, Bulk, DropReason, Egress, Steered, Verdict};

impl<P: Policy> Balancer<P> {
    /// Initiator → segw, a whole packet.
    #[inline]
    pub(super) fn initiator_to_segw(
        &mut self,
        ip: &IpPacket,
        src_mac: Mac,
        now: Timestamp,
        bulk: Option<Bulk>,
    ) -> Result<Egress, DropReason> {
        let steered = self.steer_in(ip, now)?;
        let esp_spi = match ip.payload {
            Payload::Esp { spi } | Payload::EspInUdp { spi, .. } => Some(spi),
            _ => None,
        };
        let Bulk { packets, bytes } = bulk.unwrap_or(Bulk::one(ip.len));
        self.deliver(&steered, packets, bytes, src_mac, esp_spi, now)
    }

    /// A piece of a fragmented packet from an initiator. The first piece
    /// is steered like a whole packet, always on its own merits (two peers
    /// behind one NAT may reuse an IP ID within the window); a later piece
    /// goes where its first went, or waits for it (see [`fragments`]).
    pub(super) fn fragment_in(
        &mut self,
        ip: &IpPacket,
        piece: Fragment,
        frame: &mut Vec<u8>,
        src_mac: Mac,
        now: Timestamp,
    ) -> Verdict {
        let key = FragmentKey::of(ip, piece);
        let decided = if piece.first {
            None
        } else {
            self.fragments.decided(&key).filter(|&gw| self.is_up(gw))
        };
        let steered = match decided {
            Some(gw) => Ok(Steered::fragment(gw)),
            None if !piece.first => match self.hold(key, std::mem::take(frame), ip.len, now) {
                Ok(()) => {
                    self.counters.held += 1;
                    return Verdict::Held;
                }
                Err(back) => {
                    *frame = back;
                    // No room: the rules say what the address may decide.
                    self.steer_in(ip, now)
                }
            },
            None => self.steer_in(ip, now),
        };
        // Whatever waited for this packet goes, or is dropped, with it.
        let held = self.fragments.take(&key);
        let (more, more_bytes) = held
            .as_ref()
            .map_or((0, 0), |h| (h.frames.len(), h.ip_bytes));
        let egress = match steered {
            Ok(steered) => {
                self.fragments.decide(key, steered.gw, now);
                let (frames, bytes) = (1 + more as u64, ip.len as u64 + more_bytes);
                self.deliver(&steered, frames, bytes, src_mac, None, now)
            }
            Err(reason) => Err(reason),
        };
        match (egress, held) {
            (Ok(to), None) => self.forward(frame, to),
            (Ok(to), Some(held)) => {
                let mut frames = held.frames;
                let our_mac = self.port_mac(to.port());
                for f in &mut frames {
                    rewrite::set_macs(f, to.dst(), our_mac);
                }
                self.counters.forwarded += frames.len() as u64;
                self.forward(frame, to);
                Verdict::ForwardWithHeld(to.port(), frames)
            }
            (Err(reason), _) => self.count_drop(reason, 1 + more),
        }
    }

    /// Hold a later fragment for its first; the frame back when there is no
    /// room, even after dropping (counted) what waited too long.
    pub(super) fn hold(
        &mut self,
        key: FragmentKey,
        frame: Vec<u8>,
        ip_len: usize,
        now: Timestamp,
    ) -> Result<(), Vec<u8>> {
        let frame = match self.fragments.hold(key, frame, ip_len, now) {
            Ok(()) => return Ok(()),
            Err(frame) => frame,
        };
        let stale = self
            .fragments
            .expire_held(now, self.config.timeouts.fragment_hold);
        self.counters.drops[DropReason::FragmentTimeout as usize] += stale as u64;
        if stale == 0 {
            return Err(frame);
        }
        self.fragments.hold(key, frame, ip_len, now)
    }

    /// `frames` of one packet, `bytes` in all, go where they were steered:
    /// count them on their tunnel and gateway, and say where they go.
    /// Frames that cannot go (the segw's MAC is not known yet) are counted
    /// as drops only.
    ///
    /// The next hop back to the peer is the MAC of the tunnel's first frame,
    /// then of the last frame that proved the tunnel; the default next hop
    /// (for peers with none yet, after a restart) the first frame's, then
    /// the last proof's. Anyone on the segment can send any other frame.
    ///
    /// `esp_spi`: the packet's ESP SPI, kept on its tunnel (which of the
    /// peer's SAs a graceful move leaves on the old segw).
    #[inline]
    pub(super) fn deliver(
        &mut self,
        s: &Steered,
        frames: u64,
        bytes: u64,
        src_mac: Mac,
        esp_spi: Option<u32>,
        now: Timestamp,
    ) -> Result<Egress, DropReason> {
        let gateway = self
            .gateways
            .get_mut(s.gw)
            .expect("steered to a live gateway");
        let to = Egress::new(
            gateway.spec.port,
            gateway.mac.ok_or(DropReason::GatewayMacUnknown)?,
        );
        gateway.counters.frames_to += frames;
        gateway.counters.bytes_to += bytes;
        if let Some(id) = s.tunnel {
            let t = self
                .table
                .get_mut(id)
                .expect("steer_in returns live tunnels");
            t.last_seen = now;
            t.frames += frames;
            t.bytes += bytes;
            if let Some(spi) = esp_spi {
                t.esp_spi = spi;
            }
            if (s.proven || t.next_hop.is_none()) && t.next_hop != Some(src_mac) {
                t.next_hop = Some(src_mac);
                self.table.touch(id);
            }
        }
        if (s.proven || self.default_next_hop.is_none())
            && self.default_next_hop != Some(src_mac)
            && !self.next_hop_configured()
        {
            self.set_default_next_hop(Some(src_mac));
        }
        Ok(to)
    }

    /// The gateway (and tunnel) for a packet from an initiator, by the
    /// rules (see [`rules`]): find its tunnel, let SPI-range steering have
    /// its say, else open a tunnel or drop as the rule says.
    #[inline]
    pub(super) fn steer_in(
        &mut self,
        ip: &IpPacket,
        now: Timestamp,
    ) -> Result<Steered, DropReason> {
        let rule = Inbound::of(ip).ok_or(DropReason::NotIpsec)?;
        let found = self.table.find(rule.find, &rule.keys);
        if !self.moves.is_idle() {
            if let Some(steered) = self.steer_moving(ip, &rule.keys, found, now)? {
                return Ok(steered);
            }
        }
        let (found, proven) = match &ip.payload {
            Payload::Ike { udp, header, .. } => self.ike_found(ip.src, *udp, header, found)?,
            _ => (found.map(|(id, _)| id), false),
        };
        if let Some(owner) = self.spi_owner(&ip.payload) {
            return self.spi_steered(ip, &rule.keys, found, owner, proven, now);
        }
        let id = match (found, rule.miss) {
            (Some(id), _) => id,
            (None, Miss::Open(placement)) => {
                let key = tunnel_key(ip.src, ip.dst, &rule.keys, &ip.payload);
                self.open(key, placement, now)?
            }
            (None, Miss::Drop(reason)) => return Err(reason),
        };
        Ok(Steered {
            gw: self.live_gateway(id, now)?,
            tunnel: Some(id),
            proven,
        })
    }

    /// IKE from an initiator, as the rules found it. By SPI, so the float
    /// to 4500 and MOBIKE keep the segw; by endpoint, a new IKE SA of a
    /// known peer stays on its segw (and the tunnel takes its SPI).
    /// Returns the tunnel, and whether the frame proves it: it carries the
    /// tunnel's SPI pair, whose responder half only the segw's answer told.
    ///
    /// Only a proof moves a tunnel to a new endpoint. An IKE_SA_INIT needs
    /// nothing but the initiator SPI, which anyone on the path sees: from
    /// another endpoint it is dropped, not a new tunnel, because the SPI
    /// index and the segw's answers (found by SPI) would then mix the two
    /// up. A later message with another responder SPI goes to the tunnel's
    /// segw (which holds the SA and judges it) and moves nothing; when the
    /// segw answers it at the new endpoint, the pair is known and the next
    /// message moves the binding.
    pub(super) fn ike_found(
        &mut self,
        src: IpAddr,
        udp: Udp,
        h: &IkeHeader,
        found: Option<(TunnelId, Find)>,
    ) -> Result<(Option<TunnelId>, bool), DropReason> {
        let (id, proven) = match found {
            None => return Ok((None, false)),
            Some((id, Find::Spi)) => {
                let t = self.table.get(id).expect("found tunnels are live");
                (
                    id,
                    h.responder_spi != 0 && t.responder_spi == Some(h.responder_spi),
                )
            }
            Some((id, _)) => {
                self.table.set_spi(id, h.initiator_spi);
                return Ok((Some(id), false));
            }
        };
        // Its own endpoints: where it is, and where it opened from (a
        // retransmitted IKE_SA_INIT of a new IKE SA, after the float).
        if self.table.by_endpoint(src, udp.src) != Some(id) {
            if h.responder_spi == 0 {
                return Err(DropReason::IkeSpiInUse);
            }
            if !proven {
                self.counters.unproven_moves += 1;
            } else {
                // Another port of its own address may be another tunnel's
                // endpoint: the peer re-established from behind the same
                // NAT, whose mapping the old tunnel had. The port is the new
                // IKE SA's now. From another address, it is never taken:
                // any initiator knows its own SPI pair, and could claim
                // anyone's endpoint with it.
                let same_address = self.table.get(id).is_some_and(|t| t.peer == src);
                if let Ok(Some(evicted)) = self.table.rebind(id, (src, udp.src), same_address) {
                    self.forget(&evicted);
                }
            }
        }
        Ok((Some(id), proven))
    }

    /// The healthy segw whose SPI marks this packet carries, if any segw is
    /// configured for SPI-range steering.
    pub(super) fn spi_owner(&self, payload: &Payload) -> Option<GwId> {
        let owns: &dyn Fn(&SpiSteering) -> bool = match payload {
            Payload::Ike { header, .. } if header.responder_spi != 0 => {
                &|s| s.owns_ike_spi(header.responder_spi)
            }
            Payload::EspInUdp { spi, .. } | Payload::Esp { spi } => &|s| s.owns_esp_spi(*spi),
            _ => return None,
        };
        self.gateways
            .iter()
            .find(|g| g.healthy && owns(&g.spec.steering))
            .map(|g| g.id)
    }

    /// SPI-range steering named `owner`. The initiator side chose the SPI:
    /// it places a tunnel the table has only guessed (or does not know),
    /// and the table follows, so keepalives, fragments and return traffic
    /// agree; a placement the balancer decided or a segw confirmed, on a
    /// segw that is up, overrules it (counted). Never asks the policy.
    pub(super) fn spi_steered(
        &mut self,
        ip: &IpPacket,
        keys: &Keys,
        found: Option<TunnelId>,
        owner: GwId,
        proven: bool,
        now: Timestamp,
    ) -> Result<Steered, DropReason> {
        if let Some(id) = found {
            let t = self.table.get(id).expect("found tunnels are live");
            if !t.placement().is_tentative() && t.gateway != owner {
                if self.is_up(t.gateway) {
                    self.counters.spi_overruled += 1;
                    let gw = t.gateway;
                    return Ok(Steered {
                        gw,
                        tunnel: Some(id),
                        proven,
                    });
                }
                self.move_tunnel(id, owner);
            }
        }
        let key = tunnel_key(ip.src, ip.dst, keys, &ip.payload);
        let tunnel = self.teach(found, key, owner, Evidence::SpiRange, now).ok();
        self.counters.steered += 1;
        Ok(Steered {
            gw: owner,
            tunnel,
            proven,
        })
    }

    /// A new tunnel: the only place the policy is asked. Half-open: only
    /// the initiator side has spoken, and anyone can send that from any
    /// address; its segw's word past IKE_SA_INIT establishes it.
    pub(super) fn open(
        &mut self,
        key: TunnelKey,
        placement: Placement,
        now: Timestamp,
    ) -> Result<TunnelId, DropReason> {
        let gw = self.place(&key, now)?;
        let id = self.insert(Tunnel::new(&key, gw, placement, now))?;
        self.counters.placed += 1;
        if let Some(r) = &mut self.rebalancing {
            // Placed by the new policy, and not visited by the rebalance:
            // the load it places the rest on counts it, or the two fill a
            // gateway past its capacity between them.
            r.fresh.add(gw, 1);
        }
        Ok(id)
    }

    /// Into the table, counted on its gateway (and the half-open tunnel it
    /// evicted, if any, off its own).
    pub(super) fn insert(&mut self, tunnel: Tunnel) -> Result<TunnelId, DropReason> {
        let (gw, holds) = (tunnel.gateway, tunnel.holds_place());
        let (id, evicted) = self.table.insert(tunnel).ok_or(DropReason::TableFull)?;
        if let Some(gone) = evicted {
            self.forget(&gone);
        }
        self.gateway_tunnels(gw, 1, holds);
        Ok(id)
    }

    /// A tunnel the table let go of (evicted or expired): off its gateway.
    pub(super) fn forget(&mut self, gone: &Tunnel) {
        self.gateway_tunnels(gone.gateway, -1, gone.holds_place());
    }

    /// How sure the table is of a tunnel now; a half-open tunnel past the
    /// handshake window that its segw confirms holds a place again.
    pub(super) fn set_placement(&mut self, id: TunnelId, placement: Placement) {
        let Some(t) = self.table.get(id) else { return };
        let (gw, held) = (t.gateway, t.holds_place());
        self.table.set_placement(id, placement);
        if !held && self.table.get(id).is_some_and(Tunnel::holds_place) {
            self.load.add(gw, 1);
        }
    }

    /// The tunnel's gateway, re-placing the tunnel first if that gateway is
    /// down or gone (counted as moved).
    #[inline]
    pub(super) fn live_gateway(
        &mut self,
        id: TunnelId,
        now: Timestamp,
    ) -> Result<GwId, DropReason> {
        let t = self.table.get(id).expect("live tunnel");
        let current = t.gateway;
        if self.is_up(current) {
            return Ok(current);
        }
        let key = key_of(t);
        let gw = self.place(&key, now)?;
        self.move_tunnel(id, gw);
        Ok(gw)
    }

    /// Ask the (guarded) policy where a tunnel goes, on the live load; while
    /// a rebalance is under way, on the load it is placing every tunnel on
    /// (where the tunnels will be when it ends: a gateway it has filled is
    /// full for a newcomer too).
    pub(super) fn place(&mut self, key: &TunnelKey, now: Timestamp) -> Result<GwId, DropReason> {
        let load = match &self.rebalancing {
            Some(r) => &r.fresh,
            None => &self.load,
        };
        match self.policy.choose(key, load, now) {
            Ok(choice) => Ok(choice.gateway),
            Err(Refusal::NoGateway) => Err(DropReason::NoGateway),
            Err(Refusal::Full) => Err(DropReason::AtCapacity),
        }
    }

    /// Move a tunnel by decision (its segw failed or left, a rebalance, an
    /// SPI range, a corrected guess); see [`Placement::moved`].
    pub(super) fn move_tunnel(&mut self, id: TunnelId, to: GwId) {
        let t = self.table.get_mut(id).expect("live tunnel");
        let from = std::mem::replace(&mut t.gateway, to);
        let (placement, holds) = (t.placement().moved(), t.holds_place());
        if from != to {
            // A tunnel that stays where it is keeps what its segw said
            // (a rebalance visits every tunnel: the ones it leaves in
            // place stay confirmed, and on the fast path).
            self.table.set_placement(id, placement);
            self.table.touch(id);
            self.gateway_tunnels(from, -1, holds);
            self.gateway_tunnels(to, 1, holds);
            if let Some(g) = self.gateways.get_mut(to) {
                g.counters.moved_in += 1;
            }
            self.counters.moved += 1;
        }
    }

    /// One more or one fewer tunnel on `gw`; in the policy's load (and
    /// against capacity) only if it `holds` a place there.
    pub(super) fn gateway_tunnels(&mut self, gw: GwId, delta: i64, holds: bool) {
        if holds {
            self.load.add(gw, delta);
        }
        if let Some(g) = self.gateways.get_mut(gw) {
            g.counters.tunnels = g.counters.tunnels.saturating_add_signed(delta);
        }
    }

    #[inline]
    pub(super) fn is_up(&self, gw: GwId) -> bool {
        self.gateways.get(gw).is_some_and(|g| g.healthy)
    }
}
