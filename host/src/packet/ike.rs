//! The IKEv2 header (RFC 7296 §3.1): what affinity needs of it.

/// IKE_SA_INIT: the exchange that opens an IKE SA.
pub const IKE_SA_INIT: u8 = 34;
pub const IKE_AUTH: u8 = 35;
pub const CREATE_CHILD_SA: u8 = 36;
pub const INFORMATIONAL: u8 = 37;

const FLAG_INITIATOR: u8 = 0x08;
const FLAG_RESPONSE: u8 = 0x20;

/// The fixed 28-byte IKE header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IkeHeader {
    pub initiator_spi: u64,
    /// 0 in the first IKE_SA_INIT request.
    pub responder_spi: u64,
    pub exchange: u8,
    /// Sent by the original initiator of the IKE SA.
    pub from_initiator: bool,
    pub response: bool,
    pub message_id: u32,
}

impl IkeHeader {
    pub const LEN: usize = 28;

    pub fn parse(b: &[u8]) -> Option<IkeHeader> {
        let b = b.get(..Self::LEN)?;
        let u64_at = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let flags = b[19];
        Some(IkeHeader {
            initiator_spi: u64_at(0),
            responder_spi: u64_at(8),
            exchange: b[18],
            from_initiator: flags & FLAG_INITIATOR != 0,
            response: flags & FLAG_RESPONSE != 0,
            message_id: u32::from_be_bytes(b[20..24].try_into().expect("4 bytes")),
        })
    }

    /// The first message of a new IKE SA: nobody has answered it yet.
    pub fn is_sa_init_request(&self) -> bool {
        self.exchange == IKE_SA_INIT && !self.response && self.responder_spi == 0
    }
}
