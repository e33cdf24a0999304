//! The affinity rules of DESIGN.md as one table: for each kind of frame,
//! the keys its tunnel is looked up by (in order) and what a miss does;
//! for each tunnel, how sure the table is of its segw and what evidence may
//! change that.
//!
//! | frame                   | from an initiator: found by   | miss          | from a segw: found by |
//! |-------------------------|-------------------------------|---------------|-----------------------|
//! | IKE (500, 4500)         | IKE SPI, endpoint             | a new tunnel  | IKE SPI, endpoint     |
//! | ESP in UDP              | endpoint, sole at address     | a new tunnel  | endpoint              |
//! | NAT keepalive           | endpoint, sole at address     | dropped       | endpoint              |
//! | raw ESP                 | address                       | a new tunnel  | address               |
//! | later fragment¹         | sole at address               | dropped       | address²              |
//! | ICMP error quoting UDP  | endpoint, sole at address     | dropped       | address²              |
//! | ICMP error quoting ESP  | address                       | dropped       | address²              |
//!
//! ¹ only when the fragment hold is full: a later fragment follows its first
//! (see `fragments`). ² for the next hop only: it teaches nothing.
//!
//! "Endpoint" is (address, UDP port): the tunnel's own, or the one it opened
//! from. "Sole at address": the address alone, when it holds exactly one
//! tunnel; behind a NAT it holds many, and guessing among them would send
//! one peer's packets to another's segw. "Address": the newest tunnel a segw
//! has spoken for there, else the newest there (raw ESP has no ports: one
//! address, one peer).
//!
//! Then SPI-range steering (a segw's configured SPI range, `SpiSteering`)
//! may name the segw, and evidence may move the tunnel: see
//! [`Placement::is_tentative`].

use crate::packet::ike::IKE_SA_INIT;
use crate::packet::{IpPacket, Payload};

use super::DropReason;

/// How sure the table is of a tunnel's segw, and who said so: weakest
/// first. The first four are *half-open* (no segw has spoken for a tunnel
/// that works yet: evicted first when the table is full, forgotten sooner),
/// the last two *established*.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Placement {
    /// Placed by the policy from traffic that does not open a tunnel (ESP,
    /// IKE past IKE_SA_INIT): what a fresh balancer does for a tunnel it has
    /// not seen. Anyone can send that from any address.
    Guessed,
    /// The initiator used an SPI from a segw's configured range. The
    /// initiator side chose the SPI, so it is no stronger than a guess.
    SpiRange,
    /// Placed by the policy for an IKE_SA_INIT: the balancer's decision,
    /// waiting for its segw's answer.
    Opened,
    /// Its segw answered the IKE_SA_INIT with an IKE SA of its own (a
    /// responder SPI). That answer goes to whatever address the request
    /// came from, so a spoofed source gets one too: still half-open, but
    /// evicted after the entries no segw answered. The initiator's next
    /// exchange, which only a peer that received the answer can make,
    /// brings the segw's word that confirms it.
    Answered,
    /// A working tunnel the balancer moved (its segw failed or left, a
    /// rebalance); its new segw has not spoken yet.
    Moved,
    /// Its segw has sent to the peer.
    Confirmed,
}

/// What says a tunnel is on a segw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// The segw sent the peer IKE past IKE_SA_INIT, or ESP: it holds a
    /// tunnel that works.
    SegwSpoke,
    /// The segw answered an IKE_SA_INIT with a responder SPI: it opened
    /// an IKE SA for whoever the request named as its source.
    SegwAnswered,
    /// A packet from the initiator side carried an SPI from the segw's
    /// configured range.
    SpiRange,
}

impl Placement {
    pub fn is_established(self) -> bool {
        self >= Placement::Moved
    }

    /// Whether evidence for *another* segw (its own frame to the peer, or
    /// an SPI from its range) moves a tunnel placed like this. A segw's
    /// word outranks an SPI range, which is worth a guess; nothing moves
    /// the balancer's own decisions (a new tunnel's placement, a
    /// re-placement, a rebalance) or what a segw confirmed. Against those,
    /// a segw's frame is a counted conflict (a segw the tunnel was moved
    /// away from, still talking: its frame reaches the peer, the tunnel
    /// stays) and an SPI range is overruled by the table (counted).
    ///
    /// | placement            | a segw spoke | an SPI range   |
    /// |----------------------|--------------|----------------|
    /// | guessed, SPI range   | moves it     | moves it       |
    /// | opened, moved        | conflict     | table wins     |
    /// | confirmed            | conflict     | table wins     |
    pub fn is_tentative(self) -> bool {
        self <= Placement::SpiRange
    }

    /// Where evidence for the tunnel's own segw leaves it.
    pub fn confirmed_by(self, evidence: Evidence) -> Placement {
        match evidence {
            Evidence::SegwSpoke => Placement::Confirmed,
            Evidence::SegwAnswered => self.max(Placement::Answered),
            Evidence::SpiRange => self.max(Placement::SpiRange),
        }
    }

    /// Where a move by decision (failure, removal, rebalance) leaves it: a
    /// working tunnel is still one; a half-open one is still as unsure.
    pub fn moved(self) -> Placement {
        if self.is_established() {
            Placement::Moved
        } else {
            self
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Guessed => "guessed",
            Placement::SpiRange => "spi-range",
            Placement::Opened => "opened",
            Placement::Answered => "answered",
            Placement::Moved => "moved",
            Placement::Confirmed => "confirmed",
        }
    }
}

/// One way of finding a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Find {
    /// By the IKE initiator SPI.
    Spi,
    /// By (address, UDP port): where the tunnel is, or where it opened.
    Endpoint,
    /// By the address, when exactly one tunnel is there.
    SoleAtAddress,
    /// By the address: the newest established tunnel there, else the
    /// newest.
    Address,
}

/// The keys a frame carries, for [`Find`].
#[derive(Debug, Clone, Copy)]
pub struct Keys {
    pub spi: Option<u64>,
    pub addr: std::net::IpAddr,
    pub port: Option<u16>,
}

/// What a frame from the initiator side that finds no tunnel does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// Ask the policy: a new tunnel, placed so.
    Open(Placement),
    Drop(DropReason),
}

/// The rule for a frame from the initiator side.
#[derive(Debug, Clone, Copy)]
pub struct Inbound {
    pub find: &'static [Find],
    pub keys: Keys,
    pub miss: Miss,
}

const IKE: &[Find] = &[Find::Spi, Find::Endpoint];
const UDP: &[Find] = &[Find::Endpoint, Find::SoleAtAddress];
const ADDRESS: &[Find] = &[Find::Address];
const SOLE: &[Find] = &[Find::SoleAtAddress];
const ENDPOINT: &[Find] = &[Find::Endpoint];

impl Inbound {
    /// The rule for a packet from an initiator; `None` when it is not IPsec
    /// (nor an ICMP error about it).
    pub fn of(ip: &IpPacket) -> Option<Inbound> {
        let keys = |spi, port| Keys {
            spi,
            addr: ip.src,
            port,
        };
        let unknown = Miss::Drop(DropReason::UnknownTunnel);
        let rule = |find, keys, miss| Some(Inbound { find, keys, miss });
        match &ip.payload {
            Payload::Ike { udp, header, .. } => {
                // Only an IKE_SA_INIT opens a tunnel: anything else is a
                // tunnel this balancer has not seen, placed by guess.
                let opened = if header.is_sa_init_request() {
                    Placement::Opened
                } else {
                    Placement::Guessed
                };
                let keys = keys(Some(header.initiator_spi), Some(udp.src));
                rule(IKE, keys, Miss::Open(opened))
            }
            Payload::EspInUdp { udp, .. } => rule(
                UDP,
                keys(None, Some(udp.src)),
                Miss::Open(Placement::Guessed),
            ),
            Payload::NatKeepalive { udp } => rule(UDP, keys(None, Some(udp.src)), unknown),
            Payload::Esp { .. } => rule(ADDRESS, keys(None, None), Miss::Open(Placement::Guessed)),
            Payload::LaterFragment { .. } => rule(
                SOLE,
                keys(None, None),
                Miss::Drop(DropReason::FragmentHoldFull),
            ),
            // An ICMP error about a segw's packet to a peer: the peer's tunnel.
            Payload::IcmpError { quoted: Some(q) } => {
                let keys = Keys {
                    spi: None,
                    addr: q.dst,
                    port: q.udp.map(|u| u.dst),
                };
                rule(if q.udp.is_some() { UDP } else { ADDRESS }, keys, unknown)
            }
            Payload::IcmpError { quoted: None }
            | Payload::NeighborSolicit(_)
            | Payload::OtherUdp { .. }
            | Payload::Other { .. } => None,
        }
    }
}

/// The rule for a packet from a segw to a peer: where its tunnel is found,
/// and what the packet is evidence of (`teaches`), if anything, beyond the
/// next hop it finds.
#[derive(Debug, Clone, Copy)]
pub struct Outbound {
    pub find: &'static [Find],
    pub keys: Keys,
    pub teaches: Option<Evidence>,
}

impl Outbound {
    pub fn of(ip: &IpPacket) -> Outbound {
        let spoke = Some(Evidence::SegwSpoke);
        let (find, spi, port, teaches) = match &ip.payload {
            Payload::Ike { udp, header, .. } => {
                let teaches = match (header.exchange, header.responder_spi) {
                    (IKE_SA_INIT, 0) => None, // a COOKIE or an error: no IKE SA
                    (IKE_SA_INIT, _) => Some(Evidence::SegwAnswered),
                    _ => spoke,
                };
                (IKE, Some(header.initiator_spi), Some(udp.dst), teaches)
            }
            // Exact endpoint only: behind a NAT, the address holds many.
            Payload::EspInUdp { udp, .. } | Payload::NatKeepalive { udp } => {
                (ENDPOINT, None, Some(udp.dst), spoke)
            }
            Payload::Esp { .. } => (ADDRESS, None, None, spoke),
            // Fragments, ICMP and the rest: the next hop, nothing taught.
            _ => (ADDRESS, None, None, None),
        };
        Outbound {
            find,
            keys: Keys {
                spi,
                addr: ip.dst,
                port,
            },
            teaches,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_moves_a_guess_and_an_spi_range_never_a_decision_or_a_segws_word() {
        use Placement::*;
        for p in [Guessed, SpiRange] {
            assert!(p.is_tentative() && !p.is_established());
        }
        for p in [Opened, Answered, Moved, Confirmed] {
            assert!(!p.is_tentative());
        }
        assert!(!Opened.is_established() && !Answered.is_established());
        assert!(Moved.is_established() && Confirmed.is_established());
        assert_eq!(Guessed.confirmed_by(Evidence::SpiRange), SpiRange);
        assert_eq!(Opened.confirmed_by(Evidence::SpiRange), Opened);
        assert_eq!(Guessed.confirmed_by(Evidence::SegwSpoke), Confirmed);
        assert_eq!(Guessed.confirmed_by(Evidence::SegwAnswered), Answered);
        assert_eq!(Opened.confirmed_by(Evidence::SegwAnswered), Answered);
        assert_eq!(Moved.confirmed_by(Evidence::SegwAnswered), Moved);
        assert_eq!(Answered.confirmed_by(Evidence::SegwSpoke), Confirmed);
        assert_eq!(Confirmed.moved(), Moved);
        assert_eq!(Opened.moved(), Opened);
    }
}
