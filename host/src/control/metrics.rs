//! Prometheus text exposition of a [`Status`], and the small HTTP listener
//! that serves it at `/metrics` (one request per connection; scrapes are
//! rare and tiny, so no HTTP library), from a status at most a second old,
//! a few clients at once.

use std::fmt::Write as _;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::bounded::{self, Cut};
use super::status::Status;

/// The exposition format, version 0.0.4.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP segwlb_{name} {help}");
        let _ = writeln!(out, "# TYPE segwlb_{name} {kind}");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "segwlb_{name} {value}");
            } else {
                let _ = writeln!(out, "segwlb_{name}{{{labels}}} {value}");
            }
        }
    };
    let per_gw = |f: &dyn Fn(&super::status::GatewayStatus) -> String| {
        s.gateways
            .iter()
            .map(|g| (format!("gateway=\"{}\"", g.name), f(g)))
            .collect::<Vec<_>>()
    };
    let one = |v: String| vec![(String::new(), v)];

    family(
        "gateway_tunnels",
        "gauge",
        "Live tunnels bound to the gateway.",
        per_gw(&|g| g.tunnels.to_string()),
    );
    family(
        "gateway_capacity",
        "gauge",
        "The most tunnels the gateway may hold (0: no limit).",
        per_gw(&|g| g.capacity.to_string()),
    );
    family(
        "gateway_up",
        "gauge",
        "1 when the gateway answers its health probes.",
        per_gw(&|g| u8::from(g.healthy).to_string()),
    );
    family(
        "gateway_draining",
        "gauge",
        "1 when the gateway takes no new tunnels.",
        per_gw(&|g| u8::from(g.draining).to_string()),
    );
    family(
        "gateway_weight",
        "gauge",
        "Configured weight.",
        per_gw(&|g| g.weight.to_string()),
    );
    let both = |to: &dyn Fn(&super::status::GatewayStatus) -> u64,
                from: &dyn Fn(&super::status::GatewayStatus) -> u64| {
        s.gateways
            .iter()
            .flat_map(|g| {
                [
                    (
                        format!("gateway=\"{}\",direction=\"to_segw\"", g.name),
                        to(g).to_string(),
                    ),
                    (
                        format!("gateway=\"{}\",direction=\"from_segw\"", g.name),
                        from(g).to_string(),
                    ),
                ]
            })
            .collect::<Vec<_>>()
    };
    family(
        "gateway_frames_total",
        "counter",
        "Frames forwarded, by gateway and direction.",
        both(&|g| g.frames_to, &|g| g.frames_from),
    );
    family(
        "gateway_bytes_total",
        "counter",
        "IP bytes forwarded, by gateway and direction.",
        both(&|g| g.bytes_to, &|g| g.bytes_from),
    );
    family(
        "gateway_bytes_per_second",
        "gauge",
        "IP bytes per second, by gateway and direction (smoothed over 5 s).",
        both(&|g| g.load.bytes_to_per_s as u64, &|g| {
            g.load.bytes_from_per_s as u64
        }),
    );
    family(
        "gateway_packets_per_second",
        "gauge",
        "Packets per second, by gateway and direction (smoothed over 5 s).",
        both(&|g| g.load.packets_to_per_s as u64, &|g| {
            g.load.packets_from_per_s as u64
        }),
    );
    family(
        "gateway_throughput_bytes_per_second",
        "gauge",
        "Throughput capacity, bytes per second both ways (0: not given).",
        per_gw(&|g| g.load.throughput.to_string()),
    );
    family(
        "gateway_utilization",
        "gauge",
        "What policies balance on: the larger of the measured utilization and a live report (1 = full).",
        per_gw(&|g| g.load.utilization.to_string()),
    );
    family(
        "gateway_reported_utilization",
        "gauge",
        "The last utilization the gateway reported, while it counts (after the blackout, before expiry).",
        s.gateways
            .iter()
            .filter(|g| g.load.reported_state == "live")
            .filter_map(|g| {
                let r = g.load.reported?;
                Some((format!("gateway=\"{}\"", g.name), r.to_string()))
            })
            .collect(),
    );
    family(
        "gateway_moved_in_total",
        "counter",
        "Tunnels moved to the gateway (failure of another, rebalance).",
        per_gw(&|g| g.moved_in.to_string()),
    );
    family(
        "drops_total",
        "counter",
        "Frames dropped, by reason.",
        s.drops
            .iter()
            .map(|(r, n)| (format!("reason=\"{r}\""), n.to_string()))
            .collect(),
    );
    family(
        "forwarded_frames_total",
        "counter",
        "Frames forwarded.",
        one(s.counters.forwarded.to_string()),
    );
    family(
        "fast_path_frames_total",
        "counter",
        "Of the frames forwarded, those the XDP fast path forwarded.",
        one(s.counters.fast_path.to_string()),
    );
    family(
        "policy_decisions_total",
        "counter",
        "New tunnels placed by asking the policy.",
        one(s.policy.decisions.to_string()),
    );
    family(
        "policy_fallbacks_total",
        "counter",
        "Decisions the host made instead of a failing policy, by reason.",
        s.policy
            .fallbacks_by_reason
            .iter()
            .map(|(r, n)| (format!("reason=\"{r}\""), n.to_string()))
            .collect(),
    );
    family(
        "policy_reloads_total",
        "counter",
        "Policies swapped in since start.",
        one(s.policy.reloads.to_string()),
    );
    family(
        "policy_rejected_total",
        "counter",
        "Policy files refused on reload (the old policy kept serving).",
        one(s.policy.rejected.to_string()),
    );
    family(
        "policy_swap_seconds",
        "gauge",
        "Last policy swap: change noticed to new policy serving.",
        one(s
            .policy
            .last_swap_ms
            .map_or(0.0, |ms| ms / 1000.0)
            .to_string()),
    );
    family(
        "policy_info",
        "gauge",
        "The policy in use.",
        vec![(format!("policy=\"{}\"", s.policy.name), "1".into())],
    );
    family(
        "table_tunnels",
        "gauge",
        "Tunnels in the affinity table.",
        one(s.table.tunnels.to_string()),
    );
    family(
        "table_capacity",
        "gauge",
        "The table's hard bound.",
        one(s.table.capacity.to_string()),
    );
    family(
        "table_expired_total",
        "counter",
        "Tunnels forgotten after idling.",
        one(s.table.expired.to_string()),
    );
    family(
        "table_evicted_total",
        "counter",
        "Half-open tunnels evicted to make room.",
        one(s.table.evicted_half_open.to_string()),
    );
    family(
        "moves_refused_total",
        "counter",
        "Tunnel moves refused, by what asked: a frame whose SPI range named another segw than the table's sure one, IKE from a new endpoint without the SPI pair, a move onto another tunnel's endpoint.",
        vec![
            ("by=\"spi_range\"".into(), s.counters.spi_overruled.to_string()),
            ("by=\"unproven_ike\"".into(), s.counters.unproven_moves.to_string()),
            ("by=\"endpoint_taken\"".into(), s.table.rebind_refused.to_string()),
        ],
    );
    family(
        "fragment_decisions_evicted_total",
        "counter",
        "First fragments' decisions evicted by newer ones (a flood of first fragments).",
        one(s.counters.fragment_decisions_evicted.to_string()),
    );
    family(
        "fragments_held_total",
        "counter",
        "Later fragments held until their first fragment came (or timed out).",
        one(s.counters.fragments_held.to_string()),
    );
    family(
        "fragments_waiting",
        "gauge",
        "Later fragments waiting for their first fragment now.",
        one(s.counters.fragments_waiting.to_string()),
    );
    family(
        "tunnels_moved_total",
        "counter",
        "Tunnels moved off a down or removed gateway, or by a rebalance.",
        one(s.counters.moved.to_string()),
    );
    family(
        "segw_conflicts_total",
        "counter",
        "Frames from a segw for a tunnel placed on another: forwarded, tunnel not moved.",
        one(s.counters.conflicts.to_string()),
    );
    family(
        "port_send_errors_total",
        "counter",
        "Frames the interface refused to send.",
        s.ports
            .iter()
            .map(|p| {
                (
                    format!("interface=\"{}\"", p.interface),
                    p.send_errors.to_string(),
                )
            })
            .collect(),
    );
    // A histogram: its samples carry suffixes, which `family` does not.
    let w = &s.worker;
    let _ = writeln!(
        out,
        "# HELP segwlb_worker_pause_seconds Busy time of each turn of the worker's loop (its CPU time): how long it kept frames waiting."
    );
    let _ = writeln!(out, "# TYPE segwlb_worker_pause_seconds histogram");
    for (bound, n) in &w.histogram {
        let le = bound.map_or_else(|| "+Inf".to_string(), |us| (us / 1e6).to_string());
        let _ = writeln!(out, "segwlb_worker_pause_seconds_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "segwlb_worker_pause_seconds_sum {}", w.busy_s);
    let _ = writeln!(out, "segwlb_worker_pause_seconds_count {}", w.turns);
    let _ = writeln!(
        out,
        "# HELP segwlb_worker_longest_pause_seconds The longest turn of the worker's loop, on the wall clock.\n# TYPE segwlb_worker_longest_pause_seconds gauge\nsegwlb_worker_longest_pause_seconds {}",
        w.longest_pause_wall_us / 1e6
    );
    let _ = writeln!(
        out,
        "# HELP segwlb_worker_wall_pauses_over_1ms_total Turns of the worker's loop of a millisecond or more on the wall clock.\n# TYPE segwlb_worker_wall_pauses_over_1ms_total counter\nsegwlb_worker_wall_pauses_over_1ms_total {}",
        w.wall_pauses_over_1ms
    );
    let _ = writeln!(
        out,
        "# HELP segwlb_fast_path_entries Entries in the XDP fast path's maps, both ways.\n# TYPE segwlb_fast_path_entries gauge\nsegwlb_fast_path_entries {}",
        w.fast_path_entries
    );
    let _ = writeln!(
        out,
        "# HELP segwlb_fast_path_resyncing 1 while a full resync of the fast path is under way (every frame goes to the core).\n# TYPE segwlb_fast_path_resyncing gauge\nsegwlb_fast_path_resyncing {}",
        u8::from(w.fast_path_resyncing)
    );
    if let Some(p) = &s.pair {
        let samples: [(&str, &str, &str, String); 7] = [
            ("pair_active", "gauge", "1 while this balancer is its pair's active one, 0 while standby.", u8::from(p.role == "active").to_string()),
            ("pair_connected", "gauge", "1 while the sync link to the peer is up (serving a standby, or following the active).", u8::from(p.connected).to_string()),
            ("pair_lag_frames", "gauge", "Sync frames not yet acknowledged (active) or not yet applied (standby).", p.lag_frames.to_string()),
            ("pair_lag_seconds", "gauge", "Replication lag: to the acknowledgement (active), from the active's send to the apply (standby).", (p.lag_ms / 1e3).to_string()),
            ("pair_snapshots_total", "counter", "Whole tables sent (active) or taken (standby).", p.snapshots.to_string()),
            ("pair_standbys_dropped_total", "counter", "Standbys dropped for not keeping up.", p.dropped_slow.to_string()),
            ("pair_refused_total", "counter", "Sync connections or frames refused: a wrong address, a failed proof, a forged or out-of-order frame.", p.refused.to_string()),
        ];
        for (name, kind, help, value) in samples {
            let _ = writeln!(
                out,
                "# HELP segwlb_{name} {help}\n# TYPE segwlb_{name} {kind}\nsegwlb_{name} {value}"
            );
        }
    }
    out
}

/// Scrapes served at once, each on its own thread; one more is answered
/// `503` at once. Scrapers are few (a Prometheus or two): this only stops
/// clients that connect and dawdle from holding up the rest, or piling up.
pub const MAX_SCRAPES: usize = 4;
/// The status a scrape is served from is at most this old: scrapes at
/// any rate ask the worker (which folds every tunnel's fast-path counters
/// for a status) at most once in it.
pub const SNAPSHOT_FRESH: Duration = Duration::from_secs(1);

/// Serve `GET /metrics` on `addr`, from what `snapshot` gave at most
/// [`SNAPSHOT_FRESH`] ago, up to [`MAX_SCRAPES`] clients at once.
pub fn serve(
    addr: SocketAddr,
    snapshot: impl Fn() -> Option<Status> + Send + Sync + 'static,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let exposition = Arc::new(Exposition {
        snapshot,
        last: Mutex::new(None),
    });
    let serving = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) if serving.load(Ordering::Relaxed) >= MAX_SCRAPES => {
                        refuse_busy(conn);
                    }
                    Ok((conn, _)) => {
                        serving.fetch_add(1, Ordering::Relaxed);
                        let (done, exposition) = (serving.clone(), exposition.clone());
                        let spawned = std::thread::Builder::new()
                            .name("metrics-client".into())
                            .spawn(move || {
                                if let Err(e) = answer(conn, &*exposition) {
                                    tracing::debug!("metrics request: {e}");
                                }
                                done.fetch_sub(1, Ordering::Relaxed);
                            });
                        if let Err(e) = spawned {
                            tracing::warn!("metrics listener: no thread for a client: {e}");
                            serving.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        wait_for_client(&listener, STOP_CHECK);
                    }
                    Err(e) => tracing::warn!("metrics listener: {e}"),
                }
            }
        })
}

/// How often the listener looks at its stop flag while no client connects.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Sleep until a client connects to `listener` or `most` has passed (a
/// scrape is answered at once, not at the next look).
fn wait_for_client(listener: &TcpListener, most: Duration) {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call. An error
    // (EINTR) only ends the wait early: the caller tries accept again.
    unsafe { libc::poll(&mut fd, 1, most.as_millis() as libc::c_int) };
}

/// The exposition text, rendered from a status at most [`SNAPSHOT_FRESH`]
/// old.
struct Exposition<F> {
    snapshot: F,
    /// When the last status was taken, and its text.
    last: Mutex<Option<(Instant, Arc<String>)>>,
}

impl<F: Fn() -> Option<Status>> Exposition<F> {
    /// The text to serve; `None` when there is no status (stopping). Scrapes
    /// that come while a status is being taken wait for that one.
    fn text(&self) -> Option<Arc<String>> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, text)) = last.as_ref() {
            if at.elapsed() < SNAPSHOT_FRESH {
                return Some(text.clone());
            }
        }
        let text = Arc::new(render(&(self.snapshot)()?));
        *last = Some((Instant::now(), text.clone()));
        Some(text)
    }
}

/// A client past [`MAX_SCRAPES`]: told so, at once, and closed.
fn refuse_busy(mut conn: TcpStream) {
    let body = format!("busy: {MAX_SCRAPES} scrapes are being served; try again\n");
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = write!(
        conn,
        "HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // What it sent and was not read: closing over it would reset the
    // connection, and the client could lose the answer.
    let _ = conn.set_nonblocking(true);
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        if !matches!(std::io::Read::read(&mut conn, &mut sink), Ok(n) if n > 0) {
            break;
        }
    }
}

/// The most a request's head (request line and headers) may take.
const HEAD_MAX: usize = 8 * 1024;
/// How long a client has to send it.
pub const HEAD_WITHIN: Duration = Duration::from_secs(1);

fn answer<F: Fn() -> Option<Status>>(
    mut conn: TcpStream,
    exposition: &Exposition<F>,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let (code, body) = match bounded::read_until(&mut conn, b"\n\r\n", HEAD_MAX, HEAD_WITHIN) {
        Ok(head) => respond(&head, exposition),
        Err(Cut::TooLong(n)) => (
            "431 Request Header Fields Too Large",
            Arc::new(format!("a request head is at most {n} bytes\n")),
        ),
        Err(Cut::TooSlow(t)) => (
            "408 Request Timeout",
            Arc::new(format!("send the request within {t:?}\n")),
        ),
        Err(Cut::Closed) => return Ok(()),
        Err(Cut::Io(e)) => return Err(e),
    };
    write!(
        conn,
        "HTTP/1.0 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

/// The status and body for a request whose head is `head`.
fn respond<F: Fn() -> Option<Status>>(
    head: &[u8],
    exposition: &Exposition<F>,
) -> (&'static str, Arc<String>) {
    let said = |code, text: &str| (code, Arc::new(text.to_string()));
    let line = head.split(|&b| b == b'\n').next().unwrap_or(head);
    let line = String::from_utf8_lossy(line);
    let parts: Vec<&str> = line.trim_end().split(' ').collect();
    let [method, path, version] = parts[..] else {
        return said("400 Bad Request", "not an HTTP request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return said("400 Bad Request", "not an HTTP request line\n");
    }
    match (method, path) {
        ("GET", "/metrics") => match exposition.text() {
            Some(text) => ("200 OK", text),
            None => said("503 Service Unavailable", "the balancer is stopping\n"),
        },
        ("GET", _) => said("404 Not Found", "try /metrics\n"),
        _ => said("405 Method Not Allowed", "GET only\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Instant;

    #[test]
    fn a_pairs_role_lag_and_drops_are_metrics() {
        use crate::balancer::farm;
        use crate::control::status::{Gathered, PolicyRecord, Status, TunnelLists};
        use crate::policy::native;
        let lb = farm::balancer(native::shipped("round-robin", &[]).unwrap(), 2, vec![], 16);
        let status = |pair| -> Status {
            let now = crate::time::Timestamp::ZERO;
            let record = PolicyRecord::default();
            let mut g = Gathered::of(&lb, &record, vec![], now, 1.0, TunnelLists::new(0));
            g.status_mut().pair = pair;
            g.finish()
        };
        assert!(
            !render(&status(None)).contains("segwlb_pair_"),
            "not one of a pair"
        );
        let text = render(&status(Some(crate::pair::PairStatus {
            role: "standby".into(),
            connected: true,
            lag_frames: 3,
            lag_ms: 1.5,
            snapshots: 2,
            refused: 1,
            ..Default::default()
        })));
        for line in [
            "segwlb_pair_active 0",
            "segwlb_pair_connected 1",
            "segwlb_pair_lag_frames 3",
            "segwlb_pair_lag_seconds 0.0015",
            "segwlb_pair_snapshots_total 2",
            "segwlb_pair_standbys_dropped_total 0",
            "segwlb_pair_refused_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }

    /// What the listener answers to `send`, and how long it took.
    fn exchange(addr: SocketAddr, send: &[u8]) -> (String, Duration) {
        let t = Instant::now();
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(send);
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        (answer, t.elapsed())
    }

    #[test]
    fn bad_slow_and_oversized_requests_get_an_error_in_bounded_time() {
        let addr = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let stop = Arc::new(AtomicBool::new(false));
        // No status to give: a good scrape is answered 503.
        let server = serve(addr, || None, stop.clone()).unwrap();

        let (a, _) = exchange(
            addr,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        );
        assert!(a.starts_with("HTTP/1.0 400 Bad Request\r\n"), "{a:?}");
        let (a, _) = exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(a.starts_with("HTTP/1.0 405 "), "{a:?}");
        let (a, _) = exchange(addr, b"GET /other HTTP/1.1\r\n\r\n");
        assert!(a.starts_with("HTTP/1.0 404 "), "{a:?}");
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
        let (a, _) = exchange(addr, huge.as_bytes());
        assert!(a.starts_with("HTTP/1.0 431 "), "{a:?}");

        // A client that starts a request and stops: cut after HEAD_WITHIN,
        // and a scrape waiting behind it is answered right after.
        let slow = std::thread::spawn(move || exchange(addr, b"GET /met"));
        std::thread::sleep(Duration::from_millis(50));
        let (a, waited) = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(a.starts_with("HTTP/1.0 503 "), "{a:?}");
        assert!(
            waited < HEAD_WITHIN + Duration::from_millis(500),
            "{waited:?}"
        );
        let (a, took) = slow.join().unwrap();
        assert!(a.starts_with("HTTP/1.0 408 Request Timeout\r\n"), "{a:?}");
        assert!(took < HEAD_WITHIN + Duration::from_millis(500), "{took:?}");

        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
    }

    /// A balancer's status with three segws and no tunnels.
    fn a_status() -> Status {
        use crate::control::status::{Gathered, PolicyRecord, TunnelLists};
        let lb = crate::balancer::farm::balancer(
            crate::policy::native::shipped("round-robin", &[]).unwrap(),
            3,
            vec!["10.2.2.1/32".parse().unwrap()],
            64,
        );
        let now = crate::time::Timestamp::ZERO;
        Gathered::of(
            &lb,
            &PolicyRecord::default(),
            vec![],
            now,
            0.0,
            TunnelLists::new(0),
        )
        .finish()
    }

    fn free_addr() -> SocketAddr {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    }

    #[test]
    fn silent_clients_hold_up_no_scrape_and_a_flood_is_refused_at_once() {
        let addr = free_addr();
        let stop = Arc::new(AtomicBool::new(false));
        let server = serve(addr, || None, stop.clone()).unwrap();

        // Three clients that connect and say nothing: a scrape beside
        // them is answered at once, not after each one's HEAD_WITHIN.
        let silent: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(100));
        let (a, took) = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(a.starts_with("HTTP/1.0 503 "), "{a:?}");
        assert!(took < Duration::from_millis(500), "answered after {took:?}");
        drop(silent);

        // As many as are served at once, then one more: told so, at once.
        // Each silent client holds its slot for HEAD_WITHIN: on a loaded
        // machine the listener may take them in later than the probe, so
        // a round that finds a slot free begins again with fresh ones.
        let mut busy = None;
        for _round in 0..5 {
            let flood: Vec<TcpStream> = (0..MAX_SCRAPES)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect();
            std::thread::sleep(Duration::from_millis(100));
            let (a, took) = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
            drop(flood);
            if a.contains("busy") {
                busy = Some(took);
                break;
            }
            std::thread::sleep(HEAD_WITHIN);
        }
        let took = busy.expect("never told busy with every slot taken");
        assert!(took < Duration::from_millis(500), "answered after {took:?}");

        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
    }

    #[test]
    fn scrapes_are_served_from_a_snapshot_at_most_a_second_old() {
        use std::sync::atomic::AtomicUsize;
        let addr = free_addr();
        let stop = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(AtomicUsize::new(0));
        let counted = asked.clone();
        let server = serve(
            addr,
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
                Some(a_status())
            },
            stop.clone(),
        )
        .unwrap();
        // A scraper storm: the worker is asked once, not once a scrape.
        for _ in 0..10 {
            let (a, _) = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
            assert!(a.starts_with("HTTP/1.0 200 "), "{a:?}");
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        // A second later the next scrape asks again.
        std::thread::sleep(SNAPSHOT_FRESH + Duration::from_millis(50));
        let (a, _) = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(a.starts_with("HTTP/1.0 200 "), "{a:?}");
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
    }
}
