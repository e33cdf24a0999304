//! Network-namespace plumbing shared by the live tests, the throughput
//! benchmark and `segwlb lab`: namespaces and veth pairs that clean up after
//! themselves, and running code inside a namespace ([`netns`]); and the lab
//! itself: real strongSwan initiators and segws in namespaces with
//! `segwlb run` balancing between them ([`topology`] builds and removes it,
//! [`report`] drives the tunnels and says where they landed).

pub mod churn;
pub mod compare;
pub mod config;
pub mod drive;
pub mod initiate;
pub mod netns;
pub mod probe;
pub mod report;
pub mod strongswan;
pub mod topology;
pub mod traffic;

use std::path::PathBuf;

pub use config::LabConfig;
pub use report::Report;

/// What went wrong in the lab, naming the step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the lab cannot run here: {0}")]
    Prerequisites(String),
    #[error("{0}")]
    State(String),
    #[error("{what} failed: {detail}")]
    Step { what: String, detail: String },
}

pub type Result<T> = std::result::Result<T, Error>;
