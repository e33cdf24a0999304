//! The sync link's bytes: a handshake that proves both ends hold the
//! pair's key and agrees a key for this connection, then frames, each
//! numbered and sealed.
//!
//! ```text
//! handshake  standby → active   MAGIC | nonce_s (16)
//!            active → standby   MAGIC | nonce_a (16) | HMAC(key, "active" | nonce_s | nonce_a)
//!            standby → active   HMAC(key, "standby" | nonce_a | nonce_s)
//! session    HMAC(key, "session" | nonce_s | nonce_a)
//! frame      len (u32, bytes after it) | seq (u64) | kind (u8) | sent_us (u64) | payload | tag (32)
//! tag        HMAC(session, direction | seq | kind | sent_us | payload)
//! ```
//!
//! Each side picks a fresh nonce, so a recorded connection cannot be
//! replayed into a new one; within a connection a frame must carry the
//! next sequence number, so none can be dropped, repeated or reordered
//! unseen; the direction byte keeps a frame from being reflected back.
//! A frame that fails any of these ends the connection (the standby then
//! connects again and takes the whole table afresh). Integers are
//! big-endian. Pure: bytes in, bytes or an error naming what was wrong out.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::balancer::replica::Delta;

/// The first bytes each side sends: the protocol and its version.
pub const MAGIC: &[u8; 12] = b"segwlb-pair1";
pub const NONCE: usize = 16;
pub const TAG: usize = 32;
/// seq, kind, sent_us.
const HEADER: usize = 8 + 1 + 8;
/// The largest frame accepted (a snapshot slice is far smaller); a length
/// above it is refused before anything is read or allocated.
pub const MAX_FRAME: usize = 8 << 20;
/// The shortest key accepted in the config.
pub const MIN_KEY: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// Who sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The active's table changes.
    ToStandby,
    /// The standby's acknowledgements.
    ToActive,
}

impl Direction {
    fn byte(self) -> u8 {
        match self {
            Direction::ToStandby => b'S',
            Direction::ToActive => b'A',
        }
    }
}

/// What a frame says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A whole copy of the table follows: the standby drops what it has.
    SnapshotBegin,
    /// Changes (or a snapshot slice), in order.
    Deltas(Vec<Delta>),
    /// The copy is whole: the standby is in sync from here.
    SnapshotEnd,
    /// Nothing changed lately; the link is alive.
    Heartbeat,
    /// (To the active) every frame up to this sequence number is applied.
    Ack(u64),
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::SnapshotBegin => 1,
            Message::Deltas(_) => 2,
            Message::SnapshotEnd => 3,
            Message::Heartbeat => 4,
            Message::Ack(_) => 5,
        }
    }
}

/// A frame that is refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a segwlb pair peer (its first bytes are not `segwlb-pair1`)")]
    Magic,
    #[error("the peer does not hold the pair's key (its handshake proof is wrong)")]
    Proof,
    #[error("frame of {0} bytes: more than the {MAX_FRAME} accepted")]
    TooLong(usize),
    #[error("frame of {0} bytes: shorter than a header and a tag")]
    TooShort(usize),
    #[error("frame {seq}: its tag is wrong (forged or damaged)")]
    Tag { seq: u64 },
    #[error("frame {got} where {expected} was next")]
    Sequence { expected: u64, got: u64 },
    #[error("frame {seq}: unknown kind {kind}")]
    Kind { seq: u64, kind: u8 },
    #[error("frame {seq}: {why}")]
    Payload { seq: u64, why: String },
}

fn mac_of(key: &[u8], parts: &[&[u8]]) -> [u8; TAG] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    for p in parts {
        m.update(p);
    }
    // Constant time: a tag is not guessed a byte at a time.
    m.verify_slice(tag).is_ok()
}

/// The standby's first words.
pub fn hello(nonce_s: &[u8; NONCE]) -> Vec<u8> {
    [&MAGIC[..], nonce_s].concat()
}

/// The standby's nonce, from its first words.
pub fn read_hello(bytes: &[u8; MAGIC.len() + NONCE]) -> Result<[u8; NONCE], WireError> {
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(WireError::Magic);
    }
    Ok(bytes[MAGIC.len()..].try_into().expect("NONCE bytes"))
}

/// The active's answer: its nonce and its proof that it holds `key`.
pub fn answer(key: &[u8], nonce_s: &[u8; NONCE], nonce_a: &[u8; NONCE]) -> Vec<u8> {
    let proof = mac_of(key, &[b"active", nonce_s, nonce_a]);
    [&MAGIC[..], nonce_a, &proof].concat()
}

/// The standby checks the active's answer: the active's nonce.
pub fn read_answer(
    key: &[u8],
    nonce_s: &[u8; NONCE],
    bytes: &[u8; MAGIC.len() + NONCE + TAG],
) -> Result<[u8; NONCE], WireError> {
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(WireError::Magic);
    }
    let nonce_a: [u8; NONCE] = bytes[MAGIC.len()..MAGIC.len() + NONCE]
        .try_into()
        .expect("NONCE bytes");
    let proof = &bytes[MAGIC.len() + NONCE..];
    if !verify(key, &[b"active", nonce_s, &nonce_a], proof) {
        return Err(WireError::Proof);
    }
    Ok(nonce_a)
}

/// The standby's proof that it holds `key`.
pub fn proof(key: &[u8], nonce_s: &[u8; NONCE], nonce_a: &[u8; NONCE]) -> [u8; TAG] {
    mac_of(key, &[b"standby", nonce_a, nonce_s])
}

/// The active checks the standby's proof.
pub fn check_proof(
    key: &[u8],
    nonce_s: &[u8; NONCE],
    nonce_a: &[u8; NONCE],
    proof: &[u8; TAG],
) -> Result<(), WireError> {
    if verify(key, &[b"standby", nonce_a, nonce_s], proof) {
        Ok(())
    } else {
        Err(WireError::Proof)
    }
}

/// This connection's key, which both ends derive once the proofs are in.
pub fn session_key(key: &[u8], nonce_s: &[u8; NONCE], nonce_a: &[u8; NONCE]) -> [u8; TAG] {
    mac_of(key, &[b"session", nonce_s, nonce_a])
}

/// A frame of `message`, numbered `seq`, sent at `sent_us` (the sender's
/// wall clock, µs since the Unix epoch: the standby measures its lag by it).
pub fn seal(
    session: &[u8; TAG],
    dir: Direction,
    seq: u64,
    sent_us: u64,
    message: &Message,
) -> Vec<u8> {
    let payload = match message {
        Message::Deltas(d) => serde_json::to_vec(d).expect("deltas serialise"),
        Message::Ack(seq) => seq.to_be_bytes().to_vec(),
        Message::SnapshotBegin | Message::SnapshotEnd | Message::Heartbeat => Vec::new(),
    };
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(&seq.to_be_bytes());
    header[8] = message.kind();
    header[9..].copy_from_slice(&sent_us.to_be_bytes());
    let tag = mac_of(session, &[&[dir.byte()], &header, &payload]);
    let len = HEADER + payload.len() + TAG;
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&payload);
    out.extend_from_slice(&tag);
    out
}

/// The length a frame's first four bytes announce, if it is one accepted.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLong(len));
    }
    if len < HEADER + TAG {
        return Err(WireError::TooShort(len));
    }
    Ok(len)
}

/// A frame's bytes after its length: its sequence number, send time and
/// message, if its tag is right and it is the `expected` one.
pub fn open(
    session: &[u8; TAG],
    dir: Direction,
    expected: u64,
    frame: &[u8],
) -> Result<(u64, Message), WireError> {
    if frame.len() < HEADER + TAG {
        return Err(WireError::TooShort(frame.len()));
    }
    let (body, tag) = frame.split_at(frame.len() - TAG);
    let (header, payload) = body.split_at(HEADER);
    let seq = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
    if !verify(session, &[&[dir.byte()], header, payload], tag) {
        return Err(WireError::Tag { seq });
    }
    if seq != expected {
        return Err(WireError::Sequence { expected, got: seq });
    }
    let sent_us = u64::from_be_bytes(header[9..].try_into().expect("8 bytes"));
    let bad = |why: String| WireError::Payload { seq, why };
    let message = match header[8] {
        1 => Message::SnapshotBegin,
        2 => Message::Deltas(serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))?),
        3 => Message::SnapshotEnd,
        4 => Message::Heartbeat,
        5 => Message::Ack(u64::from_be_bytes(
            payload
                .try_into()
                .map_err(|_| bad(format!("an ack of {} bytes", payload.len())))?,
        )),
        kind => return Err(WireError::Kind { seq, kind }),
    };
    Ok((sent_us, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"the pair's shared key";

    fn session() -> [u8; TAG] {
        session_key(KEY, &[1; NONCE], &[2; NONCE])
    }

    fn body(frame: &[u8]) -> &[u8] {
        let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        &frame[4..]
    }

    #[test]
    fn a_sealed_frame_opens_as_itself_in_its_direction_and_order() {
        let s = session();
        let m = Message::Deltas(vec![Delta::Gone { slot: 7 }]);
        let f = seal(&s, Direction::ToStandby, 3, 42, &m);
        assert_eq!(open(&s, Direction::ToStandby, 3, body(&f)), Ok((42, m)));
        let ack = seal(&s, Direction::ToActive, 1, 5, &Message::Ack(99));
        assert_eq!(
            open(&s, Direction::ToActive, 1, body(&ack)),
            Ok((5, Message::Ack(99)))
        );
    }

    #[test]
    fn a_changed_reflected_replayed_or_foreign_frame_is_refused() {
        let s = session();
        let m = Message::Deltas(vec![Delta::Gone { slot: 7 }]);
        let f = seal(&s, Direction::ToStandby, 3, 42, &m);
        // One bit of the payload changed.
        let mut changed = body(&f).to_vec();
        changed[HEADER + 2] ^= 1;
        assert_eq!(
            open(&s, Direction::ToStandby, 3, &changed),
            Err(WireError::Tag { seq: 3 })
        );
        // Sent back the other way.
        assert_eq!(
            open(&s, Direction::ToActive, 3, body(&f)),
            Err(WireError::Tag { seq: 3 })
        );
        // Out of order, or again.
        assert_eq!(
            open(&s, Direction::ToStandby, 4, body(&f)),
            Err(WireError::Sequence {
                expected: 4,
                got: 3
            })
        );
        // From another connection (other nonces).
        let other = session_key(KEY, &[1; NONCE], &[3; NONCE]);
        assert_eq!(
            open(&other, Direction::ToStandby, 3, body(&f)),
            Err(WireError::Tag { seq: 3 })
        );
    }

    #[test]
    fn the_handshake_proves_the_key_both_ways() {
        let (ns, na) = ([7; NONCE], [9; NONCE]);
        let hello = hello(&ns);
        assert_eq!(read_hello(hello.as_slice().try_into().unwrap()), Ok(ns));
        let a = answer(KEY, &ns, &na);
        assert_eq!(
            read_answer(KEY, &ns, a.as_slice().try_into().unwrap()),
            Ok(na)
        );
        assert_eq!(
            read_answer(
                b"another key of the pair",
                &ns,
                a.as_slice().try_into().unwrap()
            ),
            Err(WireError::Proof)
        );
        let p = proof(KEY, &ns, &na);
        assert_eq!(check_proof(KEY, &ns, &na, &p), Ok(()));
        assert_eq!(
            check_proof(b"another key of the pair", &ns, &na, &p),
            Err(WireError::Proof)
        );
        // The active's answer is no standby's proof.
        let reflected: [u8; TAG] = a[MAGIC.len() + NONCE..].try_into().unwrap();
        assert_eq!(
            check_proof(KEY, &ns, &na, &reflected),
            Err(WireError::Proof)
        );
    }

    #[test]
    fn lengths_past_the_bound_are_refused_before_reading() {
        assert_eq!(
            frame_len(((MAX_FRAME + 1) as u32).to_be_bytes()),
            Err(WireError::TooLong(MAX_FRAME + 1))
        );
        assert_eq!(frame_len(3u32.to_be_bytes()), Err(WireError::TooShort(3)));
    }
}
