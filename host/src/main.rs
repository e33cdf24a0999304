//! The `segwlb` command line: parse, dispatch, report errors. The work is in
//! the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use segwlb::check;
use segwlb::policy::wasm::{Limits, Runtime};

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
    /// Work with policy components.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
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
        Command::Policy {
            command:
                PolicyCommand::Check {
                    file,
                    gateways,
                    tunnels,
                    params,
                    seed,
                },
        } => {
            if gateways == 0 {
                bail!("--gateways must be at least 1");
            }
            let params = parse_params(&params)?;
            let runtime = Runtime::new().map_err(anyhow::Error::msg)?;
            let loaded = runtime.load(&file, &params, Limits::default())?;
            let report = check::run(
                Box::new(loaded.instantiate()),
                check::Options {
                    gateways,
                    tunnels,
                    seed,
                },
            );
            println!("{report}");
            Ok(if report.violations().is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
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
