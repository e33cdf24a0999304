//! Classic pcap files (what `tcpdump -w` writes): the strongSwan captures
//! the tests replay, and seeds for the fuzzer. Reading only.

use std::time::Duration;

/// One captured frame and when it was captured (since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub at: Duration,
    pub frame: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PcapError {
    #[error("not a pcap file (magic {0:#010x})")]
    Magic(u32),
    #[error("link type {0}, not Ethernet (1)")]
    LinkType(u32),
    #[error("record {record} at byte {at} runs past the end of the file")]
    Truncated { record: usize, at: usize },
}

/// Every frame of an Ethernet capture, in either byte order, with micro- or
/// nanosecond timestamps.
pub fn read(data: &[u8]) -> Result<Vec<Record>, PcapError> {
    let magic = u32_at(data, 0, false).ok_or(PcapError::Magic(0))?;
    let (big_endian, nanos) = match magic {
        0xa1b2_c3d4 => (false, false),
        0xa1b2_3c4d => (false, true),
        0xd4c3_b2a1 => (true, false),
        0x4d3c_b2a1 => (true, true),
        other => return Err(PcapError::Magic(other)),
    };
    let link = u32_at(data, 20, big_endian).ok_or(PcapError::Magic(magic))?;
    if link != 1 {
        return Err(PcapError::LinkType(link));
    }
    let mut records = Vec::new();
    let mut at = 24;
    while at < data.len() {
        let truncated = PcapError::Truncated {
            record: records.len() + 1,
            at,
        };
        let field = |i: usize| u32_at(data, at + 4 * i, big_endian);
        let (Some(secs), Some(frac), Some(len)) = (field(0), field(1), field(2)) else {
            return Err(truncated);
        };
        let start = at + 16;
        let frame = data
            .get(start..start + len as usize)
            .ok_or(truncated)?
            .to_vec();
        let frac = if nanos {
            Duration::from_nanos(u64::from(frac))
        } else {
            Duration::from_micros(u64::from(frac))
        };
        records.push(Record {
            at: Duration::from_secs(u64::from(secs)) + frac,
            frame,
        });
        at = start + len as usize;
    }
    Ok(records)
}

fn u32_at(data: &[u8], at: usize, big_endian: bool) -> Option<u32> {
    let b: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
    Some(if big_endian {
        u32::from_be_bytes(b)
    } else {
        u32::from_le_bytes(b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(records: &[(u32, u32, &[u8])]) -> Vec<u8> {
        let mut f = Vec::new();
        for v in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 65535, 1] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        for (s, us, frame) in records {
            for v in [*s, *us, frame.len() as u32, frame.len() as u32] {
                f.extend_from_slice(&v.to_le_bytes());
            }
            f.extend_from_slice(frame);
        }
        f
    }

    #[test]
    fn reads_frames_and_times() {
        let r = read(&file(&[(1, 500, &[1, 2, 3]), (2, 0, &[4])])).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].at, Duration::from_micros(1_000_500));
        assert_eq!(r[1].frame, [4]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        assert_eq!(read(b"GIF89a"), Err(PcapError::Magic(0x3846_4947)));
        let mut f = file(&[(1, 0, &[1, 2, 3])]);
        f.truncate(f.len() - 1);
        assert_eq!(read(&f), Err(PcapError::Truncated { record: 1, at: 24 }));
        let mut f = file(&[]);
        f[20] = 113;
        assert_eq!(read(&f), Err(PcapError::LinkType(113)));
    }
}
