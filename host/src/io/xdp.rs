//! The XDP fast path at the edge: the kernel program (`host/xdp/fastpath.c`,
//! built by `build.rs` with clang) loaded through aya, its maps written
//! from [`Balancer::fast_path`](crate::balancer::Balancer::fast_path), its
//! per-tunnel counters read back, and `BPF_PROG_TEST_RUN` for the
//! differential tests.
//!
//! The maps' layouts are the C structs', field for field (`#[repr(C)]`).
//! Addresses are 16 bytes, IPv4 mapped into `::ffff:0:0/96`; ports are in
//! network order, as the program reads them from the packet.

use std::collections::HashMap;
use std::net::IpAddr;

use aya::maps::{Array, DevMap, HashMap as BpfHashMap, Map};
use aya::programs::Xdp;
use aya::{Ebpf, Pod};

use crate::balancer::fastpath::{Direction, FastEntry};
use crate::balancer::PortId;
use crate::packet::Mac;

/// The program, when this build has one (clang and libbpf-dev were there).
#[cfg(segwlb_xdp)]
// Aligned: the ELF parser reads its headers in place.
pub const PROGRAM: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/fastpath.o"
)));
#[cfg(not(segwlb_xdp))]
pub const PROGRAM: Option<&[u8]> = None;

const PROGRAM_NAME: &str = "segwlb_fastpath";

/// `XDP_PASS` and `XDP_REDIRECT`, the program's only answers.
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;

/// `struct endpoint`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Endpoint {
    addr: [u8; 16],
    port: u16,
    pad: u16,
}

/// `struct forward`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Forward {
    ike_spi: u64,
    tunnel: u32,
    tx: u32,
    from: u32,
    dst: Mac,
    src: Mac,
    pad: u32,
}

/// `struct port_mac`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PortMac {
    mac: Mac,
    pad: u16,
}

// SAFETY: plain #[repr(C)] data with every padding byte a named field, so
// any bit pattern is valid and none is uninitialised.
unsafe impl Pod for Endpoint {}
unsafe impl Pod for Forward {}
unsafe impl Pod for PortMac {}

impl Endpoint {
    fn of(addr: IpAddr, port: u16) -> Self {
        let addr = match addr {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        Endpoint {
            addr,
            port: port.to_be(),
            pad: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("this segwlb was built without its XDP program (clang and libbpf-dev were missing)")]
    NotBuilt,
    #[error("loading the XDP program: {0}")]
    Load(String),
    #[error("the fast path's map {map}: {message}")]
    Map { map: &'static str, message: String },
    #[error("port {0} has no interface in the fast path")]
    UnknownPort(PortId),
}

fn map_err<E: std::fmt::Display>(map: &'static str) -> impl Fn(E) -> XdpError {
    move |e| XdpError::Map {
        map,
        message: e.to_string(),
    }
}

/// The loaded program and what its maps hold.
pub struct FastPath {
    ebpf: Ebpf,
    /// Port id → (ifindex, the port's MAC).
    ports: HashMap<PortId, (u32, Mac)>,
    /// What `up` and `down` hold now, to write only the difference.
    installed: HashMap<(Direction, Endpoint), Forward>,
}

/// `union bpf_attr`'s `test` member, for `BPF_PROG_TEST_RUN`.
#[repr(C)]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

/// What a [`FastPath::sync`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Synced {
    pub written: usize,
    pub removed: usize,
}

impl FastPath {
    /// Load the program into the kernel (not attached anywhere yet).
    pub fn load() -> Result<Self, XdpError> {
        let bytes = PROGRAM.ok_or(XdpError::NotBuilt)?;
        let mut ebpf = Ebpf::load(bytes).map_err(|e| XdpError::Load(e.to_string()))?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| XdpError::Load(format!("no program {PROGRAM_NAME}")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| XdpError::Load(e.to_string()))?;
        program
            .load()
            .map_err(|e| XdpError::Load(format!("{e}: {:?}", std::error::Error::source(&e))))?;
        Ok(FastPath {
            ebpf,
            ports: HashMap::new(),
            installed: HashMap::new(),
        })
    }

    fn map(&mut self, name: &'static str) -> Result<&mut Map, XdpError> {
        self.ebpf.map_mut(name).ok_or(XdpError::Map {
            map: name,
            message: "not in the program".into(),
        })
    }

    /// Port `port` is interface `ifindex` with MAC `mac` (the uplink is
    /// port 0). Frames to another MAC are never forwarded.
    pub fn set_port(&mut self, port: PortId, ifindex: u32, mac: Mac) -> Result<(), XdpError> {
        if port == crate::balancer::UPLINK {
            let mut config: Array<_, u32> =
                Array::try_from(self.map("config")?).map_err(map_err("config"))?;
            config.set(0, ifindex, 0).map_err(map_err("config"))?;
        }
        let mut macs: BpfHashMap<_, u32, PortMac> =
            BpfHashMap::try_from(self.map("port_macs")?).map_err(map_err("port_macs"))?;
        macs.insert(ifindex, PortMac { mac, pad: 0 }, 0)
            .map_err(map_err("port_macs"))?;
        let mut tx: DevMap<_> =
            DevMap::try_from(self.map("tx_ports")?).map_err(map_err("tx_ports"))?;
        tx.set(u32::from(port), ifindex, None, 0)
            .map_err(map_err("tx_ports"))?;
        self.ports.insert(port, (ifindex, mac));
        Ok(())
    }

    /// Make the maps hold exactly `entries`: write what is new or changed,
    /// remove what is gone.
    pub fn sync(&mut self, entries: &[FastEntry]) -> Result<Synced, XdpError> {
        let mut want: HashMap<(Direction, Endpoint), Forward> =
            HashMap::with_capacity(entries.len());
        for e in entries {
            let from = self
                .ports
                .get(&e.ingress)
                .ok_or(XdpError::UnknownPort(e.ingress))?
                .0;
            if !self.ports.contains_key(&e.egress) {
                return Err(XdpError::UnknownPort(e.egress));
            }
            let forward = Forward {
                ike_spi: 0,
                tunnel: e.tunnel,
                tx: u32::from(e.egress),
                from,
                dst: e.dst,
                src: e.src,
                pad: 0,
            };
            want.insert((e.direction, Endpoint::of(e.addr, e.port)), forward);
        }
        let mut synced = Synced::default();
        for direction in [Direction::Up, Direction::Down] {
            let name = match direction {
                Direction::Up => "up",
                Direction::Down => "down",
            };
            let gone: Vec<Endpoint> = self
                .installed
                .keys()
                .filter(|(d, key)| *d == direction && !want.contains_key(&(*d, *key)))
                .map(|(_, key)| *key)
                .collect();
            let changed: Vec<(Endpoint, Forward)> = want
                .iter()
                .filter(|((d, key), f)| {
                    *d == direction && self.installed.get(&(*d, *key)) != Some(*f)
                })
                .map(|((_, key), f)| (*key, *f))
                .collect();
            let mut map: BpfHashMap<_, Endpoint, Forward> =
                BpfHashMap::try_from(self.map(name)?).map_err(map_err(name))?;
            for key in &gone {
                map.remove(key).map_err(map_err(name))?;
            }
            for (key, f) in &changed {
                map.insert(key, f, 0).map_err(map_err(name))?;
            }
            synced.removed += gone.len();
            synced.written += changed.len();
        }
        self.installed = want;
        Ok(synced)
    }

    /// Run the program once on `frame` as if it came in on interface
    /// `ingress` (`BPF_PROG_TEST_RUN`; nothing is sent): its answer, and
    /// the frame as it left the program.
    pub fn test_run(&mut self, frame: &[u8], ingress: u32) -> std::io::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let run = self.prog_test_run(PROGRAM_NAME, frame, ingress, Some(&mut out), 1, 0)?;
        out.truncate(run.size_out as usize);
        Ok((run.retval, out))
    }

    /// Run the program `repeat` times on `frame` from interface `ingress`
    /// with live frames (`BPF_F_TEST_XDP_LIVE_FRAMES`): each run starts
    /// from the original frame, and a redirect really transmits. The
    /// kernel's mean time per run, in ns.
    pub fn time_live(&mut self, frame: &[u8], ingress: u32, repeat: u32) -> std::io::Result<u32> {
        self.time(PROGRAM_NAME, frame, ingress, repeat)
    }

    fn time(
        &mut self,
        name: &str,
        frame: &[u8],
        ingress: u32,
        repeat: u32,
    ) -> std::io::Result<u32> {
        const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
        let run = self.prog_test_run(
            name,
            frame,
            ingress,
            None,
            repeat,
            BPF_F_TEST_XDP_LIVE_FRAMES,
        )?;
        Ok(run.duration)
    }

    fn prog_test_run(
        &mut self,
        name: &str,
        frame: &[u8],
        ingress: u32,
        out: Option<&mut [u8]>,
        repeat: u32,
        flags: u32,
    ) -> std::io::Result<TestRun> {
        use std::os::fd::{AsFd, AsRawFd};
        let program: &Xdp = self
            .ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| std::io::Error::other("no program"))?;
        let fd = program.fd().map_err(std::io::Error::other)?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let mut ctx = [0u32, frame.len() as u32, 0, ingress, 0, 0];
        let (data_out, size_out) = match out {
            Some(out) => (out.as_mut_ptr() as u64, out.len() as u32),
            None => (0, 0),
        };
        let mut attr = TestRun {
            prog_fd: fd.as_fd().as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            size_out,
            data_in: frame.as_ptr() as u64,
            data_out,
            repeat,
            ctx_size_in: std::mem::size_of_val(&ctx) as u32,
            ctx_in: ctx.as_mut_ptr() as u64,
            flags,
            ..Default::default()
        };
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        // SAFETY: bpf(2) with a test-run attribute whose pointers are to
        // buffers that live across the call, their sizes given.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestRun,
                std::mem::size_of::<TestRun>() as u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(attr)
    }

    /// Per tunnel slot: frames and bytes forwarded, summed over the CPUs.
    pub fn tunnel_counts(&mut self, tunnel: u32) -> Result<(u64, u64), XdpError> {
        let stats: aya::maps::PerCpuArray<_, [u64; 3]> =
            aya::maps::PerCpuArray::try_from(self.map("stats")?).map_err(map_err("stats"))?;
        let values = stats.get(&tunnel, 0).map_err(map_err("stats"))?;
        Ok(values.iter().fold((0, 0), |(f, b), v| (f + v[0], b + v[1])))
    }
}
