//! Hostile policies, built here from WAT: each gets a clear error at load or
//! a counted fallback at call time; the host never panics or hangs, and
//! every tunnel still gets a gateway that takes tunnels.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{answers, component, component_with, policy_wat, CONTRACT_WIT, OK};
use segwlb::policy::wasm::{Limits, LoadError, Runtime};
use segwlb::policy::{FallbackReason, Gateway, Guarded, Load, Opener, Policy, TunnelKey};
use segwlb::time::Timestamp;

fn limits() -> Limits {
    Limits {
        call: Duration::from_millis(20),
        setup: Duration::from_millis(200),
        memory: 1 << 20,
    }
}

fn gateways() -> Vec<Gateway> {
    (1..=3)
        .map(|id| Gateway {
            id,
            name: format!("segw{id}"),
            weight: 1,
            healthy: id != 2,
            draining: false,
            tunnels: 0,
            capacity: 0,
            throughput: 0,
        })
        .collect()
}

fn key(n: u32) -> TunnelKey {
    TunnelKey {
        peer: IpAddr::V4(Ipv4Addr::from(0xc633_6400 + n)),
        peer_port: 500,
        vip: IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1)),
        ike_spi: Some(0x1122_3344_5566_7788),
        opened_by: Opener::Ike,
    }
}

fn load(
    runtime: &Runtime,
    name: &str,
    bytes: &[u8],
) -> Result<segwlb::policy::wasm::Loaded, LoadError> {
    runtime.load_bytes(Path::new(name), bytes, &[], limits())
}

/// Place `n` tunnels through the guard; every one must land on a gateway
/// that takes tunnels. Returns the guard for its counters.
fn place(runtime: &Runtime, name: &str, choose_body: &str, n: u32) -> Guarded {
    let loaded = load(
        runtime,
        name,
        &component(CONTRACT_WIT, &policy_wat(OK, choose_body)),
    )
    .expect("loads");
    let mut guarded: Guarded = Guarded::new(Box::new(loaded.instantiate()));
    guarded.set_gateways(gateways(), Timestamp::ZERO);
    for i in 0..n {
        let choice = guarded
            .choose(
                &key(i),
                &Load::default(),
                Timestamp::from_millis(u64::from(i)),
            )
            .expect("a gateway");
        assert!(
            [1, 3].contains(&choice.gateway),
            "{name}: tunnel {i} sent to {}",
            choice.gateway
        );
    }
    guarded
}

#[test]
fn a_well_behaved_wat_policy_is_obeyed() {
    // The scaffolding itself is sound: without hostility, no fallback.
    let runtime = Runtime::new().unwrap();
    let g = place(&runtime, "good.wasm", &answers(3), 20);
    assert_eq!(g.stats().fallbacks_total(), 0);
    assert_eq!(g.stats().decisions, 20);
}

#[test]
fn endless_loop_is_stopped_by_the_deadline() {
    let runtime = Runtime::new().unwrap();
    let started = Instant::now();
    let g = place(
        &runtime,
        "loop.wasm",
        "(loop $spin (br $spin)) (unreachable)",
        3,
    );
    let took = started.elapsed();
    // The first call runs to the 20 ms budget (2 ms ticks); the breaker
    // then keeps the policy off the next two: one deadline, not three.
    assert_eq!(g.stats().fallbacks_for(FallbackReason::Timeout), 1);
    assert_eq!(g.stats().fallbacks_for(FallbackReason::BreakerOpen), 2);
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[test]
fn memory_bomb_hits_the_cap() {
    let runtime = Runtime::new().unwrap();
    let bomb = "(loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) (unreachable)";
    let g = place(&runtime, "bomb.wasm", bomb, 4);
    // Three failures in a row open the breaker: the fourth is not asked.
    assert_eq!(g.stats().fallbacks_for(FallbackReason::MemoryCap), 3);
    assert_eq!(g.stats().fallbacks_for(FallbackReason::BreakerOpen), 1);
}

#[test]
fn trap_falls_back_and_the_next_call_gets_a_fresh_instance() {
    let runtime = Runtime::new().unwrap();
    let g = place(&runtime, "trap.wasm", "(unreachable)", 5);
    // Each of the first three on a fresh instance; then the breaker opens.
    assert_eq!(g.stats().fallbacks_for(FallbackReason::Trap), 3);
    assert_eq!(g.stats().fallbacks_for(FallbackReason::BreakerOpen), 2);
    assert_eq!(g.stats().failed_pushes, 0);
}

#[test]
fn bogus_and_unavailable_answers_fall_back() {
    let runtime = Runtime::new().unwrap();
    let g = place(&runtime, "bogus.wasm", &answers(999), 4);
    assert_eq!(g.stats().fallbacks_for(FallbackReason::UnknownGateway), 4);
    // segw2 is down in the set.
    let g = place(&runtime, "down.wasm", &answers(2), 4);
    assert_eq!(
        g.stats()
            .fallbacks_for(FallbackReason::GatewayNotTakingTunnels),
        4
    );
    // option::none at the return area.
    let none = "(i32.store8 (i32.const 32) (i32.const 0)) (i32.const 32)";
    let g = place(&runtime, "none.wasm", none, 4);
    assert_eq!(g.stats().fallbacks_for(FallbackReason::NoAnswer), 4);
}

#[test]
fn a_trap_mid_stream_does_not_lose_the_good_answers_after_it() {
    // Answers 3, except it traps when the peer's last octet is 5.
    let body = "(if (i32.eq (i32.and (i32.wrap_i64 (local.get 1)) (i32.const 255)) (i32.const 5)) \
                  (then (unreachable))) (call $some (i32.const 3))";
    let runtime = Runtime::new().unwrap();
    let loaded = load(
        &runtime,
        "flaky.wasm",
        &component(CONTRACT_WIT, &policy_wat(OK, body)),
    )
    .unwrap();
    let mut policy = loaded.instantiate();
    policy.set_gateways(&gateways()).unwrap();
    let answers: Vec<_> = (0..8)
        .map(|i| policy.choose(&key(i), &Load::default()).map_err(|_| ()))
        .collect();
    assert_eq!(answers[5], Err(()));
    assert!(
        answers
            .iter()
            .enumerate()
            .all(|(i, a)| i == 5 || *a == Ok(Some(3))),
        "{answers:?}"
    );
    assert_eq!(policy.restarts(), 1);
}

#[test]
fn missing_export_is_named_at_load() {
    let wit = CONTRACT_WIT.replace("choose: func(key: tunnel-key) -> option<u32>;", "");
    let wat = policy_wat(OK, &answers(1)).replace(
        "(func (export \"segwlb:policy/balancer@0.3.0#choose\")",
        "(func $unexported",
    );
    let err = load(
        &Runtime::new().unwrap(),
        "nochoose.wasm",
        &component(&wit, &wat),
    )
    .err()
    .expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, LoadError::MissingExport { .. }), "{msg}");
    assert!(
        msg.contains("nochoose.wasm") && msg.contains("`choose`"),
        "{msg}"
    );
}

#[test]
fn wrong_contract_version_is_named_at_load() {
    let wit = CONTRACT_WIT.replace(
        "package segwlb:policy@0.3.0;",
        "package segwlb:policy@0.4.0;",
    );
    let wat = policy_wat(OK, &answers(1)).replace("@0.3.0#", "@0.4.0#");
    let err = load(
        &Runtime::new().unwrap(),
        "future.wasm",
        &component(&wit, &wat),
    )
    .err()
    .expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, LoadError::WrongVersion { .. }), "{msg}");
    assert!(
        msg.contains("future.wasm")
            && msg.contains("segwlb:policy@0.4.0")
            && msg.contains("segwlb:policy@0.1.0, segwlb:policy@0.2.0, segwlb:policy@0.3.0"),
        "{msg}"
    );
}

#[test]
fn an_import_the_host_does_not_offer_is_refused() {
    let wit = CONTRACT_WIT.replace(
        "world policy {",
        "interface clock { now: func() -> u64; }\nworld policy {\n    import clock;",
    );
    let wat = policy_wat(OK, "(drop (call $now)) (call $some (i32.const 1))").replace(
        "(module",
        "(module\n  (import \"segwlb:policy/clock@0.3.0\" \"now\" (func $now (result i64)))",
    );
    let err = load(
        &Runtime::new().unwrap(),
        "clock.wasm",
        &component(&wit, &wat),
    )
    .err()
    .expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, LoadError::ForbiddenImport { .. }), "{msg}");
    assert!(msg.contains("segwlb:policy/clock@0.3.0"), "{msg}");
}

#[test]
fn rejected_parameters_are_a_load_error_with_the_policys_message() {
    let wat = policy_wat("(call $rejected)", &answers(1));
    let err = load(
        &Runtime::new().unwrap(),
        "picky.wasm",
        &component(CONTRACT_WIT, &wat),
    )
    .err()
    .unwrap();
    assert_eq!(
        err.to_string(),
        "picky.wasm: rejected its parameters: no such knob: speed"
    );
}

#[test]
fn core_modules_and_garbage_are_refused_with_what_they_are() {
    let runtime = Runtime::new().unwrap();
    let core = wat::parse_str(policy_wat(OK, &answers(1))).unwrap();
    assert!(matches!(
        load(&runtime, "core.wasm", &core),
        Err(LoadError::CoreModule { .. })
    ));
    let err = load(&runtime, "junk.wasm", b"definitely not wasm")
        .err()
        .unwrap();
    assert!(
        matches!(err, LoadError::Invalid { .. }) && err.to_string().starts_with("junk.wasm: "),
        "{err}"
    );
    let err = runtime
        .load(Path::new("/nonexistent/p.wasm"), &[], limits())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("/nonexistent/p.wasm: cannot read"),
        "{err}"
    );
}

#[test]
fn a_policy_looping_in_configure_is_refused_at_load_not_hung() {
    let wat = policy_wat("(loop $spin (br $spin)) (unreachable)", &answers(1));
    let started = Instant::now();
    let err = load(
        &Runtime::new().unwrap(),
        "stuck.wasm",
        &component(CONTRACT_WIT, &wat),
    )
    .err()
    .unwrap();
    assert!(matches!(err, LoadError::Start { .. }), "{err}");
    assert!(err.to_string().contains("time budget"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// The parts of WASI 0.2 the tests below import, as a guest's toolchain
/// would declare them.
const WASI_IO: &str = "package wasi:io@0.2.0;
interface poll { resource pollable { block: func(); } }";
const WASI_CLOCKS: &str = "package wasi:clocks@0.2.0;
interface monotonic-clock {
    use wasi:io/poll@0.2.0.{pollable};
    now: func() -> u64;
    subscribe-duration: func(when: u64) -> pollable;
}";
const WASI_CLI: &str = "package wasi:cli@0.2.0;
interface environment { get-environment: func() -> list<tuple<string, string>>; }";
const WASI_HTTP: &str = "package wasi:http@0.2.0;
interface outgoing-handler { handle: func() -> u32; }";

/// A policy importing `imports` (interfaces of `deps`), its `choose` body
/// given, and the WAT imports it calls.
fn wasi_guest(deps: &[&str], imports: &[&str], wat_imports: &str, choose: &str) -> Vec<u8> {
    let uses: String = imports
        .iter()
        .map(|i| format!("    import {i};\n"))
        .collect();
    let wit = CONTRACT_WIT.replace("world policy {", &format!("world policy {{\n{uses}"));
    let wat = policy_wat(OK, choose).replace("(module", &format!("(module\n{wat_imports}"));
    component_with(deps, &wit, &wat)
}

#[test]
fn a_wasi_guest_is_linked_and_sees_an_empty_environment() {
    let bytes = wasi_guest(
        &[WASI_CLI],
        &["wasi:cli/environment@0.2.0"],
        r#"(import "wasi:cli/environment@0.2.0" "get-environment" (func $env (param i32)))"#,
        // (ptr, len) of the list at 48: gateway 1 if empty, 3 if not.
        "(call $env (i32.const 48))
         (if (result i32) (i32.eqz (i32.load (i32.const 52)))
           (then (call $some (i32.const 1)))
           (else (call $some (i32.const 3))))",
    );
    std::env::set_var("SEGWLB_VISIBLE_TO_GUESTS", "no");
    let runtime = Runtime::new().unwrap();
    let loaded = load(&runtime, "env.wasm", &bytes).expect("WASI guests load");
    assert_eq!(loaded.wasi_imports(), ["wasi:cli/environment@0.2.0"]);
    let mut g: Guarded = Guarded::new(Box::new(loaded.instantiate()));
    g.set_gateways(gateways(), Timestamp::ZERO);
    let c = g
        .choose(&key(1), &Load::default(), Timestamp::ZERO)
        .unwrap();
    assert_eq!(
        (c.gateway, c.fallback),
        (1, None),
        "the guest saw variables"
    );
}

#[test]
fn a_wasi_guest_sleeping_an_hour_returns_at_once_and_sees_the_hour_pass() {
    let bytes = wasi_guest(
        &[WASI_IO, WASI_CLOCKS],
        &["wasi:clocks/monotonic-clock@0.2.0"],
        r#"(import "wasi:clocks/monotonic-clock@0.2.0" "now" (func $now (result i64)))
  (import "wasi:clocks/monotonic-clock@0.2.0" "subscribe-duration" (func $sub (param i64) (result i32)))
  (import "wasi:io/poll@0.2.0" "[method]pollable.block" (func $block (param i32)))
  (import "wasi:io/poll@0.2.0" "[resource-drop]pollable" (func $drop (param i32)))
  (global $t0 (mut i64) (i64.const 0))
  (global $p (mut i32) (i32.const 0))"#,
        // An hour's sleep; gateway 1 if the guest's clock moved an hour.
        "(global.set $t0 (call $now))
         (global.set $p (call $sub (i64.const 3600000000000)))
         (call $block (global.get $p))
         (call $drop (global.get $p))
         (if (result i32) (i64.ge_u (i64.sub (call $now) (global.get $t0)) (i64.const 3600000000000))
           (then (call $some (i32.const 1)))
           (else (call $some (i32.const 3))))",
    );
    let runtime = Runtime::new().unwrap();
    let loaded = load(&runtime, "sleepy.wasm", &bytes).expect("loads");
    let mut g: Guarded = Guarded::new(Box::new(loaded.instantiate()));
    g.set_gateways(gateways(), Timestamp::ZERO);
    let t = Instant::now();
    let c = g
        .choose(&key(1), &Load::default(), Timestamp::ZERO)
        .unwrap();
    assert_eq!((c.gateway, c.fallback), (1, None));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "slept {:?}",
        t.elapsed()
    );
}

#[test]
fn a_wasi_interface_the_host_does_not_link_is_refused_by_name() {
    let bytes = wasi_guest(
        &[WASI_HTTP],
        &["wasi:http/outgoing-handler@0.2.0"],
        r#"(import "wasi:http/outgoing-handler@0.2.0" "handle" (func $h (result i32)))"#,
        "(drop (call $h)) (call $some (i32.const 1))",
    );
    let err = load(&Runtime::new().unwrap(), "http.wasm", &bytes)
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, LoadError::ForbiddenImport { .. }), "{msg}");
    assert!(msg.contains("wasi:http/outgoing-handler@0.2.0"), "{msg}");
}

/// What the host's log shows while `f` runs on this thread (tracing's
/// default formatter, no colours), as one string.
fn host_log_during(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let text = buffer.0.lock().unwrap().clone();
    String::from_utf8(text).unwrap()
}

#[test]
fn a_guest_that_logs_then_traps_is_rate_limited_per_policy_and_cannot_forge_lines() {
    // Each call logs one line (with a newline and an escape sequence in
    // it) and traps: every call then runs on a fresh instance. The rate
    // limit is the policy's, not each instance's, and the line stays one
    // line of the host's log.
    let forged = "hello\\0aERROR segwlb: forged line\\1b[2J";
    let wat = policy_wat(
        OK,
        "(call $log (i32.const 2) (i32.const 128) (i32.const 35)) (unreachable)",
    )
    .replace(
        "(module",
        "(module\n  (import \"segwlb:policy/log@0.3.0\" \"log\" (func $log (param i32 i32 i32)))",
    )
    .replace(
        "(data (i32.const 64)",
        &format!("(data (i32.const 128) \"{forged}\")\n  (data (i32.const 64)"),
    );
    let runtime = Runtime::new().unwrap();
    let loaded = load(&runtime, "chatty.wasm", &component(CONTRACT_WIT, &wat)).unwrap();
    let mut policy = loaded.instantiate();
    policy.set_gateways(&gateways()).unwrap();
    let shown = host_log_during(|| {
        for i in 0..200 {
            assert!(policy.choose(&key(i), &Load::default()).is_err());
        }
    });
    assert_eq!(policy.restarts(), 200);
    assert!(
        !shown.lines().any(|l| l.starts_with("ERROR")) && !shown.contains('\x1b'),
        "the guest forged a log line or sent an escape sequence:\n{shown}"
    );
    let hellos = shown.matches("hello").count();
    assert!(
        (1..=20).contains(&hellos),
        "{hellos} of 200 lines reached the host's log"
    );
}

// The compiled-policy cache: deserializing an entry maps native code into
// the balancer, so where another user could put an entry, none is used.

/// Another user's id, for directories "someone else" owns (the tests that
/// need it run as root, as the network tests do; elsewhere they say so).
const NOBODY: u32 = 65_534;

fn chown(path: &Path, uid: u32) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; chown has no other precondition.
    unsafe { libc::chown(c.as_ptr(), uid, uid) == 0 }
}

fn cached_runtime(dir: &Path) -> Runtime {
    let mut runtime = Runtime::new().unwrap();
    runtime.set_cache(Some(segwlb::policy::wasm::Cache::at(dir)));
    runtime
}

/// What the first tunnel gets from the policy, and where its code came from.
fn first_answer(runtime: &Runtime, bytes: &[u8]) -> (Option<u32>, segwlb::policy::wasm::Origin) {
    let (loaded, times) = runtime
        .load_timed(Path::new("cached.wasm"), bytes, &[], limits())
        .unwrap();
    let mut p = loaded.instantiate();
    p.set_gateways(&gateways()).unwrap();
    (p.choose(&key(1), &Load::default()).unwrap(), times.origin)
}

#[test]
fn a_cache_in_a_directory_of_ours_is_used_even_under_a_sticky_tmp() {
    use segwlb::policy::wasm::Origin;
    let dir = tempfile::tempdir().unwrap();
    let runtime = cached_runtime(&dir.path().join("a/b/cache"));
    let bytes = component(CONTRACT_WIT, &policy_wat(OK, &answers(1)));
    assert_eq!(first_answer(&runtime, &bytes), (Some(1), Origin::Compiled));
    assert_eq!(first_answer(&runtime, &bytes), (Some(1), Origin::Cache));
}

#[test]
fn a_cache_under_a_directory_another_user_can_write_is_not_used() {
    use segwlb::policy::wasm::Origin;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    if !chown(&shared, NOBODY) {
        eprintln!("skipped: needs root to give a directory to another user");
        return;
    }
    // Ours and only ours, but its parent is another user's: they can move
    // it aside and put theirs in its place.
    let runtime = cached_runtime(&shared.join("cache"));
    let bytes = component(CONTRACT_WIT, &policy_wat(OK, &answers(1)));
    assert_eq!(first_answer(&runtime, &bytes).1, Origin::Compiled);
    assert_eq!(
        first_answer(&runtime, &bytes).1,
        Origin::Compiled,
        "an entry under another user's directory was deserialized"
    );
}

/// How another user who owns the cache directory's parent swaps in their
/// own directory while the balancer loads.
#[derive(Clone, Copy, Debug)]
enum Swap {
    /// `rename(2)` with RENAME_EXCHANGE, ours and theirs, again and again.
    ExchangeDirectories,
    /// The cache path is a symlink, pointed at ours, then at theirs.
    FlipSymlink,
}

/// The planted entry: another policy's machine code (answers 3) under the
/// name of the real one's (answers 1), with a checksum that matches.
fn planted_race(swap: Swap) {
    use std::os::unix::ffi::OsStrExt;
    let real = component(CONTRACT_WIT, &policy_wat(OK, &answers(1)));
    let evil = component(CONTRACT_WIT, &policy_wat(OK, &answers(3)));
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    let (ours, theirs) = (shared.join("ours"), shared.join("theirs"));
    std::fs::create_dir_all(&theirs).unwrap();
    // Our entry, then theirs: the other policy compiled by the same
    // segwlb, renamed to the real one's key.
    let cache = match swap {
        Swap::ExchangeDirectories => ours.clone(),
        Swap::FlipSymlink => shared.join("cache"),
    };
    first_answer(&cached_runtime(&ours), &real);
    let elsewhere = dir.path().join("elsewhere");
    first_answer(&cached_runtime(&elsewhere), &evil);
    for entry in std::fs::read_dir(&ours).unwrap().flatten() {
        let name = entry.file_name();
        let ext = Path::new(&name).extension().unwrap().to_owned();
        let from = std::fs::read_dir(&elsewhere)
            .unwrap()
            .flatten()
            .find(|e| e.path().extension() == Some(&ext))
            .unwrap()
            .path();
        std::fs::copy(from, theirs.join(&name)).unwrap();
    }
    if let Swap::FlipSymlink = swap {
        std::os::unix::fs::symlink("ours", &cache).unwrap();
    }
    for p in [&shared, &theirs] {
        if !chown(p, NOBODY) {
            eprintln!("skipped: needs root to give a directory to another user");
            return;
        }
    }
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        let (a, b, link, tmp) = (
            c(&ours),
            c(&theirs),
            c(&shared.join("cache")),
            c(&shared.join("cache.tmp")),
        );
        let (ours, theirs) = (c(Path::new("ours")), c(Path::new("theirs")));
        std::thread::spawn(move || {
            let mut flip = false;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: NUL-terminated paths; the calls have no other
                // precondition, and a failure is just a missed swap.
                unsafe {
                    match swap {
                        Swap::ExchangeDirectories => {
                            libc::renameat2(
                                libc::AT_FDCWD,
                                a.as_ptr(),
                                libc::AT_FDCWD,
                                b.as_ptr(),
                                libc::RENAME_EXCHANGE,
                            );
                        }
                        Swap::FlipSymlink => {
                            let target = if flip { &theirs } else { &ours };
                            libc::unlink(tmp.as_ptr());
                            libc::symlink(target.as_ptr(), tmp.as_ptr());
                            libc::rename(tmp.as_ptr(), link.as_ptr());
                        }
                    }
                }
                flip = !flip;
            }
        })
    };
    let runtime = cached_runtime(&cache);
    let mut planted = 0;
    let t = Instant::now();
    let tries = (0..300)
        .take_while(|_| {
            if first_answer(&runtime, &real).0 == Some(3) {
                planted += 1;
            }
            planted == 0 && t.elapsed() < Duration::from_secs(20)
        })
        .count();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    attacker.join().unwrap();
    assert_eq!(
        planted, 0,
        "{swap:?}: the planted machine code ran after {tries} loads"
    );
}

#[test]
fn a_planted_entry_swapped_in_by_directory_exchange_never_runs() {
    planted_race(Swap::ExchangeDirectories);
}

#[test]
fn a_planted_entry_swapped_in_by_symlink_never_runs() {
    planted_race(Swap::FlipSymlink);
}

#[test]
fn a_corrupt_truncated_or_linked_cache_entry_is_rebuilt_not_used() {
    use segwlb::policy::wasm::Origin;
    let dir = tempfile::tempdir().unwrap();
    let runtime = cached_runtime(dir.path());
    let bytes = component(CONTRACT_WIT, &policy_wat(OK, &answers(1)));
    assert_eq!(first_answer(&runtime, &bytes).1, Origin::Compiled);
    let entry = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .unwrap();
    let good = std::fs::read(&entry).unwrap();
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x40;
    std::fs::write(&entry, &flipped).unwrap();
    assert_eq!(first_answer(&runtime, &bytes), (Some(1), Origin::Rebuilt));
    assert_eq!(first_answer(&runtime, &bytes).1, Origin::Cache);
    std::fs::write(&entry, &good[..100]).unwrap();
    assert_eq!(first_answer(&runtime, &bytes), (Some(1), Origin::Rebuilt));
    // An entry that is a link (to a copy of itself elsewhere): not opened.
    let elsewhere = dir.path().join("../elsewhere.cwasm");
    std::fs::copy(&entry, &elsewhere).unwrap();
    std::fs::remove_file(&entry).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &entry).unwrap();
    assert_eq!(first_answer(&runtime, &bytes), (Some(1), Origin::Rebuilt));
    assert!(!entry.is_symlink(), "the link was replaced by an entry");
    std::fs::remove_file(elsewhere).unwrap();
}

/// `policy_wat` with `extra` more memories of no pages, `$m1`…, beside
/// the one the contract's calls use.
fn with_memories(extra: usize, choose_body: &str) -> Vec<u8> {
    let memories: String = (1..=extra)
        .map(|i| format!("  (memory $m{i} 0)\n"))
        .collect();
    let wat = policy_wat(OK, choose_body)
        .replace("  (global $bump", &format!("{memories}  (global $bump"));
    component(CONTRACT_WIT, &wat)
}

#[test]
fn the_memory_cap_is_for_all_of_a_guests_memories_together() {
    // Seven more memories (eight is the most), each grown to 15/16 of the
    // 1 MiB cap: 6.6 MiB in all. Gateway 1 if every growth was granted.
    let grows: String = (1..=7)
        .map(|i| format!("(if (i32.eq (memory.grow $m{i} (i32.const 15)) (i32.const -1)) (then (return (call $some (i32.const 3))))) "))
        .collect();
    let bytes = with_memories(7, &format!("{grows} (call $some (i32.const 1))"));
    let runtime = Runtime::new().unwrap();
    let loaded = load(&runtime, "many-memories.wasm", &bytes).expect("loads");
    let mut g: Guarded = Guarded::new(Box::new(loaded.instantiate()));
    g.set_gateways(gateways(), Timestamp::ZERO);
    let c = g
        .choose(&key(1), &Load::default(), Timestamp::ZERO)
        .unwrap();
    assert_eq!(
        c.fallback,
        Some(FallbackReason::MemoryCap),
        "the guest held 6.6 MiB under a cap of 1 MiB (answered {})",
        c.gateway
    );
}

#[test]
fn a_guest_with_sixty_memories_is_refused_at_start() {
    let bytes = with_memories(60, &answers(1));
    let err = load(&Runtime::new().unwrap(), "hydra.wasm", &bytes)
        .err()
        .expect("refused");
    assert!(matches!(err, LoadError::Start { .. }), "{err}");
    assert!(err.to_string().contains("memory count"), "{err}");
}

/// The host's resident memory, in bytes.
fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn a_guest_hoarding_pollables_is_stopped_at_a_small_bound() {
    // 50,000 sleeps of a nanosecond per call, none of them dropped: each
    // is an entry in the host's WASI resource table, outside the cap on
    // the guest's own memory.
    let bytes = wasi_guest(
        &[WASI_IO, WASI_CLOCKS],
        &["wasi:clocks/monotonic-clock@0.2.0"],
        r#"(import "wasi:clocks/monotonic-clock@0.2.0" "subscribe-duration" (func $sub (param i64) (result i32)))
  (global $n (mut i32) (i32.const 0))"#,
        "(global.set $n (i32.const 50000))
         (loop $hoard
           (drop (call $sub (i64.const 1)))
           (global.set $n (i32.sub (global.get $n) (i32.const 1)))
           (br_if $hoard (global.get $n)))
         (call $some (i32.const 1))",
    );
    let runtime = Runtime::new().unwrap();
    let generous = Limits {
        call: Duration::from_secs(5),
        ..limits()
    };
    let loaded = runtime
        .load_bytes(Path::new("hoarder.wasm"), &bytes, &[], generous)
        .expect("loads");
    let mut p = loaded.instantiate();
    p.set_gateways(&gateways()).unwrap();
    let before = resident();
    let mut failed = 0;
    for i in 0..12 {
        if p.choose(&key(i), &Load::default()).is_err() {
            failed += 1;
        }
    }
    // What the host paid, for the record: resident memory is the whole
    // test process's, so it is shown, not asserted (alone: ~21 MiB held
    // when the table's bound was wasmtime's 1,000,000 entries, ~1 MiB at
    // ours).
    let grew = resident().saturating_sub(before);
    eprintln!(
        "host memory grew {:.1} MiB; {failed} of 12 calls failed",
        grew as f64 / f64::from(1 << 20)
    );
    // Each call hoards 100,000 table entries (a pollable and what it
    // wraps): far past the bound, so each fails at once, and its instance
    // (with its table) is dropped.
    assert_eq!(failed, 12, "calls hoarding 50,000 pollables succeeded");
}

// The worker's time: a guest may cost it its deadline once in a while,
// never a steady share of it, in `choose` or in `set-gateways`.

/// WAT that counts `$spin` down from `n`: busy work of a fixed length.
fn spin(n: u32) -> String {
    format!(
        "(global.set $spin (i32.const {n}))
         (loop $s (global.set $spin (i32.sub (global.get $spin) (i32.const 1))) (br_if $s (global.get $spin)))"
    )
}

/// A policy whose `choose` runs `choose_body` and whose `set-gateways`
/// runs `set_body` first (both may use `spin`).
fn spinning_policy(choose_body: &str, set_body: &str) -> Vec<u8> {
    let wat = policy_wat(OK, choose_body)
        .replace(
            "  (global $bump",
            "  (global $spin (mut i32) (i32.const 0))\n  (global $bump",
        )
        .replace(
            ";; the host allocated the list with cabi_realloc; nothing here keeps it",
            set_body,
        );
    component(CONTRACT_WIT, &wat)
}

/// Limits under which busy work of some milliseconds is never a timeout.
fn roomy() -> Limits {
    Limits {
        call: Duration::from_millis(500),
        setup: Duration::from_secs(2),
        memory: 1 << 20,
    }
}

/// Busy work of ~10 ms here (0.8 ns an iteration, measured).
const SPIN: u32 = 12_000_000;

#[test]
fn a_guest_spending_milliseconds_per_call_is_kept_to_a_share_of_the_worker() {
    // Never a deadline: ~10 ms of busy work, then an answer. A hundred new
    // tunnels in a tenth of a second would take the worker a whole second.
    let bytes = spinning_policy(&format!("{} {}", spin(SPIN), answers(1)), "");
    let runtime = Runtime::new().unwrap();
    let loaded = runtime
        .load_bytes(Path::new("busy.wasm"), &bytes, &[], roomy())
        .unwrap();
    let mut g: Guarded = Guarded::new(Box::new(loaded.serve().unwrap()));
    g.set_gateways(gateways(), Timestamp::ZERO);
    let t = Instant::now();
    for i in 0..100 {
        let now = Timestamp::from_millis(u64::from(i));
        g.choose(&key(i), &Load::default(), now).unwrap();
    }
    let took = t.elapsed();
    let asked = g.stats().decisions - g.stats().fallbacks_for(FallbackReason::BreakerOpen);
    eprintln!("the guest was asked {asked} times of 100 ({took:?})");
    assert!(g.stats().breaker_trips >= 1, "{:?}", g.stats());
    assert!(asked <= 50, "asked {asked} times of 100 ({took:?})");
}

#[test]
fn a_guest_that_traps_on_every_call_is_not_asked_on_every_call() {
    let runtime = Runtime::new().unwrap();
    let g = place(&runtime, "trap.wasm", "(unreachable)", 100);
    let s = g.stats();
    assert!(s.breaker_trips >= 1, "{s:?}");
    assert!(
        s.fallbacks_for(FallbackReason::Trap) <= 5,
        "asked {} times of 100, trapping every time",
        s.fallbacks_for(FallbackReason::Trap)
    );
}

#[test]
fn after_a_trap_the_spare_takes_over_with_the_set_already_pushed() {
    // `set-gateways` takes ~10 ms; `choose` traps. On the data path the
    // spare instance takes over after each trap, and must already have
    // the set: replaying it is not the worker's job.
    let bytes = spinning_policy("(unreachable)", &spin(SPIN));
    let runtime = Runtime::new().unwrap();
    let loaded = runtime
        .load_bytes(Path::new("trap-slow-set.wasm"), &bytes, &[], roomy())
        .unwrap();
    let mut p = loaded.serve().unwrap();
    let t = Instant::now();
    p.set_gateways(&gateways()).unwrap();
    let push = t.elapsed();
    let mut took = Vec::new();
    let mut traps = 0;
    for i in 0..12 {
        // Time for the spare to start and take the set.
        std::thread::sleep(push * 3 + Duration::from_millis(30));
        let t = Instant::now();
        let r = p.choose(&key(i), &Load::default());
        took.push(t.elapsed());
        traps += u32::from(matches!(r, Err(segwlb::policy::CallError::Trap(_))));
    }
    let typical = median(took);
    eprintln!("a push takes {push:?}; a trapping call typically {typical:?}; {traps} traps");
    assert!(traps >= 8, "the spare rarely served: {traps} traps of 12");
    // Each call after the first is on a spare: had it to be told the set
    // here, every one would take as long as a push.
    assert!(
        typical < push / 2,
        "a call typically took {typical:?}: the set ({push:?}) was replayed on the worker"
    );
}

/// The middle of `times`: what a call typically costs, whatever a busy
/// machine does to one of them.
fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

#[test]
fn an_instance_holding_much_memory_is_dropped_off_the_worker() {
    // 128 MiB written in `configure` (off the worker), then every call
    // traps: the trapping call must not pay for unmapping it.
    let configure = "(drop (memory.grow (i32.const 2048)))
         (memory.fill (i32.const 0) (i32.const 1) (i32.const 134217728))
         (call $ok)";
    let bytes = component(CONTRACT_WIT, &policy_wat(configure, "(unreachable)"));
    let limits = Limits {
        memory: 256 << 20,
        ..roomy()
    };
    let runtime = Runtime::new().unwrap();
    let loaded = runtime
        .load_bytes(Path::new("heavy.wasm"), &bytes, &[], limits)
        .unwrap();
    let mut took = Vec::new();
    for i in 0..4 {
        let mut p = loaded.serve().unwrap();
        p.set_gateways(&gateways()).unwrap();
        // Its spare ready too (it holds as much).
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        assert!(p.choose(&key(i), &Load::default()).is_err());
        took.push(t.elapsed());
        // The old policy goes when a swap replaces it: on the worker too.
        let t = Instant::now();
        drop(p);
        took.push(t.elapsed());
    }
    let typical = median(took);
    eprintln!("a trap or a drop typically takes {typical:?}");
    // Unmapping 128 MiB here took the worker ~25 ms a time.
    assert!(
        typical < Duration::from_millis(8),
        "the worker typically spent {typical:?} dropping an instance"
    );
}
