//! Does a component speak the contract? Names first, so the usual mistakes
//! get a message a person can act on (the full type check follows when the
//! component is linked), and what it imports decides how it is linked.

use std::path::{Path, PathBuf};

use wasmtime::component::types::ComponentItem;
use wasmtime::component::Component;
use wasmtime::Engine;

use super::versions::{Version, LOAD};
use super::wasi;
use crate::policy::CONTRACT;

const EXPORTED_FUNCS: [&str; 3] = ["configure", "set-gateways", "choose"];

/// The versions this host speaks, for messages.
fn spoken() -> String {
    Version::ALL.map(Version::package).join(", ")
}

/// What a checked component is, and needs from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imports {
    /// The contract version it was built against.
    pub version: Version,
    /// Whether it reads the live load (imports `load`, 0.2.0 on).
    pub reads_load: bool,
    /// The WASI 0.2 interfaces it imports (linked deny-all), by full name;
    /// empty for a component that imports only the contract's interfaces.
    pub wasi: Vec<String>,
}

impl Imports {
    pub fn needs_wasi(&self) -> bool {
        !self.wasi.is_empty()
    }
}

/// A policy file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: cannot read the policy: {err}{}", path.display(), build_hint(path))]
    Read { path: PathBuf, err: std::io::Error },
    #[error(
        "{}: is a core wasm module, not a component: componentise it \
         (segwlb's `cargo build` does this for plugins/, `segwlb policy build` for Python \
         and JavaScript; or `wasm-tools component new`)",
        path.display()
    )]
    CoreModule { path: PathBuf },
    #[error("{}: not a valid wasm component: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{}: does not export `segwlb:policy/balancer` (its exports: {found})",
        path.display()
    )]
    NoBalancer { path: PathBuf, found: String },
    #[error(
        "{}: built against contract {found}; this segwlb speaks {spoken}: \
         rebuild it against wit/policy.wit ({CONTRACT})",
        path.display(), spoken = spoken()
    )]
    WrongVersion { path: PathBuf, found: String },
    #[error("{}: `{export}` lacks `{missing}` (the contract needs configure, set-gateways, choose)", path.display())]
    MissingExport {
        path: PathBuf,
        export: &'static str,
        missing: String,
    },
    #[error(
        "{}: imports `{import}`, but a policy may import only its contract version's \
         segwlb:policy interfaces (log; load from 0.2.0) and the WASI 0.2 interfaces io, \
         clocks, random, cli, filesystem and sockets (linked with nothing granted)",
        path.display()
    )]
    ForbiddenImport { path: PathBuf, import: String },
    #[error("{}: does not match {CONTRACT}: {reason}", path.display())]
    Mismatch { path: PathBuf, reason: String },
    #[error("{}: could not start: {reason}", path.display())]
    Start { path: PathBuf, reason: String },
    #[error("{}: rejected its parameters: {message}", path.display())]
    Params { path: PathBuf, message: String },
}

fn build_hint(path: &Path) -> &'static str {
    if path.starts_with("policies") || path.parent().is_some_and(|p| p.ends_with("policies")) {
        " (the shipped policies are built by `cargo build`; see README)"
    } else {
        ""
    }
}

/// Check `component`'s exports and imports against the contract.
pub fn check(engine: &Engine, path: &Path, component: &Component) -> Result<Imports, LoadError> {
    let ty = component.component_type();
    let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    let found = Version::ALL
        .into_iter()
        .find_map(|v| Some((v, ty.get_export(engine, v.export())?)));
    let Some((version, balancer)) = found else {
        let other_version = exports
            .iter()
            .find(|e| e.starts_with("segwlb:policy/balancer@"));
        return Err(match other_version {
            Some(found) => LoadError::WrongVersion {
                path: path.into(),
                found: found.replace("/balancer", ""),
            },
            None => LoadError::NoBalancer {
                path: path.into(),
                found: if exports.is_empty() {
                    "none".into()
                } else {
                    exports.join(", ")
                },
            },
        });
    };
    let ComponentItem::ComponentInstance(instance) = balancer.ty else {
        return Err(LoadError::Mismatch {
            path: path.into(),
            reason: format!("`{}` is not an instance", version.export()),
        });
    };
    for func in EXPORTED_FUNCS {
        if instance.get_export(engine, func).is_none() {
            return Err(LoadError::MissingExport {
                path: path.into(),
                export: version.export(),
                missing: func.into(),
            });
        }
    }
    // After the exports: a component of another contract version also
    // imports that version's types, and the version is the news.
    let mut imports = Imports {
        version,
        reads_load: false,
        wasi: Vec::new(),
    };
    for (import, _) in ty.imports(engine) {
        if wasi::is_wasi_import(import) {
            imports.wasi.push(import.to_string());
        } else if LOAD.contains(&import) && version.ours().contains(&import) {
            imports.reads_load = true;
        } else if !version.ours().contains(&import) {
            return Err(LoadError::ForbiddenImport {
                path: path.into(),
                import: import.into(),
            });
        }
    }
    Ok(imports)
}
