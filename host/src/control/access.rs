//! Who may use the control socket.
//!
//! Two gates. The socket file's mode: 0600 (the balancer's user only),
//! 0660 and owned by a group when one is named, 0666 when two different
//! groups are (a file has one group; the second gate then decides alone).
//! And on every connection the peer's credentials as the kernel took them
//! when it connected (`SO_PEERCRED`, `SO_PEERGROUPS`; never
//! `/proc/PID/status`, which shows whoever holds that PID now, and only
//! its main thread):
//! - root and the balancer's own user may do anything;
//! - members of `balancer.control_group` may do anything;
//! - members of `balancer.status_group` may ask for status only;
//! - anyone else is refused, told which setting would let them in.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The groups that may use the control socket besides root and the
/// balancer's own user (gids, resolved from names when the config loads).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Groups {
    /// May do anything.
    pub control: Option<u32>,
    /// May ask for status.
    pub status: Option<u32>,
}

/// What a peer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Change,
    Status,
    Nothing,
}

/// A connected client, as the kernel vouches for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, as of its `connect` (`SO_PEERGROUPS`).
    pub groups: Vec<u32>,
}

impl Peer {
    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

impl Groups {
    /// What `peer` may do on a socket served by user `owner`.
    pub fn grant(&self, owner: u32, peer: &Peer) -> Grant {
        if peer.uid == 0 || peer.uid == owner {
            return Grant::Change;
        }
        if self.control.is_some_and(|g| peer.in_group(g)) {
            return Grant::Change;
        }
        if self.status.is_some_and(|g| peer.in_group(g)) {
            return Grant::Status;
        }
        Grant::Nothing
    }

    /// The socket file's mode and group.
    pub fn socket_mode(&self) -> (u32, Option<u32>) {
        match (self.control, self.status) {
            (None, None) => (0o600, None),
            (Some(g), None) | (None, Some(g)) => (0o660, Some(g)),
            (Some(a), Some(b)) if a == b => (0o660, Some(a)),
            (Some(a), Some(_)) => (0o666, Some(a)),
        }
    }

    /// Give the socket file at `path` its mode and group.
    pub fn apply(&self, path: &Path) -> io::Result<()> {
        let (mode, group) = self.socket_mode();
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
}

/// The credentials of the process at the other end of `conn`.
pub fn peer_of(conn: &UnixStream) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        groups: peer_groups(conn)?,
    })
}

/// The supplementary groups of the process at the other end of `conn` when
/// it connected (`SO_PEERGROUPS`, Linux 4.13).
fn peer_groups(conn: &UnixStream) -> io::Result<Vec<u32>> {
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: `groups` is valid for writes of `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                conn.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / GID;
        if r == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // Too small: the kernel said how many there are.
        if e.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() {
            groups.resize(needed, 0);
            continue;
        }
        return Err(e);
    }
}

/// The gid of group `name` (a name in the group database, or a number).
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c = std::ffi::CString::new(name).map_err(|_| format!("`{name}` is not a group name"))?;
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives it.
    let r = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if r != 0 || found.is_null() {
        return Err(format!("no group `{name}` on this machine"));
    }
    Ok(group.gr_gid)
}

/// The balancer's own (effective) user.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_and_the_owner_change_groups_as_configured_others_nothing() {
        let none = Groups::default();
        let both = Groups {
            control: Some(100),
            status: Some(200),
        };
        assert_eq!(none.grant(1000, &peer(0, 0, &[])), Grant::Change);
        assert_eq!(none.grant(1000, &peer(1000, 1000, &[])), Grant::Change);
        assert_eq!(none.grant(1000, &peer(1001, 100, &[])), Grant::Nothing);
        assert_eq!(both.grant(0, &peer(1001, 100, &[])), Grant::Change);
        assert_eq!(both.grant(0, &peer(1001, 5, &[7, 100])), Grant::Change);
        assert_eq!(both.grant(0, &peer(1001, 200, &[])), Grant::Status);
        assert_eq!(both.grant(0, &peer(1001, 5, &[200, 9])), Grant::Status);
        assert_eq!(both.grant(0, &peer(1001, 5, &[6])), Grant::Nothing);
    }

    #[test]
    fn the_socket_mode_opens_only_what_a_group_needs() {
        assert_eq!(Groups::default().socket_mode(), (0o600, None));
        let c = Groups {
            control: Some(5),
            status: None,
        };
        assert_eq!(c.socket_mode(), (0o660, Some(5)));
        let s = Groups {
            control: None,
            status: Some(6),
        };
        assert_eq!(s.socket_mode(), (0o660, Some(6)));
        let both = Groups {
            control: Some(5),
            status: Some(6),
        };
        assert_eq!(both.socket_mode(), (0o666, Some(5)));
    }

    #[test]
    fn groups_by_name_or_number_and_the_peers_from_the_kernel() {
        assert_eq!(group_id("0"), Ok(0));
        assert_eq!(group_id("root"), Ok(0));
        assert!(group_id("no-such-group-segwlb")
            .unwrap_err()
            .contains("no group"));
        let (a, _b) = UnixStream::pair().unwrap();
        let me = peer_of(&a).unwrap();
        assert_eq!(me.uid, own_uid());
        assert_eq!(me.pid as u32, std::process::id());
        // SAFETY: buffers sized by the first call.
        let mine = unsafe {
            let n = libc::getgroups(0, std::ptr::null_mut());
            let mut g = vec![0; n.max(0) as usize];
            libc::getgroups(n, g.as_mut_ptr());
            g
        };
        assert_eq!(me.groups, mine);
    }
}
