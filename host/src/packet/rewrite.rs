//! The only change segwlb makes to a forwarded frame.

use super::Mac;

/// Set the Ethernet destination and source in place. Everything from byte
/// 12 on (VLAN tag, IP and above) stays as it came: that is what
/// "transparent" means.
pub fn set_macs(frame: &mut [u8], dst: Mac, src: Mac) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
}
