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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{Array, DevMap, HashMap as BpfHashMap, Map};
use aya::programs::Xdp;
use aya::{Ebpf, Pod};
use indexmap::IndexMap;

use crate::balancer::fastpath::{Direction, FastEntry, SpiRange, MAX_SPI_RANGES};
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

// The program's `spi_ranges` is sized from the shared rules; the core's
// limit must be the same number.
const _: () = assert!(crate::packet::wire::MAX_SPI_RANGES == MAX_SPI_RANGES);

/// Generic (skb) XDP unless asked for native (`[dataplane] xdp_mode`).
/// Native XDP skips the socket buffer, but a redirect into a veth in
/// native mode is dropped unless the veth's peer has NAPI (GRO on, or an
/// XDP program of its own): on the segws' side of a lab or a container
/// host, which the balancer can neither see nor set. Generic mode
/// redirects to any interface.
fn xdp_flags(native: bool) -> aya::programs::XdpFlags {
    if native {
        aya::programs::XdpFlags::DRV_MODE
    } else {
        aya::programs::XdpFlags::SKB_MODE
    }
}

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
    tunnel: u32,
    tx: u32,
    from: u32,
    dst: Mac,
    src: Mac,
}

/// `struct spi_range`: `used` 0 ends the list.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SpiRangeSlot {
    min: u32,
    max: u32,
    port: u32,
    used: u32,
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
unsafe impl Pod for SpiRangeSlot {}

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
    #[error("attaching the XDP program to {interface}: {message}")]
    Attach { interface: String, message: String },
}

/// bpf(2)'s command to delete a map element.
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// The map that holds entries for frames going `d`.
fn map_name(d: Direction) -> &'static str {
    match d {
        Direction::Up => "up",
        Direction::Down => "down",
    }
}

fn io_err<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
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
    /// Attached in native (driver) mode, else generic.
    native: bool,
    /// Loaded by [`FastPath::load_traced`].
    traced: bool,
    /// Port id → (ifindex, the port's MAC).
    ports: HashMap<PortId, (u32, Mac)>,
    /// What `up` and `down` hold now, to write only the difference; each
    /// with the resync it was last confirmed in. `None`: removed from the
    /// map while a sweep walks this list (its slot goes in the sweep, so
    /// that no entry moves behind the sweep's back).
    installed: IndexMap<(Direction, Endpoint), (Option<Forward>, u32)>,
    /// The current resync: entries not confirmed in it are stale.
    generation: u32,
    /// Where a sweep of stale entries is (`None`: none under way).
    sweep_at: Option<usize>,
    /// Slots of `installed` that are `None`.
    tombstones: usize,
    /// The egress ports are closed (see [`close_ports`](Self::close_ports)).
    closed: bool,
    /// What `spi_ranges` holds now.
    spi_ranges: Vec<SpiRangeSlot>,
    /// The `stats` array, mapped into our memory.
    counters: Counters,
    /// Each stats slot's totals when last read, up to the highest slot
    /// ever written.
    read: Vec<FastCounts>,
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
    /// Load the program into the kernel (not attached anywhere yet), its
    /// maps sized for `max_tunnels` (each tunnel may hold an entry by
    /// endpoint and one by address, each way; the counters are indexed by
    /// table slot), and its counter array mapped into our memory.
    pub fn load(max_tunnels: usize, native: bool) -> Result<Self, XdpError> {
        Self::load_with(max_tunnels, native, false)
    }

    /// [`FastPath::load`] for the differential tests: the program also
    /// records where each redirect goes ([`FastPath::redirected_to`]),
    /// which `BPF_PROG_TEST_RUN` does not tell. A production load leaves
    /// that out (the verifier drops the code).
    pub fn load_traced(max_tunnels: usize) -> Result<Self, XdpError> {
        Self::load_with(max_tunnels, false, true)
    }

    fn load_with(max_tunnels: usize, native: bool, traced: bool) -> Result<Self, XdpError> {
        let bytes = PROGRAM.ok_or(XdpError::NotBuilt)?;
        let tunnels = max_tunnels.clamp(1, u32::MAX as usize / 2) as u32;
        let mut ebpf = aya::EbpfLoader::new()
            .set_global("trace_redirects", &u32::from(traced), true)
            .set_max_entries("up", 2 * tunnels)
            .set_max_entries("down", 2 * tunnels)
            .set_max_entries("stats", tunnels)
            .load(bytes)
            .map_err(|e| XdpError::Load(e.to_string()))?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| XdpError::Load(format!("no program {PROGRAM_NAME}")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| XdpError::Load(e.to_string()))?;
        program
            .load()
            .map_err(|e| XdpError::Load(format!("{e}: {:?}", std::error::Error::source(&e))))?;
        let counters = match ebpf.map("stats") {
            Some(Map::Array(data)) => Counters::map(data.fd().as_fd(), tunnels),
            _ => Err(std::io::Error::other("not an array")),
        }
        .map_err(|e| XdpError::Map {
            map: "stats",
            message: format!("mmap: {e}"),
        })?;
        Ok(FastPath {
            ebpf,
            native,
            traced,
            ports: HashMap::new(),
            // Reserved whole, as the tunnel table is: grown by doubling,
            // it would rehash millions of entries in one worker turn.
            installed: IndexMap::with_capacity(4 * tunnels as usize),
            generation: 0,
            sweep_at: None,
            tombstones: 0,
            closed: false,
            spi_ranges: vec![SpiRangeSlot::default(); MAX_SPI_RANGES],
            counters,
            read: Vec::new(),
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
        if !self.closed {
            let mut tx: DevMap<_> =
                DevMap::try_from(self.map("tx_ports")?).map_err(map_err("tx_ports"))?;
            tx.set(u32::from(port), ifindex, None, 0)
                .map_err(map_err("tx_ports"))?;
        }
        self.ports.insert(port, (ifindex, mac));
        Ok(())
    }

    /// Stop every redirect: with no egress port in `tx_ports`, the program
    /// passes every frame to the core unchanged. While a full resync walks
    /// the table a slice at a time, the entries it has not reached yet may
    /// be stale (a segw down, a MAC changed, tunnels moved): closed ports
    /// keep the fast path from acting on them.
    pub fn close_ports(&mut self) -> Result<(), XdpError> {
        let ports: Vec<u32> = self.ports.keys().map(|&p| u32::from(p)).collect();
        let Map::DevMap(tx) = self.map("tx_ports")? else {
            return Err(XdpError::Map {
                map: "tx_ports",
                message: "not a device map".into(),
            });
        };
        let fd = tx.fd().as_fd().as_raw_fd();
        for port in ports {
            // aya has no delete for a device map: bpf(2) itself. A port
            // that is not there (ENOENT) is closed already.
            #[repr(C)]
            struct Delete {
                map_fd: u32,
                pad: u32,
                key: u64,
            }
            let attr = Delete {
                map_fd: fd as u32,
                pad: 0,
                key: &port as *const u32 as u64,
            };
            // SAFETY: BPF_MAP_DELETE_ELEM reads `attr` and the 4-byte key
            // it points to, both alive for the call.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_DELETE_ELEM,
                    &attr as *const Delete,
                    std::mem::size_of::<Delete>() as u32,
                )
            };
            let e = std::io::Error::last_os_error();
            if r < 0 && e.raw_os_error() != Some(libc::ENOENT) {
                return Err(XdpError::Map {
                    map: "tx_ports",
                    message: format!("closing port {port}: {e}"),
                });
            }
        }
        self.closed = true;
        Ok(())
    }

    /// Redirect again (see [`close_ports`](Self::close_ports)).
    pub fn open_ports(&mut self) -> Result<(), XdpError> {
        let ports: Vec<(PortId, u32)> = self.ports.iter().map(|(&p, &(i, _))| (p, i)).collect();
        let mut tx: DevMap<_> =
            DevMap::try_from(self.map("tx_ports")?).map_err(map_err("tx_ports"))?;
        for (port, ifindex) in ports {
            tx.set(u32::from(port), ifindex, None, 0)
                .map_err(map_err("tx_ports"))?;
        }
        self.closed = false;
        Ok(())
    }

    /// A full resync begins: from now on an entry is current once
    /// [`update`](Self::update) confirms it, and the ones left unconfirmed
    /// when the caller has looked at every endpoint go in
    /// [`sweep`](Self::sweep).
    pub fn begin_resync(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.sweep_at = None;
    }

    /// Remove entries no endpoint confirmed since [`begin_resync`]
    /// (Self::begin_resync), until `deadline` (`None`: all): `Ok(true)`
    /// once none is left.
    pub fn sweep(&mut self, deadline: Option<std::time::Instant>) -> Result<bool, XdpError> {
        let mut i = self.sweep_at.unwrap_or(0);
        self.sweep_at = Some(i);
        let mut looked = 0u32;
        while let Some((&key, &(f, gen))) = self.installed.get_index(i) {
            looked += 1;
            if looked.is_multiple_of(16) && deadline.is_some_and(|d| std::time::Instant::now() >= d)
            {
                self.sweep_at = Some(i);
                return Ok(false);
            }
            if gen == self.generation && f.is_some() {
                i += 1;
                continue;
            }
            if f.is_some() {
                self.remove_from_map(key)?;
            } else {
                self.tombstones -= 1;
            }
            // The last entry takes this index: looked at next.
            self.installed.swap_remove_index(i);
        }
        self.sweep_at = None;
        Ok(true)
    }

    /// How many entries the maps hold (both ways).
    pub fn entries(&self) -> usize {
        self.installed.len() - self.tombstones
    }

    /// A resync's sweep is under way.
    pub fn sweeping(&self) -> bool {
        self.sweep_at.is_some()
    }

    pub fn is_native(&self) -> bool {
        self.native
    }

    /// Run the program on frames arriving on `interface` (generic or
    /// native: see [`xdp_flags`]).
    pub fn attach(&mut self, interface: &str) -> Result<(), XdpError> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| XdpError::Load(format!("no program {PROGRAM_NAME}")))?;
        program
            .attach(interface, xdp_flags(self.native))
            .map_err(|e| XdpError::Attach {
                interface: interface.to_string(),
                message: format!("{e}: {:?}", std::error::Error::source(&e)),
            })?;
        Ok(())
    }

    /// The map entry for `e`.
    fn forward(&self, e: &FastEntry) -> Result<Forward, XdpError> {
        let from = self
            .ports
            .get(&e.ingress)
            .ok_or(XdpError::UnknownPort(e.ingress))?
            .0;
        if !self.ports.contains_key(&e.egress) {
            return Err(XdpError::UnknownPort(e.egress));
        }
        Ok(Forward {
            tunnel: e.tunnel,
            tx: u32::from(e.egress),
            from,
            dst: e.dst,
            src: e.src,
        })
    }

    /// The healthy segws' ESP SPI ranges, in steering's order
    /// ([`Balancer::fast_path_spi_ranges`](crate::balancer::Balancer::fast_path_spi_ranges)):
    /// from the uplink, a frame whose SPI one of them owns is forwarded
    /// only to that segw. Writes only the slots that changed.
    pub fn set_spi_ranges(&mut self, ranges: &[SpiRange]) -> Result<(), XdpError> {
        if ranges.len() > MAX_SPI_RANGES {
            return Err(XdpError::Map {
                map: "spi_ranges",
                message: format!("{} ranges, room for {MAX_SPI_RANGES}", ranges.len()),
            });
        }
        let want: Vec<SpiRangeSlot> = (0..MAX_SPI_RANGES)
            .map(|i| match ranges.get(i) {
                Some(r) => SpiRangeSlot {
                    min: r.min,
                    max: r.max,
                    port: u32::from(r.port),
                    used: 1,
                },
                None => SpiRangeSlot::default(),
            })
            .collect();
        if want == self.spi_ranges {
            return Ok(());
        }
        // Back to front: a list that only grows or shrinks at its end is
        // the old or the new one at every moment. Other changes come with
        // a rewrite of every entry anyway (a segw's health, the set).
        let changed: Vec<usize> = (0..MAX_SPI_RANGES)
            .rev()
            .filter(|&i| want[i] != self.spi_ranges[i])
            .collect();
        let mut map: Array<_, SpiRangeSlot> =
            Array::try_from(self.map("spi_ranges")?).map_err(map_err("spi_ranges"))?;
        for i in changed {
            map.set(i as u32, want[i], 0)
                .map_err(map_err("spi_ranges"))?;
        }
        self.spi_ranges = want;
        Ok(())
    }

    /// Make the maps hold exactly `entries`: write what is new or changed,
    /// remove what is gone.
    pub fn sync(&mut self, entries: &[FastEntry]) -> Result<Synced, XdpError> {
        self.begin_resync();
        let mut synced = Synced::default();
        for e in entries {
            let f = self.forward(e)?;
            synced.written += self.write((e.direction, Endpoint::of(e.addr, e.port)), Some(f))?;
        }
        let before = self.entries();
        self.sweep(None)?;
        synced.removed = before - self.entries();
        Ok(synced)
    }

    /// Bring the entries at some endpoints (address and port; 0 for raw
    /// ESP) up to date: each with its entries now, or none.
    pub fn update(
        &mut self,
        at: impl IntoIterator<Item = ((IpAddr, u16), Option<[FastEntry; 2]>)>,
    ) -> Result<Synced, XdpError> {
        let mut synced = Synced::default();
        for ((addr, port), entries) in at {
            let key = Endpoint::of(addr, port);
            let mut want = [(Direction::Up, None), (Direction::Down, None)];
            for e in entries.iter().flatten() {
                let slot = &mut want[usize::from(e.direction == Direction::Down)];
                slot.1 = Some(self.forward(e)?);
            }
            for (direction, f) in want {
                let n = self.write((direction, key), f)?;
                match f {
                    Some(_) => synced.written += n,
                    None => synced.removed += n,
                }
            }
        }
        Ok(synced)
    }

    /// One map entry as `f` says (`None`: none), unless it already is: 1
    /// if the map was written.
    fn write(&mut self, key: (Direction, Endpoint), f: Option<Forward>) -> Result<usize, XdpError> {
        let generation = self.generation;
        let now = self.installed.get_mut(&key);
        if now.as_ref().map_or(f.is_none(), |(was, _)| *was == f) {
            // As it is: current in this resync.
            if let Some((_, gen)) = now {
                *gen = generation;
            }
            return Ok(0);
        }
        let tombstone = matches!(now, Some((None, _)));
        match f {
            Some(f) => {
                let name = map_name(key.0);
                let mut map: BpfHashMap<_, Endpoint, Forward> =
                    BpfHashMap::try_from(self.map(name)?).map_err(map_err(name))?;
                map.insert(key.1, f, 0).map_err(map_err(name))?;
                self.installed.insert(key, (Some(f), generation));
                self.tombstones -= usize::from(tombstone);
                let slots = f.tunnel as usize + 1;
                if self.read.len() < slots {
                    self.read.resize(slots, FastCounts::default());
                }
            }
            None => {
                self.remove_from_map(key)?;
                if self.sweep_at.is_some() {
                    self.installed.insert(key, (None, generation));
                    self.tombstones += 1;
                } else {
                    self.installed.swap_remove(&key);
                }
            }
        }
        Ok(1)
    }

    fn remove_from_map(&mut self, key: (Direction, Endpoint)) -> Result<(), XdpError> {
        let name = map_name(key.0);
        let mut map: BpfHashMap<_, Endpoint, Forward> =
            BpfHashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        map.remove(&key.1).map_err(map_err(name))
    }

    /// Run the program once on `frame` as if it came in on interface
    /// `ingress` (`BPF_PROG_TEST_RUN`; nothing is sent): its answer, and
    /// the frame as it left the program.
    pub fn test_run(&mut self, frame: &[u8], ingress: u32) -> std::io::Result<(u32, Vec<u8>)> {
        if self.traced {
            self.set_redirected(0)?;
        }
        let mut out = vec![0u8; frame.len() + 256];
        let run = self.prog_test_run(PROGRAM_NAME, frame, ingress, Some(&mut out), 1, 0)?;
        out.truncate(run.size_out as usize);
        Ok((run.retval, out))
    }

    /// Where the last [`FastPath::test_run`]'s redirect went: the ifindex
    /// its devmap entry held (a program loaded with
    /// [`FastPath::load_traced`]; `None` when it did not redirect).
    pub fn redirected_to(&mut self) -> std::io::Result<Option<u32>> {
        let map: Array<_, u32> =
            Array::try_from(self.map("redirected").map_err(io_err)?).map_err(io_err)?;
        let ifindex = map.get(&0, 0).map_err(io_err)?;
        Ok((ifindex != 0).then_some(ifindex))
    }

    fn set_redirected(&mut self, ifindex: u32) -> std::io::Result<()> {
        let mut map: Array<_, u32> =
            Array::try_from(self.map("redirected").map_err(io_err)?).map_err(io_err)?;
        map.set(0, ifindex, 0).map_err(io_err)
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

    /// Per tunnel slot: what the program forwarded, read through the
    /// lookup syscall (one per call; [`FastPath::take_counts`] reads the
    /// mapped array instead, and the tests hold one against the other).
    pub fn tunnel_counts(&mut self, tunnel: u32) -> Result<FastCounts, XdpError> {
        let stats: Array<_, [u64; SLOT_WORDS]> =
            Array::try_from(self.map("stats")?).map_err(map_err("stats"))?;
        let v = stats.get(&tunnel, 0).map_err(map_err("stats"))?;
        Ok(FastCounts::of_slot(|i| v[i]))
    }

    /// Per tunnel slot: what the program forwarded, read from the mapped
    /// array (no syscall). `None` past the array's end.
    pub fn mapped_counts(&self, tunnel: u32) -> Option<FastCounts> {
        self.counters.get(tunnel)
    }

    /// What the program forwarded for each tunnel slot since the last call
    /// (slots with nothing new left out). Memory reads only: every slot
    /// up to the highest one ever written, a few nanoseconds each.
    pub fn take_counts(&mut self) -> Vec<(u32, FastCounts)> {
        let mut new = Vec::new();
        self.take_counts_in(0, usize::MAX, &mut new);
        new
    }

    /// [`take_counts`](Self::take_counts) of up to `budget` slots from
    /// `from`, into `out`: the slot to go on from, or `None` once past the
    /// last (a pass over a million slots is tens of milliseconds: the
    /// worker takes it a slice at a time).
    pub fn take_counts_in(
        &mut self,
        from: usize,
        budget: usize,
        out: &mut Vec<(u32, FastCounts)>,
    ) -> Option<usize> {
        let end = self.read.len().min(from.saturating_add(budget));
        for slot in from..end {
            let now = self.counters.get(slot as u32)?;
            // Slots are reused: the totals since the last reading, whoever
            // held the slot then.
            let before = &mut self.read[slot];
            let delta = now.since(before);
            if delta != FastCounts::default() {
                *before = now;
                out.push((slot as u32, delta));
            }
        }
        (end < self.read.len()).then_some(end)
    }
}

/// The program's per-tunnel counters (`stats`, a `BPF_F_MMAPABLE` array of
/// `struct tunnel_stats`, 64 bytes a slot), mapped into our memory: the
/// kernel adds to them atomically, we load them atomically.
struct Counters {
    base: NonNull<u64>,
    len: usize,
    slots: u32,
}

// SAFETY: the mapping is owned by this value alone and only read here,
// through atomic loads.
unsafe impl Send for Counters {}

/// `struct tunnel_stats`: frames[2], bytes[2], steered, padding to a cache
/// line.
const SLOT_WORDS: usize = 8;

impl Counters {
    fn map(fd: BorrowedFd<'_>, slots: u32) -> std::io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| std::io::Error::last_os_error())?;
        let bytes = slots as usize * SLOT_WORDS * 8;
        let len = bytes.div_ceil(page) * page;
        // SAFETY: a new shared mapping of the map's whole value area (the
        // kernel checks the length against the map); it stays valid,
        // whatever happens to the fd, until Drop unmaps it. Writable only
        // because an AtomicU64 must be; nothing here writes.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Counters {
            base: NonNull::new(base.cast()).ok_or_else(std::io::Error::last_os_error)?,
            len,
            slots,
        })
    }

    fn get(&self, slot: u32) -> Option<FastCounts> {
        if slot >= self.slots {
            return None;
        }
        Some(FastCounts::of_slot(|i| {
            // SAFETY: within the mapping (slot < slots, i < SLOT_WORDS),
            // 8-byte aligned (page-aligned base, 64-byte slots); the kernel
            // writes these words only with atomic adds.
            unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(slot as usize * SLOT_WORDS + i)) }
                .load(Ordering::Relaxed)
        }))
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Frames and bytes the fast path forwarded for a tunnel: [0] towards its
/// segw, [1] back to the peer; how many of those towards it an SPI range
/// spoke for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FastCounts {
    pub frames: [u64; 2],
    pub bytes: [u64; 2],
    pub steered: u64,
}

impl FastCounts {
    /// From the words of one `struct tunnel_stats`, however they are read.
    fn of_slot(word: impl Fn(usize) -> u64) -> Self {
        FastCounts {
            frames: [word(0), word(1)],
            bytes: [word(2), word(3)],
            steered: word(4),
        }
    }

    fn since(&self, before: &FastCounts) -> FastCounts {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        FastCounts {
            frames: [
                d(self.frames[0], before.frames[0]),
                d(self.frames[1], before.frames[1]),
            ],
            bytes: [
                d(self.bytes[0], before.bytes[0]),
                d(self.bytes[1], before.bytes[1]),
            ],
            steered: d(self.steered, before.steered),
        }
    }

    pub fn total_frames(&self) -> u64 {
        self.frames[0] + self.frames[1]
    }
}
