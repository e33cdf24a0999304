//! Builds every policy in `plugins/` into a component in `policies/`, and
//! the XDP fast path (`xdp/fastpath.c`) with clang for the BPF target.
//!
//! So `cargo build`, `cargo test` and `cargo run -- compare` never need a
//! separate step, and editing a plugin then running `cargo build` is the
//! whole loop (a running segwlb hot-reloads the new file).
//!
//! Two ways to get a wasm32 standard library, detected in this order:
//! 1. rustup's target (`rustup target add wasm32-unknown-unknown`): the
//!    ordinary route, a plain `cargo build --target wasm32-unknown-unknown`;
//! 2. Debian's `rustc-web` + `rust-web-src` + `lld-19`: std is built from
//!    source with `-Zbuild-std` by /usr/bin/rustc, linked by wasm-ld.
//!
//! Neither: a warning naming what to install; the host still builds (it can
//! load policies built elsewhere and has native twins of the shipped ones).
//!
//! `SEGWLB_SKIP_POLICY_BUILD=1` skips all of this.
//!
//! Guests build into `target/wasm`, never the host's own output directories:
//! the two routes may use different compilers.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

// The numbers the core's parser and the XDP program share, from the one
// place that states them: rendered as the program's `segwlb_rules.h`.
#[path = "src/packet/wire.rs"]
mod wire;

const TARGET: &str = "wasm32-unknown-unknown";
const INSTALL_HINT: &str =
    "install a wasm32 toolchain: `rustup target add wasm32-unknown-unknown`, \
     or where rustup cannot fetch targets (Debian 12 with bookworm-backports, Debian 13): \
     `apt-get install rustc-web rust-web-src lld-19`";

enum Route {
    Rustup,
    DebianBuildStd { rustc: PathBuf, linker: PathBuf },
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    build_fast_path(&manifest);
    let root = manifest.parent().unwrap().to_path_buf();
    let plugins = root.join("plugins");
    for watched in ["plugins", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=SEGWLB_SKIP_POLICY_BUILD");
    println!("cargo:rerun-if-env-changed=SEGWLB_GUEST_RUSTC");
    if env::var_os("SEGWLB_SKIP_POLICY_BUILD").is_some_and(|v| v != "0") {
        return;
    }

    let Some(route) = detect() else {
        println!("cargo:warning=segwlb: policies/*.wasm not rebuilt: {INSTALL_HINT}");
        return;
    };
    let target_dir = root.join("target").join("wasm");
    if let Err(e) = build_guests(&route, &plugins, &target_dir) {
        // A broken plugin must fail loudly: tests would otherwise run
        // against stale policies.
        panic!(
            "segwlb: building the policies in {} failed: {e}",
            plugins.display()
        );
    }
    let out = target_dir.join(TARGET).join("release");
    if let Err(e) = componentize_all(&out, &root.join("policies")) {
        panic!("segwlb: turning policies into components failed: {e}");
    }
}

fn detect() -> Option<Route> {
    // The rustc cargo is building the host with (rustup's proxy or not).
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    if let Some(libdir) =
        capture(Command::new(&rustc).args(["--print", "target-libdir", "--target", TARGET]))
    {
        if has_std(Path::new(libdir.trim())) {
            return Some(Route::Rustup);
        }
    }
    let rustc = env::var_os("SEGWLB_GUEST_RUSTC")
        .map_or_else(|| PathBuf::from("/usr/bin/rustc"), PathBuf::from);
    let sysroot = capture(Command::new(&rustc).args(["--print", "sysroot"]))?;
    let std_src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/std");
    if !std_src.is_dir() {
        println!(
            "cargo:warning=segwlb: {} has no std sources at {} (package rust-web-src)",
            rustc.display(),
            std_src.display()
        );
        return None;
    }
    let linker = find_wasm_ld()?;
    Some(Route::DebianBuildStd { rustc, linker })
}

fn has_std(libdir: &Path) -> bool {
    fs::read_dir(libdir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("libstd-"))
    })
}

fn find_wasm_ld() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
        .map(|e| e.path().join("bin/wasm-ld"))
        .filter(|p| p.exists())
        .collect();
    // Newest LLVM first.
    candidates.sort();
    candidates.reverse();
    candidates.into_iter().next().or_else(|| {
        env::var_os("PATH").and_then(|path| {
            env::split_paths(&path)
                .map(|d| d.join("wasm-ld"))
                .find(|p| p.exists())
        })
    })
}

fn capture(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn build_guests(route: &Route, plugins: &Path, target_dir: &Path) -> Result<(), String> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    scrub_cargo_env(&mut cmd);
    cmd.current_dir(plugins)
        .args(["build", "--release", "--workspace", "--target", TARGET])
        .arg("--target-dir")
        .arg(target_dir);
    match route {
        Route::Rustup => {}
        Route::DebianBuildStd { rustc, linker } => {
            cmd.env("RUSTC", rustc)
                .env("RUSTC_BOOTSTRAP", "1")
                .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER", linker)
                .arg("-Zbuild-std=std,panic_abort");
        }
    }
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// The nested cargo must not inherit the outer build's settings (its target
/// directory, its rustc wrapper such as clippy-driver, its flags, its
/// jobserver), only how to reach the registry.
fn scrub_cargo_env(cmd: &mut Command) {
    const KEEP: [&str; 5] = [
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
    ];
    for (key, _) in env::vars_os() {
        let k = key.to_string_lossy();
        let cargo_var = k.starts_with("CARGO_") && !KEEP.iter().any(|keep| k.starts_with(keep));
        let build_var = matches!(
            k.as_ref(),
            "RUSTC"
                | "RUSTC_WRAPPER"
                | "RUSTC_WORKSPACE_WRAPPER"
                | "RUSTDOC"
                | "RUSTFLAGS"
                | "RUSTC_BOOTSTRAP"
                | "MAKEFLAGS"
                | "MFLAGS"
                | "OUT_DIR"
                | "TARGET"
                | "HOST"
                | "PROFILE"
                | "OPT_LEVEL"
                | "DEBUG"
                | "NUM_JOBS"
                | "RUSTC_LINKER"
        );
        if cargo_var || build_var {
            cmd.env_remove(&key);
        }
    }
}

/// Each `NAME.wasm` core module (cdylib) becomes `policies/NAME.wasm`, with
/// the crate's underscores turned back into the package's hyphens. Files are
/// only written when their bytes change, so a watching segwlb is not told to
/// reload a policy that did not change.
fn componentize_all(out: &Path, policies: &Path) -> Result<(), String> {
    fs::create_dir_all(policies).map_err(|e| format!("{}: {e}", policies.display()))?;
    let modules = fs::read_dir(out).map_err(|e| format!("{}: {e}", out.display()))?;
    for entry in modules.flatten() {
        let path = entry.path();
        if path.extension() != Some(OsStr::new("wasm")) {
            continue;
        }
        let module = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut encoder = wit_component::ComponentEncoder::default();
        encoder.validate(true);
        encoder
            .module(&module)
            .map_err(|e| format!("{}: {e:#}", path.display()))?;
        let component = encoder
            .encode()
            .map_err(|e| format!("{}: {e:#}", path.display()))?;
        let name = path
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .replace('_', "-");
        let dest = policies.join(format!("{name}.wasm"));
        if fs::read(&dest).ok().as_deref() != Some(&component[..]) {
            // Write then rename, so a watcher never sees half a file.
            let tmp = policies.join(format!(".{name}.wasm.tmp"));
            fs::write(&tmp, &component).map_err(|e| format!("{}: {e}", tmp.display()))?;
            fs::rename(&tmp, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
        }
    }
    Ok(())
}

/// `xdp/fastpath.c` → `$OUT_DIR/fastpath.o` (with `segwlb_rules.h`, the
/// shared rules of `src/packet/wire.rs`), and `cfg(segwlb_xdp)` for the
/// code that embeds it. Without clang or the libbpf headers: a warning, and
/// a host that runs on AF_PACKET alone. A program that does not compile
/// fails the build: it is ours.
fn build_fast_path(manifest: &Path) {
    println!("cargo::rustc-check-cfg=cfg(segwlb_xdp)");
    let source = manifest.join("xdp").join("fastpath.c");
    println!("cargo:rerun-if-changed={}", source.display());
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("src/packet/wire.rs").display()
    );
    let have_clang = Command::new("clang")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_clang || !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        println!(
            "cargo:warning=segwlb: no XDP fast path in this build: install clang and libbpf-dev \
             (scripts/setup.sh does)"
        );
        return;
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let rules = out_dir.join("segwlb_rules.h");
    fs::write(&rules, wire::c_header())
        .unwrap_or_else(|e| panic!("segwlb: writing {}: {e}", rules.display()));
    let out = out_dir.join("fastpath.o");
    // <linux/bpf.h> includes <asm/types.h>, which Debian keeps under the
    // host's multiarch directory; the BPF target has none of its own.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let status = Command::new("clang")
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I{multiarch}"))
        .arg(format!("-I{}", out_dir.display()))
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => println!("cargo:rustc-cfg=segwlb_xdp"),
        other => panic!("segwlb: compiling {} failed: {other:?}", source.display()),
    }
}
