//! Shared by the integration tests: where the built policies are, and how to
//! make a policy component from hand-written WAT.
#![allow(dead_code)]

pub mod socket;

use std::path::PathBuf;
use std::process::Command;

/// The repository's `policies/` directory, where `cargo build` puts the
/// shipped policies.
pub fn policies_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// The balancer's `[dataplane] fast_path` the network tests run with:
/// `SEGWLB_TEST_FAST_PATH` (`off`, `xdp` or `auto`), or `None` for
/// `segwlb run`'s default. CI runs them with the default (the fast path
/// where the kernel allows) and again with `off`.
pub fn fast_path_under_test() -> Option<&'static str> {
    let v = std::env::var("SEGWLB_TEST_FAST_PATH").ok()?;
    let mode = ["off", "xdp", "auto"]
        .into_iter()
        .find(|m| *m == v)
        .unwrap_or_else(|| panic!("SEGWLB_TEST_FAST_PATH={v}: expected off, xdp or auto"));
    Some(mode)
}

/// Whether a test of the XDP program itself (`what`) can run here: a
/// build with the program, root, and what namespaces need. Without them
/// it says so and skips, unless SEGWLB_REQUIRE_NETNS is set: then it fails.
pub fn xdp_can_run(what: &str) -> bool {
    let missing = if segwlb::io::xdp::PROGRAM.is_none() {
        Some("this build has no XDP program (clang, libbpf-dev)".to_string())
    } else {
        netns_missing()
    };
    runs_here(what, missing)
}

/// Whether the network-namespace tests can run here: root, and what
/// namespaces need (iproute2, ethtool). Without them they say so and
/// skip, unless SEGWLB_REQUIRE_NETNS is set: then they fail.
pub fn netns_can_run() -> bool {
    runs_here("network-namespace tests", netns_missing())
}

fn netns_missing() -> Option<String> {
    use segwlb::lab::netns;
    if netns::is_root() {
        netns::prerequisites().err()
    } else {
        Some("not root".to_string())
    }
}

/// `what` runs unless something it needs is `missing`: then it is
/// skipped, said, or, when SEGWLB_REQUIRE_NETNS is set (CI), failed.
pub fn runs_here(what: &str, missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(why) if std::env::var_os("SEGWLB_REQUIRE_NETNS").is_some() => {
            panic!("{what} cannot run: {why}")
        }
        Some(why) => {
            eprintln!("skipped: {what} cannot run here ({why})");
            false
        }
    }
}

/// Run `cmd` to the end: whether it succeeded, its stdout, its stderr.
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A shipped policy's component; fails with what to do when it is missing.
pub fn shipped(name: &str) -> PathBuf {
    let path = policies_dir().join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: the host's build script builds it. Install a wasm32 toolchain \
         (`rustup target add wasm32-unknown-unknown`, or `apt-get install rustc-web rust-web-src lld-19`) \
         and run `cargo build` again",
        path.display()
    );
    path
}

/// The contract as this checkout defines it.
pub const CONTRACT_WIT: &str = include_str!("../../wit/policy.wit");

/// Componentise a core module written in WAT against `wit` (world `policy`).
pub fn component(wit: &str, wat: &str) -> Vec<u8> {
    component_with(&[], wit, wat)
}

/// As [`component`], with other WIT packages (`deps`, one package each)
/// that `wit`'s world may import.
pub fn component_with(deps: &[&str], wit: &str, wat: &str) -> Vec<u8> {
    let mut resolve = wit_parser::Resolve::default();
    for (i, dep) in deps.iter().enumerate() {
        resolve
            .push_str(format!("dep{i}.wit"), dep)
            .expect("dependency WIT parses");
    }
    let pkg = resolve
        .push_str("policy.wit", wit)
        .expect("test WIT parses");
    let world = resolve
        .select_world(&[pkg], Some("policy"))
        .expect("world `policy`");
    let mut module = wat::parse_str(wat).expect("test WAT parses");
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
        false,
    )
    .expect("metadata embeds");
    let mut encoder = wit_component::ComponentEncoder::default();
    encoder.validate(true);
    encoder
        .module(&module)
        .expect("module matches the test WIT");
    encoder.encode().expect("component encodes")
}

/// A policy module in WAT, by the canonical ABI of `wit/policy.wit`, whose
/// `choose` runs `choose_body` (which must leave an i32 pointer to an
/// `option<u32>` on the stack; `(call $some (i32.const N))` answers N).
/// `configure_body` likewise returns a pointer to a `result<_, string>`.
pub fn policy_wat(configure_body: &str, choose_body: &str) -> String {
    format!(
        r#"(module
  (memory (export "memory") 2)
  (global $bump (mut i32) (i32.const 4096))
  (data (i32.const 64) "no such knob: speed")
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.and (i32.add (i32.add (global.get $bump) (local.get 3)) (i32.const 7)) (i32.const -8)))
    (local.get $p))
  ;; result<_, string>: ok
  (func $ok (result i32)
    (i32.store8 (i32.const 16) (i32.const 0))
    (i32.const 16))
  ;; result<_, string>: err("no such knob: speed")
  (func $rejected (result i32)
    (i32.store8 (i32.const 16) (i32.const 1))
    (i32.store (i32.const 20) (i32.const 64))
    (i32.store (i32.const 24) (i32.const 19))
    (i32.const 16))
  ;; option<u32>: some(id)
  (func $some (param $id i32) (result i32)
    (i32.store8 (i32.const 32) (i32.const 1))
    (i32.store (i32.const 36) (local.get $id))
    (i32.const 32))
  (func (export "segwlb:policy/balancer@0.3.0#configure") (param i32 i32) (result i32)
    {configure_body})
  (func (export "segwlb:policy/balancer@0.3.0#set-gateways") (param i32 i32)
    ;; the host allocated the list with cabi_realloc; nothing here keeps it
    (global.set $bump (i32.const 4096)))
  (func (export "segwlb:policy/balancer@0.3.0#choose")
    (param i32 i64 i64 i32 i32 i64 i64 i32 i64 i32) (result i32)
    {choose_body})
)"#
    )
}

pub fn answers(id: u32) -> String {
    format!("(call $some (i32.const {id}))")
}

pub const OK: &str = "(call $ok)";
