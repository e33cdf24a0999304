//! The `segwlb` command line: parse, dispatch, report errors. The work is in
//! the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use segwlb::authoring::{self, Lang};
use segwlb::check;
use segwlb::compare::{self, Scenario};
use segwlb::policy::native as native_policies;
use segwlb::policy::wasm::{Compiler, Limits, Origin, Runtime};
use segwlb::policy::Policy;

#[derive(Parser)]
#[command(
    name = "segwlb",
    version,
    about = "L2 IPsec tunnel load balancer with wasm balancing policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every policy on the same workload and compare spread, disruption
    /// and cost (the built-in workload unless told otherwise).
    Compare {
        /// Policies to compare: names in --policy-dir or paths to .wasm
        /// files, comma-separated. Default: every .wasm in --policy-dir.
        #[arg(long, value_delimiter = ',')]
        policies: Vec<String>,
        /// Where policies are found by name.
        #[arg(long, default_value = "policies")]
        policy_dir: PathBuf,
        /// Use the shipped policies' native twins instead of wasm (to see
        /// what the wasm boundary costs).
        #[arg(long)]
        native: bool,
        /// A scenario file (TOML; see config/scenarios/), or a built-in one
        /// by name: `default` (the default), `capacity` (a segw fails at
        /// peak with capacities set), `diurnal` (a day of traffic on segws
        /// of unequal throughput, a failure at the busy hour), `failover`
        /// (a pair's active balancer fails, twice).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Override the scenario's tunnel count.
        #[arg(long)]
        tunnels: Option<usize>,
        /// Seed for the workload: the same seed gives the same run.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where report.json and report.html go.
        #[arg(long, default_value = "compare-report")]
        out: PathBuf,
        /// Leave ns per decision out (null), so the same seed gives a
        /// byte-identical report.json.
        #[arg(long)]
        no_timing: bool,
    },
    /// Work with policy components.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Run the balancer on real interfaces (root, or CAP_NET_RAW), until
    /// SIGINT or SIGTERM.
    Run {
        /// The configuration (TOML; see config/example.toml).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// A lab of network namespaces: real strongSwan initiators and segws
    /// with `segwlb run` balancing between them (root).
    Lab {
        /// The lab file (TOML; see config/lab.toml).
        #[arg(short, long, default_value = "config/lab.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Talk to a running balancer over its control socket.
    Ctl {
        /// The balancer's control socket (its config's balancer.control_socket).
        #[arg(long, default_value = segwlb::control::config::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the namespaces, start the charons and the balancer.
    Up {
        /// Take the segws (names, weights), the tunnel count and the NAT
        /// share from this scenario (see config/scenarios/) instead of the
        /// lab file.
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// With --scenario: at most this many tunnels.
        #[arg(long, default_value_t = 300)]
        tunnels: usize,
    },
    /// Initiate every tunnel, ping through each, show where they landed.
    Run {
        /// The report as JSON, for tools.
        #[arg(long)]
        json: bool,
        /// List every segw's SAs, one line each (the default up to 50
        /// tunnels; beyond, a line per segw and the summary).
        #[arg(long)]
        sas: bool,
        /// Play this scenario on the lab first: arrivals step by step, its
        /// failures, recoveries, additions, drains, weights and swaps (the
        /// lab must be up with its segws: `lab up --scenario`).
        #[arg(long)]
        scenario: Option<PathBuf>,
    },
    /// What is up.
    Status,
    /// Remove every namespace, link, process and file of the lab (also
    /// after a failed or interrupted `up`).
    Down,
    /// A scenario on real tunnels, once per policy (each in a fresh lab),
    /// reported like `segwlb compare` and beside the simulation's
    /// prediction of the same tunnels.
    Compare {
        /// A scenario file (TOML; see config/scenarios/), or a built-in one
        /// by name: `lab` (the default), `lab-capacity`, `lab-failover` (a
        /// pair's failover: needs `lab.balancers = 2`).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Policies, comma-separated names in the lab file's policy_dir.
        /// Default: every .wasm there.
        #[arg(long, value_delimiter = ',')]
        policies: Vec<String>,
        /// At most this many tunnels (the scenario's count; its churn adds
        /// initiators for new arrivals).
        #[arg(long, default_value_t = 300)]
        tunnels: usize,
        /// Where report.json and report.html go.
        #[arg(long, default_value = "lab-compare-report")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Tunnels per segw, health, weight, drain; the policy; drops.
    Status {
        /// The whole status as JSON, for tools.
        #[arg(long)]
        json: bool,
        /// List at most this many tunnels per segw (at most 10,000).
        #[arg(long, default_value_t = 50)]
        tunnels: usize,
        /// List the N heaviest tunnels (bytes/s both ways), over every segw.
        #[arg(long, value_name = "N", default_value_t = 0)]
        top: usize,
    },
    /// Swap the policy.
    Policy {
        #[command(subcommand)]
        command: CtlPolicy,
    },
    /// Change the gateway set.
    Gateway {
        #[command(subcommand)]
        command: CtlGateway,
    },
    /// Write the tunnel table to the config's balancer.state_file now (a
    /// restart then moves no tunnel).
    Save,
    /// One of a pair ([pair]): become active or standby (what keepalived's
    /// notify scripts run), or, without ROLE, say which it is.
    Role {
        #[arg(value_parser = ["active", "standby"])]
        role: Option<String>,
    },
}

#[derive(Subcommand)]
enum CtlPolicy {
    /// Use policy NAME (policies/NAME.wasm) or a path to a .wasm file.
    Use {
        name: String,
        /// Place every existing tunnel afresh with the new policy (moves are
        /// counted); without it no tunnel moves.
        #[arg(long)]
        rebalance: bool,
        /// With --rebalance: each tunnel the new policy moves is moved make-
        /// before-break (its old segw asked, by [moves] hook, to redirect
        /// the peer), paced by [moves] per_second; none is broken.
        #[arg(long, requires = "rebalance")]
        graceful: bool,
    },
}

#[derive(Subcommand)]
enum CtlGateway {
    /// No new tunnels for NAME; its tunnels stay (with --graceful: they
    /// move off, make-before-break, paced by [moves] per_second).
    Drain {
        name: String,
        #[arg(long)]
        graceful: bool,
    },
    /// NAME takes new tunnels again.
    Undrain { name: String },
    /// Set NAME's weight.
    Weight { name: String, weight: u32 },
    /// Add a segw behind INTERFACE.
    Add {
        name: String,
        #[arg(long)]
        interface: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// The most tunnels it may hold (0: no limit).
        #[arg(long, default_value_t = 0)]
        capacity: u64,
        /// The traffic it can carry, both ways: "4 Gbps", "500 MB/s".
        #[arg(long, value_parser = rate)]
        throughput: Option<u64>,
        /// Its MAC, if it should not be learned.
        #[arg(long)]
        mac: Option<String>,
    },
    /// Remove NAME; its tunnels move on their next packet (with --graceful:
    /// drain it gracefully first, wait for the moves to end, then remove
    /// it; what did not follow moves the plain way then).
    Remove {
        name: String,
        #[arg(long)]
        graceful: bool,
    },
    /// Set the traffic NAME can carry, both ways ("4 Gbps"; "0 bps" for
    /// none): what its utilization is measured against.
    Throughput {
        name: String,
        #[arg(value_parser = rate)]
        throughput: u64,
    },
    /// NAME's utilization as it reports it (its CPU, say), as
    /// `utilization=0.73`: counted after a 10 s blackout, dropped 3 min
    /// after the last report.
    Report {
        name: String,
        #[arg(value_parser = utilization)]
        utilization: f64,
    },
}

/// A rate on the command line: "4 Gbps".
fn rate(text: &str) -> Result<u64, String> {
    segwlb::units::parse_rate(text)
}

/// `utilization=0.73` (or just `0.73`).
fn utilization(text: &str) -> Result<f64, String> {
    let value = text.strip_prefix("utilization=").unwrap_or(text);
    match value.parse::<f64>() {
        Ok(u) if u.is_finite() && u >= 0.0 => Ok(u),
        _ => Err(format!(
            "{text:?}: give utilization=U, U from 0.0 (idle) to 1.0 (full)"
        )),
    }
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Load and validate a policy, then feed it a sample set and synthetic
    /// tunnels: spread, cost per decision, rebalance cost, contract violations.
    Check {
        /// The policy component (.wasm).
        file: PathBuf,
        /// Gateways in the sample set.
        #[arg(long, default_value_t = 4)]
        gateways: u32,
        /// Synthetic tunnels to place.
        #[arg(long, default_value_t = 10_000)]
        tunnels: usize,
        /// A policy parameter, KEY=VALUE (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Seed for the synthetic tunnels.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// wasmtime's compiler: winch (fast to compile) or cranelift
        /// (optimising).
        #[arg(long, default_value = "winch")]
        compiler: Compiler,
        /// Linear memory cap, MiB (as `[policy] memory_mib`).
        #[arg(long)]
        memory_mib: Option<usize>,
        /// Wall time one decision may take, ms (as `[policy] call_timeout_ms`).
        #[arg(long)]
        call_timeout_ms: Option<u64>,
        /// Wall time for start, configure and set-gateways, ms.
        #[arg(long)]
        setup_timeout_ms: Option<u64>,
        /// Compile afresh; neither read nor write the compiled-policy cache.
        #[arg(long)]
        no_cache: bool,
    },
    /// Write a commented, working starting point for a new policy.
    New {
        /// The policy's name (it names the .wasm file): a-z, 0-9, '-'.
        name: String,
        #[arg(long, value_enum)]
        lang: Lang,
        /// Where the policy's directory is made (Rust: the plugins/ workspace).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Build a Python or JavaScript policy (a .py/.js file, or a directory
    /// holding app.py or policy.js) into a checked component.
    Build {
        path: PathBuf,
        /// The component to write. Default: policies/NAME.wasm.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "segwlb=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("segwlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Compare {
            policies,
            policy_dir,
            native,
            scenario,
            tunnels,
            seed,
            out,
            no_timing,
        } => {
            let mut scenario = match scenario {
                Some(path) => Scenario::resolve(&path)?,
                None => Scenario::builtin(),
            };
            if let Some(n) = tunnels {
                if n == 0 || n > compare::scenario::MAX_TUNNELS {
                    bail!("--tunnels must be 1..={}", compare::scenario::MAX_TUNNELS);
                }
                scenario.tunnels.count = n;
            }
            let options = compare::Options {
                seed,
                timing: !no_timing,
            };
            compare(policies, &policy_dir, native, &scenario, options, &out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config } => {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, stop.clone())
                    .context("cannot install the signal handlers")?;
            }
            segwlb::run::run(&config, stop)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ctl { socket, command } => ctl(&socket, command),
        Command::Policy {
            command: PolicyCommand::New { name, lang, dir },
        } => {
            let dir = dir.unwrap_or_else(|| match lang {
                Lang::Rust => PathBuf::from("plugins"),
                Lang::Python | Lang::Js => PathBuf::from("."),
            });
            let root = authoring::new_policy(&name, lang, &dir)?;
            match lang {
                Lang::Rust => eprintln!(
                    "wrote {0}; add \"{name}\" to the members in plugins/Cargo.toml, then \
                     `cargo build` writes policies/{name}.wasm",
                    root.display()
                ),
                Lang::Python | Lang::Js => eprintln!(
                    "wrote {0}; build it with `segwlb policy build {0}` (policies/{name}.wasm)",
                    root.display()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command: PolicyCommand::Build { path, out },
        } => {
            let name = match authoring::Lang::of(&path) {
                Some((_, source)) => authoring::policy_name(&source),
                None => bail!(authoring::Error::UnknownLanguage(path)),
            };
            let out = out.unwrap_or_else(|| PathBuf::from("policies").join(format!("{name}.wasm")));
            let t = std::time::Instant::now();
            authoring::build(&path, &out)?;
            let built = t.elapsed();
            let runtime = Runtime::new().map_err(anyhow::Error::msg)?;
            let t = std::time::Instant::now();
            let loaded = runtime.load(&out, &[], Limits::default())?;
            eprintln!(
                "wrote {} ({:.1} MB) in {:.1} s; it speaks {} and loads ({:.2} s, {} WASI imports linked deny-all)",
                out.display(),
                std::fs::metadata(&out).map_or(0, |m| m.len()) as f64 / 1e6,
                built.as_secs_f64(),
                loaded.version().package(),
                t.elapsed().as_secs_f64(),
                loaded.wasi_imports().len(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab { config, command } => lab(&config, command),
        Command::Policy {
            command:
                PolicyCommand::Check {
                    file,
                    gateways,
                    tunnels,
                    params,
                    seed,
                    compiler,
                    memory_mib,
                    call_timeout_ms,
                    setup_timeout_ms,
                    no_cache,
                },
        } => {
            if gateways == 0 {
                bail!("--gateways must be at least 1");
            }
            let params = parse_params(&params)?;
            let mut runtime = Runtime::with_compiler(compiler).map_err(anyhow::Error::msg)?;
            if no_cache {
                runtime.set_cache(None);
            }
            let d = Limits::default();
            let ms = |v: Option<u64>, d: std::time::Duration| {
                v.map_or(d, std::time::Duration::from_millis)
            };
            let limits = Limits {
                call: ms(call_timeout_ms, d.call),
                setup: ms(setup_timeout_ms, d.setup),
                memory: memory_mib.map_or(d.memory, |m| m << 20),
            };
            let bytes = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("{}: cannot read the policy: {e}", file.display()))?;
            let (loaded, times) = runtime.load_timed(&file, &bytes, &params, limits)?;
            let policy = loaded.instantiate();
            let ours = if loaded.reads_load() {
                "segwlb:policy/log and load (reads the live load)"
            } else {
                "segwlb:policy/log"
            };
            let imports = if loaded.wasi_imports().is_empty() {
                format!("{ours} only")
            } else {
                format!(
                    "{ours} and {} WASI 0.2 interfaces, linked deny-all",
                    loaded.wasi_imports().len()
                )
            };
            eprintln!(
                "{}: {} KiB, contract {}; imports {imports}\n  \
                 {} with {:?} in {:.1} ms; started (instantiate + configure) in {:.2} ms; \
                 linear memory {:.1} MiB of {} MiB allowed",
                file.display(),
                bytes.len() >> 10,
                loaded.version().package(),
                match times.origin {
                    Origin::Cache => "taken from the compiled-policy cache",
                    Origin::Compiled => "compiled",
                    Origin::Rebuilt => "compiled (the cache entry was bad and is replaced)",
                },
                runtime.compiler(),
                times.compile.as_secs_f64() * 1e3,
                times.start.as_secs_f64() * 1e3,
                policy.memory_bytes() as f64 / f64::from(1 << 20),
                limits.memory >> 20,
            );
            let report = check::run(
                Box::new(policy),
                check::Options {
                    gateways,
                    tunnels,
                    seed,
                },
            );
            print_out(&report)?;
            Ok(if report.violations().is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn ctl(socket: &Path, command: CtlCommand) -> anyhow::Result<ExitCode> {
    use segwlb::control::ctl::{request, Request};
    let (req, json) = match command {
        CtlCommand::Status { json, tunnels, top } => (Request::Status { tunnels, top }, json),
        CtlCommand::Policy {
            command:
                CtlPolicy::Use {
                    name,
                    rebalance,
                    graceful,
                },
        } => (
            Request::PolicyUse {
                name,
                rebalance,
                graceful,
            },
            false,
        ),
        CtlCommand::Save => (Request::Save, false),
        CtlCommand::Role { role } => (Request::Role { role }, false),
        CtlCommand::Gateway { command } => (
            match command {
                CtlGateway::Drain { name, graceful } => Request::GatewayDrain {
                    name,
                    draining: true,
                    graceful,
                },
                CtlGateway::Undrain { name } => Request::GatewayDrain {
                    name,
                    draining: false,
                    graceful: false,
                },
                CtlGateway::Weight { name, weight } => Request::GatewayWeight { name, weight },
                CtlGateway::Add {
                    name,
                    interface,
                    weight,
                    capacity,
                    throughput,
                    mac,
                } => Request::GatewayAdd {
                    name,
                    interface,
                    weight,
                    capacity,
                    throughput: throughput.unwrap_or(0),
                    mac,
                },
                CtlGateway::Remove {
                    name,
                    graceful: true,
                } => {
                    let done = segwlb::control::ctl::remove_gracefully(socket, &name, &mut |m| {
                        eprintln!("{m}")
                    })?;
                    print_out(&done.map_err(|e| anyhow::anyhow!(e))?)?;
                    return Ok(ExitCode::SUCCESS);
                }
                CtlGateway::Remove { name, .. } => Request::GatewayRemove { name },
                CtlGateway::Throughput { name, throughput } => {
                    Request::GatewayThroughput { name, throughput }
                }
                CtlGateway::Report { name, utilization } => {
                    Request::GatewayReport { name, utilization }
                }
            },
            false,
        ),
    };
    let response = request(socket, &req)?;
    if !response.ok {
        bail!("{}", response.message);
    }
    match response.status {
        Some(status) if json => print_out(&serde_json::to_string_pretty(&status)?)?,
        Some(status) => print_out(&status.render().trim_end())?,
        None => print_out(&response.message)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn lab(config: &Path, command: LabCommand) -> anyhow::Result<ExitCode> {
    use segwlb::lab::{report, topology, LabConfig};
    let cfg = LabConfig::load(config)?;
    match command {
        LabCommand::Up { scenario, tunnels } => {
            let started = std::time::Instant::now();
            let exe = std::env::current_exe().context("cannot find the segwlb binary")?;
            let cfg = match scenario {
                None => cfg,
                Some(path) => {
                    let (s, shares) =
                        segwlb::lab::compare::lab_scenario(&Scenario::resolve(&path)?, tunnels);
                    let policy = cfg.balancer.policy.clone();
                    segwlb::lab::compare::lab_config(&cfg, &s, shares, &policy)
                }
            };
            let (state, times) = topology::up(&cfg, &exe)?;
            print_out(&format_args!(
                "lab {:?} up in {:.2} s (topology {:.2} s, {} charons {:.2} s, balancer {:.2} s): {} initiators, {} segws, policy {}; work dir {}",
                state.prefix,
                started.elapsed().as_secs_f64(),
                times.topology.as_secs_f64(),
                state.charons(),
                times.charons.as_secs_f64(),
                times.balancer.as_secs_f64(),
                state.initiators.len(),
                state.segws.len(),
                state.policy,
                state.work.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Run {
            json,
            sas,
            scenario,
        } => {
            let mut state = topology::State::load(&cfg.work_dir())?;
            if let Some(path) = scenario {
                let played = segwlb::lab::compare::play(
                    &mut state,
                    &Scenario::resolve(&path)?,
                    &mut |line| eprintln!("{line}"),
                )?;
                eprint!("{played}");
            }
            let r = report::run(&state)?;
            if json {
                print_out(&serde_json::to_string_pretty(&r)?)?;
            } else {
                let full = sas || r.tunnels.len() <= segwlb::lab::report::FULL_TABLE_UP_TO;
                print_out(&r.render_with(full).trim_end())?;
            }
            Ok(if r.summary.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LabCommand::Status => {
            print_out(&topology::status(&cfg)?.trim_end())?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Compare {
            scenario,
            policies,
            tunnels,
            out,
        } => {
            let scenario = match scenario {
                Some(path) => Scenario::resolve(&path)?,
                None => Scenario::builtin_lab(),
            };
            let policies = if policies.is_empty() {
                wasm_files_in(&cfg.balancer.policy_dir)?
            } else {
                policies
            };
            let exe = std::env::current_exe().context("cannot find the segwlb binary")?;
            let done = segwlb::lab::compare::compare(
                &cfg,
                &scenario,
                tunnels,
                &policies,
                &exe,
                &out,
                &mut |line| eprintln!("{line}"),
            )?;
            print_out(&done.text.trim_end())?;
            eprintln!("wrote {} and {}", done.json.display(), done.html.display());
            Ok(if done.exact {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LabCommand::Down => {
            let removed = topology::down(&cfg)?;
            print_out(&format_args!(
                "lab {:?} down: {} processes stopped, {} namespaces removed{}",
                cfg.lab.prefix,
                removed.processes,
                removed.namespaces.len(),
                removed
                    .work_dir
                    .map(|w| format!(", {} removed", w.display()))
                    .unwrap_or_default()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_params(raw: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    raw.iter()
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .with_context(|| format!("--param {p:?}: expected KEY=VALUE"))?;
            Ok((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

fn compare(
    mut policies: Vec<String>,
    dir: &Path,
    native: bool,
    scenario: &Scenario,
    options: compare::Options,
    out: &Path,
) -> anyhow::Result<()> {
    if policies.is_empty() {
        policies = if native {
            native_policies::SHIPPED
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            wasm_files_in(dir)?
        };
    }
    let runtime = Runtime::new().map_err(anyhow::Error::msg)?;
    let mut runs = Vec::new();
    for spec in &policies {
        let mut progress = Progress::new(spec, scenario.steps);
        let run = if native {
            native_policies::shipped(spec, &[]).map_err(anyhow::Error::msg)?;
            compare::run(
                scenario,
                options,
                &mut || native_policies::shipped(spec, &[]).expect("checked above"),
                &mut |step| progress.step(step),
            )
        } else {
            let path = if spec.contains('/') || spec.ends_with(".wasm") {
                PathBuf::from(spec)
            } else {
                dir.join(format!("{spec}.wasm"))
            };
            let loaded = runtime.load(&path, &[], Limits::default())?;
            compare::run(
                scenario,
                options,
                &mut || Box::new(loaded.instantiate()) as Box<dyn Policy>,
                &mut |step| progress.step(step),
            )
        };
        progress.done();
        runs.push(run);
    }
    print_out(&compare::Table {
        scenario,
        seed: options.seed,
        runs: &runs,
    })?;
    let (json, html) = compare::report::write(out, scenario, options.seed, &runs)
        .with_context(|| format!("{}: cannot write the report", out.display()))?;
    eprintln!("wrote {} and {}", json.display(), html.display());
    Ok(())
}

/// A one-line progress report on stderr, only when it is a terminal and
/// the run takes long enough to wonder about.
struct Progress<'a> {
    policy: &'a str,
    steps: u32,
    started: std::time::Instant,
    shown: bool,
}

impl<'a> Progress<'a> {
    fn new(policy: &'a str, steps: u32) -> Self {
        Progress {
            policy,
            steps,
            started: std::time::Instant::now(),
            shown: false,
        }
    }

    fn step(&mut self, step: u32) {
        use std::io::IsTerminal;
        if self.started.elapsed().as_millis() > 500 && std::io::stderr().is_terminal() {
            eprint!("\r{}: step {}/{}  ", self.policy, step + 1, self.steps);
            self.shown = true;
        }
    }

    fn done(&self) {
        if self.shown {
            eprintln!(
                "\r{}: {} steps in {:.1} s   ",
                self.policy,
                self.steps,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

/// Policy names in `dir`, sorted.
fn wasm_files_in(dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!(
            "{}: cannot list policies (run from the repository root, or pass --policy-dir)",
            dir.display()
        )
    })?;
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    if names.is_empty() {
        bail!(
            "{}: no policies (*.wasm). `cargo build` builds the shipped ones; it needs a wasm32 toolchain \
             (scripts/setup.sh installs one)",
            dir.display()
        );
    }
    Ok(names)
}

/// Print a result; a reader that went away (`| head`) is not an error.
fn print_out(what: &dyn std::fmt::Display) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{what}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
