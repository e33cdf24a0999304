//! `segwlb run`: the balancer on real interfaces. Reads and checks the
//! config, loads the policy, opens every port, then starts the threads —
//! one reader per port, the worker, the control socket, the metrics
//! listener, the file watcher — and stops them all on SIGINT/SIGTERM.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded};

use crate::balancer::{self, Balancer, GatewaySpec, UPLINK};
use crate::control::config::{ConfigError, FastPathMode, RunConfig};
use crate::control::status::{Gathered, PolicyRecord};
use crate::control::{ctl, metrics, reload, state, PortHandle, Supervisor};
use crate::dataplane::{unix_now, Clock, Command, Worker};
use crate::io::{afpacket, Tx};
use crate::policy::wasm::{Cache, LoadError, Runtime};
use crate::policy::Policy;

/// Frames queued between the readers and the worker. Past this the readers
/// wait and the kernel's socket buffers absorb (or drop, counted by the
/// kernel) the burst.
const QUEUE: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Port(#[from] afpacket::PortError),
    #[error(transparent)]
    Policy(#[from] LoadError),
    #[error("{0}")]
    Start(String),
}

/// Run the balancer described by `config_file` until `stop` is set.
pub fn run(config_file: &Path, stop: Arc<AtomicBool>) -> Result<(), RunError> {
    let config = RunConfig::load(config_file)?;
    config.check_interfaces(&afpacket::interface_names())?;

    let mut runtime = Runtime::with_compiler(config.compiler).map_err(RunError::Start)?;
    runtime.set_cache(config.policy.cache.clone().map(Cache::at));
    let policy_file = config.policy.file();
    let policy_bytes = std::fs::read(&policy_file).map_err(|err| LoadError::Read {
        path: policy_file.clone(),
        err,
    })?;
    let loaded = runtime.load_bytes(
        &policy_file,
        &policy_bytes,
        &config.policy.params,
        config.policy.limits_for(&config.policy.name),
    )?;

    let uplink = afpacket::open(&config.uplink)?;
    let mut gateways = Vec::new();
    for g in &config.gateways {
        gateways.push((g, afpacket::open(&g.interface)?));
    }

    let core = balancer::Config {
        port_macs: std::iter::once(uplink.mac)
            .chain(gateways.iter().map(|(_, o)| o.mac))
            .collect(),
        proxy: config.proxy_uplink.clone(),
        proxy_gateways: config.proxy_gateways.clone(),
        max_tunnels: config.max_tunnels,
        timeouts: config.timeouts,
    };
    let clock = Clock::start();
    let policy: Box<dyn Policy> = Box::new(loaded.serve().map_err(|e| {
        RunError::Start(format!("{}: could not start: {e}", policy_file.display()))
    })?);
    let mut lb = Balancer::new(core, policy);
    lb.set_uplink_next_hop(config.next_hop);
    // The whole table now, so that it never grows (rehashing every tunnel
    // in one go) under traffic.
    let reserving = std::time::Instant::now();
    lb.reserve_table();
    tracing::debug!(
        max_tunnels = config.max_tunnels,
        ms = format!("{:.1}", reserving.elapsed().as_secs_f64() * 1e3),
        "tunnel table reserved"
    );

    let (frames_tx, frames_rx) = bounded(QUEUE);
    let (commands_tx, commands_rx) = unbounded::<Command>();
    let spawn_err =
        |what: &str, e: std::io::Error| RunError::Start(format!("cannot start {what}: {e}"));

    let mut txs: Vec<(u16, String, Box<dyn Tx>)> = Vec::new();
    let uplink_stop = Arc::new(AtomicBool::new(false));
    let uplink_reader = afpacket::spawn_reader(
        &uplink.name,
        UPLINK,
        uplink.rx,
        frames_tx.clone(),
        uplink_stop.clone(),
    )
    .map_err(|e| spawn_err("the uplink reader", e))?;
    let uplink_handle = PortHandle::new(UPLINK, &uplink.name, uplink_stop, uplink_reader);
    txs.push((UPLINK, uplink.name.clone(), Box::new(uplink.tx)));

    let mut ports = BTreeMap::new();
    for (i, (g, opened)) in gateways.into_iter().enumerate() {
        let port = i as u16 + 1;
        let spec = GatewaySpec {
            name: g.name.clone(),
            port,
            mac: g.mac,
            weight: g.weight,
            capacity: g.capacity,
            throughput: g.throughput,
            steering: g.steering,
        };
        let now = clock.now();
        lb.add_gateway(spec, now)
            .map_err(|e| RunError::Start(e.to_string()))?;
        if g.drain {
            lb.set_draining(&g.name, true, now)
                .map_err(|e| RunError::Start(e.to_string()))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let reader = afpacket::spawn_reader(
            &opened.name,
            port,
            opened.rx,
            frames_tx.clone(),
            stop.clone(),
        )
        .map_err(|e| spawn_err("a reader", e))?;
        ports.insert(
            g.name.clone(),
            PortHandle::new(port, &opened.name, stop, reader),
        );
        txs.push((port, opened.name.clone(), Box::new(opened.tx)));
    }

    // A warm restart: the table as the last run left it, before any
    // frame is handled.
    if let Some(path) = &config.state_file {
        let started = std::time::Instant::now();
        match state::read(path) {
            Ok(None) => tracing::info!("no state file at {}: starting cold", path.display()),
            Ok(Some(saved)) => {
                let restored = lb.restore(&saved, clock.now());
                tracing::info!(
                    "{}: {restored} in {:.1} ms",
                    path.display(),
                    started.elapsed().as_secs_f64() * 1e3
                );
            }
            Err(e) => tracing::warn!("{e}: refused, starting cold"),
        }
    }

    let record = PolicyRecord {
        name: loaded.name().into(),
        file: policy_file.display().to_string(),
        contract: loaded.version().package().into(),
        loaded_at: unix_now(),
        ..Default::default()
    };
    let mut worker = Worker::new(lb, txs, config.vips.clone(), config.health, record, clock);
    worker.use_moves(config.moves.settings, config.moves.hook.clone());
    match config.fast_path {
        FastPathMode::Off => {}
        mode => match crate::io::xdp::FastPath::load(
            config.max_tunnels,
            config.xdp_mode == crate::control::config::XdpMode::Native,
        ) {
            Ok(path) => worker.use_fast_path(path),
            Err(e) if mode == FastPathMode::Xdp => {
                return Err(RunError::Start(format!(
                    "dataplane.fast_path = \"xdp\": {e}"
                )))
            }
            Err(e) => tracing::warn!("no XDP fast path ({e}): running on AF_PACKET alone"),
        },
    }
    if let Some(pair) = &config.pair {
        let link = crate::pair::link::Link::start(pair, commands_tx.clone())
            .map_err(|e| RunError::Start(e.to_string()))?;
        worker.use_pair(link, pair);
    }
    worker.announce();
    let worker_stop = stop.clone();
    let worker = std::thread::Builder::new()
        .name("worker".into())
        .spawn(move || worker.run(frames_rx, commands_rx, &worker_stop))
        .map_err(|e| spawn_err("the worker", e))?;

    let socket = config.control_socket.clone();
    let (state_file, state_interval) = (config.state_file.clone(), config.state_interval);
    let config_groups = config.control_groups;
    let metrics_addr = config.metrics;
    let policy_dir = config.policy.dir.clone();
    let summary = format!(
        "uplink {} · {} gateways ({}) · policy {} · VIP {} · control {}{}",
        config.uplink.value,
        config.gateways.len(),
        config
            .gateways
            .iter()
            .map(|g| format!("{} on {}", g.name, g.interface.value))
            .collect::<Vec<_>>()
            .join(", "),
        loaded.name(),
        config
            .vips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" and "),
        socket.display(),
        metrics_addr.map_or_else(String::new, |a| format!(" · metrics http://{a}/metrics")),
    );
    let supervisor = Arc::new(Mutex::new(Supervisor::new(
        runtime,
        config,
        ports,
        commands_tx.clone(),
        frames_tx,
        policy_file,
        &policy_bytes,
    )));

    let mut threads = Vec::new();
    threads.push(
        ctl::serve(
            &socket,
            config_groups,
            ctl::handler(supervisor.clone()),
            stop.clone(),
        )
        .map_err(|e| spawn_err(&format!("the control socket {}", socket.display()), e))?,
    );
    if let Some(addr) = metrics_addr {
        let commands = commands_tx.clone();
        let snapshot = move || {
            let (tx, rx) = bounded(1);
            commands
                .send(Command::Status {
                    tunnels: 0,
                    top: 0,
                    reply: tx,
                })
                .ok()?;
            rx.recv_timeout(Duration::from_secs(5))
                .ok()
                .map(Gathered::finish)
        };
        threads.push(
            metrics::serve(addr, snapshot, stop.clone())
                .map_err(|e| spawn_err(&format!("the metrics listener on {addr}"), e))?,
        );
    }
    if let (Some(path), Some(every)) = (&state_file, state_interval) {
        threads.push(
            state::snapshots(path.clone(), every, commands_tx.clone(), stop.clone())
                .map_err(|e| spawn_err("the snapshots", e))?,
        );
    }
    threads.push(
        reload::watch(&policy_dir, config_file, supervisor.clone(), stop.clone())
            .map_err(|e| RunError::Start(format!("cannot watch {}: {e}", policy_dir.display())))?,
    );
    tracing::info!("serving: {summary}");

    while !stop.load(Ordering::Relaxed) && !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    tracing::info!("stopping");
    let worker = worker.join();
    if let (Some(path), Ok(worker)) = (&state_file, &worker) {
        let started = std::time::Instant::now();
        let saved = worker.save();
        match state::write(path, &saved) {
            Ok(bytes) => tracing::info!(
                "{} tunnels saved to {} ({bytes} bytes) in {:.1} ms",
                saved.len(),
                path.display(),
                started.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => tracing::error!("{}: not saved: {e}", path.display()),
        }
    }
    for t in threads {
        let _ = t.join();
    }
    supervisor
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .close_ports();
    uplink_handle.close();
    Ok(())
}
