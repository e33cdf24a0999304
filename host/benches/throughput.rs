//! Frames/s, loss, the loss-free rate and idle RTT through a plain Linux
//! bridge and through `segwlb run` with and without the XDP fast path, in
//! network namespaces this program builds and always removes (root).
//!
//!     cargo bench -p segwlb --bench throughput
//!
//! ```text
//!  gen ── eth0 ═ up0 ── middle ── gw1 ═ eth0 ── segw1
//!                               ── gw2 ═ eth0 ── segw2
//!                               ── gw3 ═ eth0 ── segw3
//! ```
//!
//! One generator thread, pinned to CPU 0 at nice -19, sends prebuilt
//! 150-byte frames of many tunnels (ESP in UDP on 4500, some from NAT-like
//! source ports, and raw ESP) from an AF_PACKET socket in `gen`, with
//! `sendmmsg` batches, for a fixed time; what arrives is read from the
//! segws' receive counters. Six runs in one program run, each in a fresh
//! lab:
//!
//! - offered: the middle only receives (frames to a MAC nobody has), so
//!   this is what one generator core can put on the wire;
//! - bridge: the middle is a Linux bridge with static FDB entries, frames
//!   addressed to the segws' MACs round-robin by tunnel;
//! - bridge-napi: the same bridge in the NAPI-threads layout (below);
//! - segwlb: the middle runs `segwlb run` with `fast_path = "off"`
//!   (round-robin policy, on the CPUs other than the generator's, nice -19
//!   too), frames addressed to its uplink MAC;
//! - xdp: the same with `fast_path = "xdp"` (generic XDP);
//! - xdp-native: with `xdp_mode = "native"`, in the NAPI-threads layout.
//!
//! Before measuring, each tunnel's first frame is sent once and answered
//! by its segw, so every tunnel is established and confirmed (what the
//! fast path waits for). Then, for each middle: frames/s delivered and
//! lost when the generator sends as fast as it can, with the ratio to each
//! bridge measured before it; the highest loss-free rate (at most 0.1%
//! lost), by bisection over paced runs; and the round-trip time of a ping
//! tunnel on the idle lab, p50 and p99, through a reflector on every segw
//! (userspace at both ends, the same for every middle).
//!
//! The layouts: with veth as it comes, a frame is received in its sender's
//! call, so all of the middle's kernel work, the bridge's or XDP's, runs on
//! the generator's core. In the NAPI-threads layout GRO is on for every
//! veth (which gives a veth NAPI: frames sent into it queue for a poll)
//! and the middle's uplink is polled by a kernel thread of its own, which
//! the scheduler runs on the other core; native XDP needs that NAPI on the
//! veths it redirects into. Compare a middle with the bridge of its own
//! layout.
//!
//! "Sent" in each run is also what the path behind it allowed: in the
//! plain layout the bridge and XDP runs are all on the generator's core,
//! the AF_PACKET run adds segwlb's CPUs. The lab keeps what is not under test cheap and quiet: the segws are
//! sinks (ESP dropped at their first routing decision, no ICMP answers),
//! the bridge has no netfilter hooks and no multicast snooping, IPv6 is off
//! everywhere. Each run prints the busy share of every CPU over its window,
//! and a warning when the machine was busy before the runs: other load
//! skews the figures (nice -19 covers a build in another terminal, where
//! autogroup scheduling is on, by raising this session's group too).
//!
//! Environment: `SEGWLB_BENCH_SECS` (default 5) per measurement,
//! `SEGWLB_BENCH_BATCH` (default 64; 1 = a plain `send` loop),
//! `SEGWLB_BENCH_ONLY` = `offered`, `bridge`, `bridge-napi`, `segwlb`,
//! `xdp` or `xdp-native` to run one,
//! `SEGWLB_BENCH_STEPS` (default 7) paced runs of `SEGWLB_BENCH_STEP_MS`
//! (default 1000) to find the loss-free rate, `SEGWLB_BENCH_PINGS`
//! (default 1000, 1 ms apart) for the RTT.
//! Not root, or `ip`/`ethtool` missing: says what is missing and exits 0.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use segwlb::lab::netns::{self, format_mac, link_stats, mac_of, LinkStats, Netns};
use segwlb::packet::craft::EspFrame;

#[path = "throughput/rtt.rs"]
mod rtt;

const TUNNELS: u32 = 1024;
/// Frames per tunnel in the prebuilt pool (sequence numbers 1..=N).
const FRAMES_PER_TUNNEL: u32 = 4;
const FRAME_LEN: usize = 150;
const SEGWS: usize = 3;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 2, 2, 1);
/// The generator's CPU; `segwlb run` gets the others.
const GEN_CPU: usize = 0;
/// Nice value of the generator thread and of `segwlb run`, so that other
/// work on the machine (a build) takes little of their CPUs.
const NICE: i32 = -19;
/// A MAC nobody in the lab has: the offered-rate sink.
const NOBODY: [u8; 6] = [0x02, 0x5e, 0x67, 0x00, 0x00, 0x01];

/// Set by SIGINT/SIGTERM: stop sending, clean up, exit.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn stopping() -> anyhow::Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleep `d`, waking early to notice a Ctrl-C.
fn nap(d: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        stopping()?;
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    stopping()
}

fn main() -> ExitCode {
    if let Err(missing) = netns::prerequisites() {
        println!("throughput: skipped: {missing}");
        return ExitCode::SUCCESS;
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("throughput: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Settings {
    duration: Duration,
    batch: usize,
    only: Option<String>,
    /// Each step of the search for the highest loss-free rate.
    step: Duration,
    steps: u32,
    pings: u32,
}

/// At most this share lost counts as loss-free (the segws' counters also
/// see the balancer's health probes, a few a second).
const LOSS_FREE: f64 = 0.001;
/// Frames per `sendmmsg` when paced: a rate is kept to within a batch.
const PACED_BATCH: usize = 16;

/// What the middle is in a measurement.
#[derive(Clone, Copy, PartialEq)]
enum Middle {
    Bridge,
    /// `segwlb run` with this `[dataplane] fast_path` and `xdp_mode`.
    Segwlb(&'static str, &'static str),
}

/// Where the kernel does the middle's receive work.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Layout {
    /// veth as it comes: a frame is received in its sender's call, so the
    /// middle's kernel work (and the segws') runs on the generator's core.
    Plain,
    /// NAPI on every veth, and the middle's uplink polled by a kernel
    /// thread of its own (see [`Lab::build`]).
    NapiThreads,
}

fn settings() -> anyhow::Result<Settings> {
    let num = |name: &str, default: u64| -> anyhow::Result<u64> {
        match std::env::var(name) {
            Ok(v) => v
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("{name}={v}: expected a positive integer")),
            Err(_) => Ok(default),
        }
    };
    let only = std::env::var("SEGWLB_BENCH_ONLY").ok();
    if let Some(o) = &only {
        let names = [
            "offered",
            "bridge",
            "bridge-napi",
            "segwlb",
            "xdp",
            "xdp-native",
        ];
        if !names.contains(&o.as_str()) {
            bail!(
                "SEGWLB_BENCH_ONLY={o}: expected one of {}",
                names.join(", ")
            );
        }
    }
    Ok(Settings {
        duration: Duration::from_secs(num("SEGWLB_BENCH_SECS", 5)?),
        batch: num("SEGWLB_BENCH_BATCH", 64)?.min(1024) as usize,
        only,
        step: Duration::from_millis(num("SEGWLB_BENCH_STEP_MS", 1000)?),
        steps: num("SEGWLB_BENCH_STEPS", 7)? as u32,
        pings: num("SEGWLB_BENCH_PINGS", 1000)? as u32,
    })
}

fn bench() -> anyhow::Result<()> {
    let s = settings()?;
    let runs = |name: &str| s.only.as_deref().is_none_or(|o| o == name);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "throughput: {FRAME_LEN}-byte frames of {TUNNELS} tunnels ({} ESP in UDP, half of \
         them from NAT-like ports; {} raw ESP), {} s per run, generator on CPU {GEN_CPU} of \
         {cpus} at nice {NICE}, {}",
        TUNNELS / 2,
        TUNNELS / 2,
        s.duration.as_secs(),
        if s.batch == 1 {
            "send() per frame".to_string()
        } else {
            format!("sendmmsg batches of {}", s.batch)
        }
    );
    // Other load skews every figure here: say so up front.
    let idle_before = cpu_times()?;
    nap(Duration::from_millis(500))?;
    let busy = busy_shares(&cpu_times()?, &idle_before);
    if busy.iter().any(|&b| b > 0.25) {
        println!(
            "warning: the machine is busy before any run ({}): figures will be low and noisy",
            format_busy(&busy)
        );
    }
    let _priority = AutogroupNice::raise(NICE);
    let prefix = netns::unique_prefix("tp");

    if runs("offered") {
        let lab = Lab::build(&prefix, Layout::Plain)?;
        let frames = tunnel_frames(lab.gen_mac, |_| NOBODY);
        let sent = blast(&lab, &frames, s.batch, s.duration, None)?;
        println!(
            "{:<26}{:>10.0} frames/s   (into a middle that drops them)",
            "offered (gen, one core)",
            sent.rate()
        );
    }

    let mut bridge_rates = Vec::new();
    let middles = [
        ("bridge", "bridge", Middle::Bridge, Layout::Plain),
        (
            "bridge-napi",
            "bridge, NAPI threads",
            Middle::Bridge,
            Layout::NapiThreads,
        ),
        (
            "segwlb",
            "segwlb run",
            Middle::Segwlb("off", "generic"),
            Layout::Plain,
        ),
        (
            "xdp",
            "segwlb run + XDP",
            Middle::Segwlb("xdp", "generic"),
            Layout::Plain,
        ),
        (
            "xdp-native",
            "+ native XDP, NAPI thr.",
            Middle::Segwlb("xdp", "native"),
            Layout::NapiThreads,
        ),
    ];
    for (key, name, middle, layout) in middles {
        if !runs(key) {
            continue;
        }
        let lab = Lab::build(&prefix, layout)?;
        let dir = tempfile::Builder::new().prefix("segwlb-bench").tempdir()?;
        let (balancer, dst_of) = match middle {
            Middle::Bridge => {
                lab.bridge()?;
                let macs = lab.segw_macs.clone();
                (
                    None,
                    Box::new(move |i: u32| macs[i as usize % SEGWS]) as Box<dyn Fn(u32) -> _>,
                )
            }
            Middle::Segwlb(fast_path, xdp_mode) => {
                let balancer = lab.start_segwlb(dir.path(), fast_path, xdp_mode)?;
                let uplink = mac_of(&lab.mid, "up0")?;
                (
                    Some(balancer),
                    Box::new(move |_| uplink) as Box<dyn Fn(u32) -> _>,
                )
            }
        };
        let frames = tunnel_frames(lab.gen_mac, &dst_of);
        warm_up(&lab, &frames, s.batch)?;
        let r = measure(&lab, &frames, s.batch, s.duration, None)?;
        r.print(name, &bridge_rates);
        if middle == Middle::Bridge {
            bridge_rates.push((layout, r.delivered_rate()));
        } else {
            r.print_per_segw();
        }
        let loss_free = highest_loss_free(&lab, &frames, r.sent.rate(), &s)?;
        let rtt = lab.rtt(dst_of(0), s.pings)?;
        println!(
            "{:<26}loss-free up to {loss_free:>9.0} frames/s   RTT idle {}",
            "",
            rtt.summary()
        );
        if let Some(balancer) = balancer {
            println!("{:<26}({})", "", forwarded_line(dir.path()));
            let status = balancer.stop()?;
            if !status.success() {
                println!("  (segwlb run exited {status} after SIGTERM)");
            }
        }
    }
    Ok(())
}

/// The namespaces of one measurement; dropping it removes them all.
struct Lab {
    gen: Netns,
    mid: Netns,
    segws: Vec<Netns>,
    gen_mac: [u8; 6],
    segw_macs: Vec<[u8; 6]>,
}

impl Lab {
    fn build(prefix: &str, layout: Layout) -> anyhow::Result<Lab> {
        stopping()?;
        let gen = Netns::new(&format!("{prefix}gen"))?;
        let mid = Netns::new(&format!("{prefix}mid"))?;
        netns::veth(&gen, "eth0", &mid, "up0")?;
        let mut segws = Vec::new();
        for n in 1..=SEGWS {
            let segw = Netns::new(&format!("{prefix}s{n}"))?;
            netns::veth(&mid, &format!("gw{n}"), &segw, "eth0")?;
            segw.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "eth0"])?;
            segw.ip(&["route", "add", "10.1.0.0/16", "dev", "eth0"])?;
            // A sink: the segw's receive counter counts a frame as it is
            // queued to the segw, and everything after that runs in the
            // softirq of whoever sent it (the generator's core through a
            // bridge, segwlb's through segwlb). So the segw must cost
            // little: ESP in UDP and raw ESP meet a blackhole rule at the
            // first routing decision, before the ICMP port and protocol
            // unreachables a segw without SAs would send (their rate
            // limiting alone cost a quarter of the bridge run). ARP names
            // no IP protocol and still finds the VIP in the local table,
            // whose rule moves from 0 to 200 to come after these.
            segw.ip(&["rule", "add", "pref", "200", "table", "local"])?;
            segw.ip(&["rule", "del", "pref", "0"])?;
            for proto in ["udp", "esp"] {
                segw.ip(&[
                    "rule",
                    "add",
                    "pref",
                    "100",
                    "iif",
                    "eth0",
                    "ipproto",
                    proto,
                    "blackhole",
                ])?;
            }
            // Any error that still gets out must not resolve initiators:
            // that would broadcast ARP into the middle and onto the other
            // segws' counters. With no multicast solicitations the
            // neighbour fails at once; answering ARP is unaffected.
            netns::sysctl(&segw, "net/ipv4/neigh/eth0/mcast_solicit", "0")?;
            segws.push(segw);
        }
        if layout == Layout::NapiThreads {
            // GRO on a veth gives it NAPI: frames sent into it queue for a
            // poll instead of being received in the sender's call. The
            // middle's uplink polls in a kernel thread of its own, which
            // the scheduler runs off the generator's busy core; the segws
            // and the generator need NAPI to take native XDP redirects.
            for (ns, ifname) in std::iter::once((&gen, "eth0"))
                .chain(std::iter::once((&mid, "up0")))
                .chain(segws.iter().map(|s| (s, "eth0")))
            {
                ns.exec(&["ethtool", "-K", ifname, "gro", "on"])?;
            }
            mid.exec(&["sh", "-c", "echo 1 > /sys/class/net/up0/threaded"])?;
        }
        let gen_mac = mac_of(&gen, "eth0")?;
        let segw_macs = segws
            .iter()
            .map(|s| mac_of(s, "eth0"))
            .collect::<Result<_, _>>()?;
        Ok(Lab {
            gen,
            mid,
            segws,
            gen_mac,
            segw_macs,
        })
    }

    /// The middle as a plain Linux bridge over all its ports, with static
    /// FDB entries for the segws (they never send, so nothing is learned,
    /// and an unknown destination would be flooded to all of them).
    fn bridge(&self) -> anyhow::Result<()> {
        let mid = &self.mid;
        // No multicast snooping: it has the bridge itself join the
        // multicast router discovery group and send IGMP reports to the
        // ports, onto the segws' counters.
        mid.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        netns::sysctl(mid, "net/ipv6/conf/br0/disable_ipv6", "1")?;
        // A plain bridge: when br_netfilter is loaded (for a container
        // runtime, say) it would pass every frame through the iptables
        // hooks; that is a firewall, not the kernel's bridge.
        for table in ["arptables", "iptables", "ip6tables"] {
            let key = format!("net/bridge/bridge-nf-call-{table}");
            if Path::new("/proc/sys").join(&key).exists() {
                netns::sysctl(mid, &key, "0")?;
            }
        }
        mid.ip(&["link", "set", "up0", "master", "br0"])?;
        for (n, mac) in (1..=SEGWS).zip(&self.segw_macs) {
            let port = format!("gw{n}");
            mid.ip(&["link", "set", &port, "master", "br0"])?;
            mid.exec(&[
                "bridge",
                "fdb",
                "replace",
                &format_mac(mac),
                "dev",
                &port,
                "master",
                "static",
            ])?;
        }
        mid.ip(&["link", "set", "br0", "up"])?;
        Ok(())
    }

    /// Run `f` while a reflector on every segw answers what `answer` says.
    fn reflecting<T>(
        &self,
        answer: rtt::Answer,
        f: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let segws = self
            .segws
            .iter()
            .map(|s| {
                let fd = packet_socket(s, "eth0", libc::ETH_P_ALL as u16)?;
                rtt::set_receive_timeout(&fd, Duration::from_millis(20))?;
                Ok(fd)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reflectors: Vec<_> = segws
                .iter()
                .zip(&self.segw_macs)
                .map(|(fd, &mac)| {
                    let stop = &stop;
                    scope.spawn(move || rtt::reflector(fd, mac, answer, stop))
                })
                .collect();
            let out = f();
            stop.store(true, Ordering::Relaxed);
            for r in reflectors {
                r.join().expect("reflector thread")?;
            }
            out
        })
    }

    /// Idle round trips of the ping tunnel through the middle, `dst` its
    /// first hop's MAC.
    fn rtt(&self, dst: [u8; 6], count: u32) -> anyhow::Result<rtt::Rtt> {
        let gen = packet_socket(&self.gen, "eth0", libc::ETH_P_ALL as u16)?;
        rtt::set_receive_timeout(&gen, Duration::from_millis(20))?;
        self.reflecting(rtt::Answer::Pings, || {
            std::thread::scope(|s| {
                s.spawn(|| {
                    set_affinity([GEN_CPU])?;
                    set_nice(NICE)?;
                    rtt::ping(&gen, self.gen_mac, dst, VIP, count)
                })
                .join()
                .expect("ping thread")
            })
            .map_err(Into::into)
        })
    }

    fn segw_stats(&self) -> anyhow::Result<Vec<LinkStats>> {
        Ok(self
            .segws
            .iter()
            .map(|s| link_stats(s, "eth0"))
            .collect::<Result<_, _>>()?)
    }

    /// `segwlb run` in the middle namespace on a config written to `dir`,
    /// once its control socket exists.
    fn start_segwlb(
        &self,
        dir: &Path,
        fast_path: &str,
        xdp_mode: &str,
    ) -> anyhow::Result<Balancer> {
        let socket = dir.join("segwlb.sock");
        let config = dir.join("segwlb.toml");
        std::fs::write(&config, self.config(&socket, fast_path, xdp_mode))?;
        let stderr_path = dir.join("segwlb.stderr");
        let stderr = File::create(&stderr_path)?;
        let mut cmd = self.mid.command(env!("CARGO_BIN_EXE_segwlb"));
        cmd.arg("run")
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: only system calls (sched_setaffinity, setpriority, gettid)
        // between fork and exec, no allocation; both carry over exec, and
        // to every thread segwlb starts.
        unsafe {
            cmd.pre_exec(move || {
                if cpus > 1 {
                    set_affinity((0..cpus).filter(|&c| c != GEN_CPU))?;
                }
                set_nice(NICE)
            });
        }
        let child = cmd.spawn().context("start segwlb run")?;
        let mut balancer = Balancer {
            child: Some(child),
            stderr: stderr_path,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            stopping()?;
            if let Some(status) = balancer.child_mut().try_wait()? {
                bail!(
                    "segwlb run exited ({status}) before its control socket {} appeared; \
                     its stderr:\n{}",
                    socket.display(),
                    balancer.stderr_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "segwlb run: no control socket {} after 10 s; its stderr:\n{}",
                    socket.display(),
                    balancer.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Health: a probe interval or two, so every segw is up before the
        // first tunnel is placed.
        nap(Duration::from_millis(1200))?;
        Ok(balancer)
    }

    fn config(&self, socket: &Path, fast_path: &str, xdp_mode: &str) -> String {
        let mut c = format!(
            r#"[balancer]
uplink = "up0"
vip = "{VIP}"
proxy_uplink = ["{VIP}/32"]
proxy_gateways = ["10.1.0.0/16"]
control_socket = "{}"

[policy]
name = "round-robin"
dir = "{}"

[health]
interval_ms = 500
down_after = 3
up_after = 1

[dataplane]
fast_path = "{fast_path}"
xdp_mode = "{xdp_mode}"
"#,
            socket.display(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"),
        );
        for (n, mac) in (1..=SEGWS).zip(&self.segw_macs) {
            c.push_str(&format!(
                "\n[[gateway]]\nname = \"segw{n}\"\ninterface = \"gw{n}\"\nmac = \"{}\"\n",
                format_mac(mac)
            ));
        }
        c
    }
}

/// What `segwlb ctl status` says it forwarded (and how much of it the
/// fast path did).
fn forwarded_line(dir: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segwlb"))
        .arg("ctl")
        .arg("--socket")
        .arg(dir.join("segwlb.sock"))
        .arg("status")
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.starts_with("frames forwarded"))
            .and_then(|l| l.split(';').next())
            .unwrap_or("ctl status: no counters")
            .to_string(),
        Err(e) => format!("ctl status: {e}"),
    }
}

/// A running `segwlb run`: SIGTERM on `stop`, SIGKILL if dropped running.
struct Balancer {
    child: Option<Child>,
    stderr: PathBuf,
}

impl Balancer {
    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                bail!(
                    "segwlb run did not exit within 5 s of SIGTERM; its stderr:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The frame pool, interleaved by tunnel (tunnel `k % TUNNELS`, sequence
/// number `k / TUNNELS + 1`), so the first `TUNNELS` frames open every
/// tunnel once. Even tunnels are ESP in UDP (every other one from its own
/// NAT-like source port, the rest from 4500), odd ones raw ESP; each has
/// its own source address in 10.1.0.0/16.
fn tunnel_frames(src: [u8; 6], dst_of: impl Fn(u32) -> [u8; 6]) -> Vec<Vec<u8>> {
    let mut frames = Vec::with_capacity((TUNNELS * FRAMES_PER_TUNNEL) as usize);
    for k in 0..TUNNELS * FRAMES_PER_TUNNEL {
        let (i, seq) = (k % TUNNELS, k / TUNNELS + 1);
        let ports = match i % 4 {
            0 => Some((4500, 4500)),
            2 => Some((10_000 + i as u16, 4500)),
            _ => None,
        };
        let headers = 14 + 20 + if ports.is_some() { 8 } else { 0 };
        let mut f = Vec::new();
        EspFrame {
            dst: dst_of(i),
            src,
            from: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 1)) + i).into(),
            to: VIP.into(),
            ports,
            spi: 0x1000_0000 + i,
            seq,
            len: FRAME_LEN - headers,
        }
        .write(&mut f);
        debug_assert_eq!(f.len(), FRAME_LEN);
        frames.push(f);
    }
    frames
}

/// What the generator did.
struct Sent {
    frames: u64,
    /// Calls that failed (ENOBUFS and the like): frames not sent.
    errors: u64,
    elapsed: Duration,
}

impl Sent {
    fn rate(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64()
    }
}

/// An AF_PACKET socket bound to `ifname` in `ns`, sending past the qdisc
/// and receiving `protocol` (0: nothing; `ETH_P_ALL`: every frame).
fn packet_socket(ns: &Netns, ifname: &str, protocol: u16) -> anyhow::Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname)?;
    let fd = ns.enter(|| -> io::Result<OwnedFd> {
        // SAFETY: plain socket calls on a descriptor we own; `addr` is a
        // fully initialised sockaddr_ll of the size we pass.
        unsafe {
            let index = libc::if_nametoindex(name.as_ptr());
            if index == 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(protocol.to_be()),
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol.to_be();
            addr.sll_ifindex = index as i32;
            if libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let one: libc::c_int = 1;
            if libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(fd)
        }
    })??;
    Ok(fd)
}

/// With autogroup scheduling (`kernel.sched_autogroup_enabled`), CPU time
/// is shared between sessions first, and a thread's nice value counts only
/// within its session's group: a build in another terminal would still take
/// half the generator's CPU. Raises this session's group for the runs, and
/// puts the old value back on drop.
struct AutogroupNice {
    old: Option<i32>,
}

impl AutogroupNice {
    const FILE: &'static str = "/proc/self/autogroup";

    fn read() -> Option<i32> {
        // "/autogroup-4 nice 0"
        let text = std::fs::read_to_string(Self::FILE).ok()?;
        text.split_whitespace().last()?.parse().ok()
    }

    fn raise(nice: i32) -> AutogroupNice {
        let old = Self::read();
        if old.is_some() && std::fs::write(Self::FILE, nice.to_string()).is_err() {
            return AutogroupNice { old: None };
        }
        AutogroupNice { old }
    }
}

impl Drop for AutogroupNice {
    fn drop(&mut self) {
        if let Some(old) = self.old {
            let _ = std::fs::write(Self::FILE, old.to_string());
        }
    }
}

/// Set the calling thread's nice value (on Linux it is per thread).
fn set_nice(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority on this thread's own id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pin the calling thread to `cpus`.
fn set_affinity(cpus: impl IntoIterator<Item = usize>) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays in bounds
    // for cpu numbers below CPU_SETSIZE, which available_parallelism gives.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Send `frames` round and round from `fd` for `duration` (or just once
/// through with `once`), `batch` frames per `sendmmsg` (1: `send`), as
/// fast as it goes or at `rate` frames/s.
fn send_frames(
    fd: RawFd,
    frames: &[Vec<u8>],
    batch: usize,
    duration: Duration,
    once: bool,
    rate: Option<f64>,
) -> Sent {
    let mut iovs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    let mut msgs = segwlb::io::afpacket::headers(&mut iovs);
    let n = msgs.len();
    let (mut at, mut frames_sent, mut errors) = (0usize, 0u64, 0u64);
    let started = Instant::now();
    'outer: loop {
        // Look at the clock every 64 calls only.
        for _ in 0..64 {
            let want = batch.min(n - at);
            let r = if batch == 1 {
                // SAFETY: the frame outlives the call.
                let f = &frames[at];
                let r = unsafe { libc::send(fd, f.as_ptr().cast(), f.len(), 0) };
                r.signum() as i32
            } else {
                // SAFETY: `msgs[at..at + want]` point at live frames.
                unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr().add(at), want as u32, 0) }
            };
            if r > 0 {
                frames_sent += r as u64;
                at += r as usize;
            } else {
                errors += 1;
                at += 1; // skip the frame that failed
            }
            if at >= n {
                at = 0;
                if once {
                    break 'outer;
                }
            }
            if let Some(rate) = rate {
                // The generator has its core to itself: spin to the next
                // batch's time.
                let due = started + Duration::from_secs_f64(frames_sent as f64 / rate);
                while Instant::now() < due {
                    std::hint::spin_loop();
                }
            }
        }
        if started.elapsed() >= duration || STOP.load(Ordering::Relaxed) {
            break;
        }
    }
    Sent {
        frames: frames_sent,
        errors,
        elapsed: started.elapsed(),
    }
}

/// Send `frames` from gen for `duration` on the pinned generator thread.
fn blast(
    lab: &Lab,
    frames: &[Vec<u8>],
    batch: usize,
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<Sent> {
    let fd = packet_socket(&lab.gen, "eth0", 0)?;
    let sent = std::thread::scope(|s| {
        s.spawn(|| {
            set_affinity([GEN_CPU])?;
            set_nice(NICE)?;
            Ok::<_, io::Error>(send_frames(
                fd.as_raw_fd(),
                frames,
                batch,
                duration,
                false,
                rate,
            ))
        })
        .join()
        .expect("generator thread")
    })?;
    stopping()?;
    Ok(sent)
}

/// One measured run: warm up (every tunnel's first frame, once), then
/// blast, then read what each segw received.
struct Measured {
    sent: Sent,
    per_segw: Vec<LinkStats>,
    gen_tx: LinkStats,
    /// Busy share of each CPU over the window (softirq included).
    cpu_busy: Vec<f64>,
}

impl Measured {
    fn delivered(&self) -> u64 {
        self.per_segw.iter().map(|d| d.rx_packets).sum()
    }

    fn delivered_rate(&self) -> f64 {
        self.delivered() as f64 / self.sent.elapsed.as_secs_f64()
    }

    /// The share of what was sent that no segw received.
    fn loss(&self) -> f64 {
        let (delivered, sent) = (self.delivered(), self.sent.frames);
        sent.saturating_sub(delivered) as f64 / sent.max(1) as f64
    }

    fn print_per_segw(&self) {
        for (i, d) in self.per_segw.iter().enumerate() {
            println!(
                "  segw{}                   {:>10.0} frames/s  {:>5.1}% of delivered",
                i + 1,
                d.rx_packets as f64 / self.sent.elapsed.as_secs_f64(),
                100.0 * d.rx_packets as f64 / self.delivered().max(1) as f64
            );
        }
    }

    /// One line of figures, with the ratio to each bridge measured so far.
    fn print(&self, name: &str, bridges: &[(Layout, f64)]) {
        let (delivered, sent) = (self.delivered(), self.sent.frames);
        let loss = 100.0 * self.loss();
        let ratio = match bridges {
            [] => String::new(),
            _ => {
                let each: Vec<String> = bridges
                    .iter()
                    .map(|(layout, b)| {
                        let which = match layout {
                            Layout::Plain => "plain",
                            Layout::NapiThreads => "NAPI thr.",
                        };
                        format!("{which} {:.2}", self.delivered_rate() / b)
                    })
                    .collect();
                format!("   to bridge: {}", each.join(", "))
            }
        };
        println!(
            "{name:<26}delivered {:>9.0} frames/s  loss {loss:>5.1}%{ratio}",
            self.delivered_rate(),
        );
        let mut notes = vec![format!("gen sent {:.0}/s", self.sent.rate())];
        if self.sent.errors > 0 {
            notes.push(format!("{} send calls refused", self.sent.errors));
        }
        if delivered > sent {
            notes.push(format!(
                "{} frames more than sent: ARP probes and the like",
                delivered - sent
            ));
        }
        if self.gen_tx.tx_dropped > 0 {
            notes.push(format!("{} dropped at gen's veth", self.gen_tx.tx_dropped));
        }
        notes.push(format!("busy {}", format_busy(&self.cpu_busy)));
        println!("{:<26}({})", "", notes.join(", "));
    }
}

/// Per CPU: (busy, total) jiffies from /proc/stat.
fn cpu_times() -> anyhow::Result<Vec<(u64, u64)>> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    Ok(parse_cpu_times(&stat))
}

/// Busy share of each CPU between two readings of [`cpu_times`].
fn busy_shares(after: &[(u64, u64)], before: &[(u64, u64)]) -> Vec<f64> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| a.0.saturating_sub(b.0) as f64 / a.1.saturating_sub(b.1).max(1) as f64)
        .collect()
}

fn format_busy(busy: &[f64]) -> String {
    busy.iter()
        .enumerate()
        .map(|(cpu, b)| format!("cpu{cpu} {:.0}%", 100.0 * b))
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_cpu_times(stat: &str) -> Vec<(u64, u64)> {
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            // user nice system idle iowait irq softirq steal (guest is in user)
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .take(8)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            let total: u64 = v.iter().sum();
            (total - idle, total)
        })
        .collect()
}

/// Every tunnel's first frame, once, answered by its segw, and time for
/// the middle to place them: what is measured after is established
/// tunnels, confirmed by their segws (which the fast path waits for).
fn warm_up(lab: &Lab, frames: &[Vec<u8>], batch: usize) -> anyhow::Result<()> {
    let fd = packet_socket(&lab.gen, "eth0", 0)?;
    lab.reflecting(rtt::Answer::AllEsp, || {
        // Paced: a veth with NAPI queues 256 frames and refuses the rest
        // of a burst, and every tunnel's first frame must arrive.
        let sent = send_frames(
            fd.as_raw_fd(),
            &frames[..TUNNELS as usize],
            PACED_BATCH.min(batch),
            Duration::ZERO,
            true,
            Some(50_000.0),
        );
        if sent.errors > 0 {
            bail!(
                "warm-up: {} of {TUNNELS} first frames not sent",
                sent.errors
            );
        }
        nap(Duration::from_millis(500))
    })
}

/// Send for `duration` (as fast as it goes, or at `rate` frames/s), then
/// read what each segw received.
fn measure(
    lab: &Lab,
    frames: &[Vec<u8>],
    batch: usize,
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<Measured> {
    let before = lab.segw_stats()?;
    let gen_before = link_stats(&lab.gen, "eth0")?;
    let cpu_before = cpu_times()?;
    let sent = blast(lab, frames, batch, duration, rate)?;
    let cpu_after = cpu_times()?;
    // Let queues drain: what was sent in the window and arrives late counts.
    nap(Duration::from_millis(300))?;
    let after = lab.segw_stats()?;
    let gen_tx = link_stats(&lab.gen, "eth0")?.since(&gen_before);
    Ok(Measured {
        sent,
        per_segw: after.iter().zip(&before).map(|(a, b)| a.since(b)).collect(),
        gen_tx,
        cpu_busy: busy_shares(&cpu_after, &cpu_before),
    })
}

/// The highest offered rate (below `top`) at which at most [`LOSS_FREE`]
/// is lost: a bisection of `s.steps` paced runs of `s.step` each.
fn highest_loss_free(lab: &Lab, frames: &[Vec<u8>], top: f64, s: &Settings) -> anyhow::Result<f64> {
    let (mut lo, mut hi) = (0.0, top);
    for _ in 0..s.steps {
        let rate = (lo + hi) / 2.0;
        let r = measure(lab, frames, PACED_BATCH.min(s.batch), s.step, Some(rate))?;
        if r.loss() <= LOSS_FREE && r.sent.rate() >= 0.95 * rate {
            lo = rate;
        } else {
            hi = rate;
        }
    }
    Ok(lo)
}
