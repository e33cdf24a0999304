use super::*;
use std::net::Ipv4Addr;

/// A policy directory holding `round-robin.wasm` (only its presence is
/// checked at parse time).
fn policies() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("round-robin.wasm"), b"not checked here").unwrap();
    dir
}

fn good(dir: &Path) -> String {
    format!(
        r#"
[balancer]
uplink = "up0"
vip = "10.2.2.1"
proxy_uplink = ["10.2.2.1/32"]
proxy_gateways = ["10.1.0.0/16"]
control_socket = "run/segwlb.sock"
metrics = "127.0.0.1:9469"

[policy]
name = "round-robin"
dir = "{}"
params = {{ start = 2, label = "x" }}

[health]
interval_ms = 200
down_after = 2

[[gateway]]
name = "segw1"
interface = "gw1"
mac = "02:00:5e:00:00:01"

[[gateway]]
name = "segw2"
interface = "gw2"
weight = 2
drain = true
spi_mask = "0xff00000000000000"
spi_label = "0x0200000000000000"
spi_min = "0xc2000000"
spi_max = 0xc2ffffff
"#,
        dir.display()
    )
}

fn parse(text: &str) -> Result<RunConfig, ConfigError> {
    RunConfig::parse(text, Path::new("lb.toml"), Path::new("/etc/segwlb"))
}

fn error(text: &str) -> String {
    parse(text).expect_err("should be refused").to_string()
}

#[test]
fn a_full_config_parses_with_defaults_filled_in() {
    let dir = policies();
    let c = parse(&good(dir.path())).unwrap();
    assert_eq!(c.uplink.value, "up0");
    assert_eq!(c.vips, vec![IpAddr::V4(Ipv4Addr::new(10, 2, 2, 1))]);
    assert_eq!(c.control_socket, Path::new("/etc/segwlb/run/segwlb.sock"));
    assert_eq!(c.metrics, Some("127.0.0.1:9469".parse().unwrap()));
    assert_eq!(c.policy.file(), dir.path().join("round-robin.wasm"));
    assert_eq!(
        c.policy.params,
        vec![("label".into(), "x".into()), ("start".into(), "2".into())]
    );
    let h = c.health.unwrap();
    assert_eq!(
        (h.interval, h.down_after, h.up_after),
        (
            Duration::from_millis(200),
            2,
            HealthConfig::default().up_after
        )
    );
    assert_eq!(c.gateways.len(), 2);
    assert_eq!(c.gateways[0].mac, Some([2, 0, 0x5e, 0, 0, 1]));
    assert_eq!(c.gateways[0].weight, 1);
    let g2 = &c.gateways[1];
    assert!(g2.drain);
    assert_eq!(g2.weight, 2);
    assert_eq!(g2.steering.esp_range, Some((0xc200_0000, 0xc2ff_ffff)));
    assert!(g2.steering.owns_ike_spi(0x0211_2233_4455_6677));
    assert!(!g2.steering.owns_ike_spi(0x0311_2233_4455_6677));
    assert_eq!(c.max_tunnels, 1 << 20);
}

#[test]
fn the_shipped_example_configs_are_valid() {
    let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&config_dir).unwrap() {
        let path = entry.unwrap().path();
        // lab*.toml are `segwlb lab` files (checked in lab::config).
        let lab = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("lab"));
        if path.extension().is_some_and(|e| e == "toml") && !lab {
            // Their policy dir is ../policies; make sure a policy is there
            // even before the first build.
            let text = std::fs::read_to_string(&path).unwrap();
            let dir = policies();
            let text = text.replace("\"../policies\"", &format!("\"{}\"", dir.path().display()));
            let text = text
                .replace("consistent-hash\"", "round-robin\"")
                .replace("weighted\"", "round-robin\"");
            RunConfig::parse(&text, &path, &config_dir)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 1, "no example config in config/");
}

#[test]
fn a_vip_outside_the_proxied_prefixes_is_refused_at_its_line() {
    let dir = policies();
    let text = good(dir.path()).replace("vip = \"10.2.2.1\"", "vip = \"10.2.3.1\"");
    assert_eq!(
        error(&text),
        "lb.toml:4:7: balancer.vip: the VIP 10.2.3.1 is outside the prefixes proxied on the \
         uplink (10.2.2.1/32): initiators' ARP for it would go unanswered; add it to \
         balancer.proxy_uplink"
    );
}

#[test]
fn an_ipv6_vip_alone_or_beside_an_ipv4_one_is_taken_and_nonsense_is_named() {
    let dir = policies();
    let good = good(dir.path());
    let with = |vip: &str, proxied: &str| {
        good.replace("vip = \"10.2.2.1\"", &format!("vip = {vip}"))
            .replace(
                "proxy_uplink = [\"10.2.2.1/32\"]",
                &format!("proxy_uplink = {proxied}"),
            )
    };
    let v6: IpAddr = "2001:db8:2::1".parse().unwrap();
    let c = parse(&with("\"2001:db8:2::1\"", "[\"2001:db8:2::/64\"]")).unwrap();
    assert_eq!(c.vips, vec![v6]);
    // Dual stack, written in either order: IPv4 first.
    let dual = "[\"10.2.2.1/32\", \"2001:db8:2::/64\"]";
    let c = parse(&with("[\"2001:db8:2::1\", \"10.2.2.1\"]", dual)).unwrap();
    assert_eq!(c.vips, vec!["10.2.2.1".parse::<IpAddr>().unwrap(), v6]);
    assert_eq!(
        error(&with(
            "[\"10.2.2.1\", \"2001:db8:2::1\"]",
            "[\"10.2.2.1/32\"]"
        )),
        "lb.toml:4:7: balancer.vip: the VIP 2001:db8:2::1 is outside the prefixes proxied on \
         the uplink (10.2.2.1/32): initiators' neighbour solicitations for it would go \
         unanswered; add it to balancer.proxy_uplink"
    );
    assert_eq!(
        error(&with("[\"10.2.2.1\", \"10.2.2.2\"]", dual)),
        "lb.toml:4:7: balancer.vip: 2 VIPs given: at most one IPv4 and one IPv6 address \
         (every segw owns them all)"
    );
    assert_eq!(
        error(&with("\"2001:db8::zz\"", dual)),
        "lb.toml:4:7: balancer.vip: `2001:db8::zz` is not an IPv4 or IPv6 address"
    );
    assert_eq!(
        error(&with("[]", dual)),
        "lb.toml:4:7: balancer.vip: give the VIP: an address, or one IPv4 and one IPv6 address"
    );
}

#[test]
fn a_duplicate_gateway_is_refused_naming_the_second() {
    let dir = policies();
    let text = good(dir.path()).replace("name = \"segw2\"", "name = \"segw1\"");
    let e = error(&text);
    assert!(
        e.starts_with("lb.toml:25:8: gateway[2].name: a gateway named `segw1`"),
        "{e}"
    );
}

#[test]
fn an_interface_used_twice_is_refused() {
    let dir = policies();
    let text = good(dir.path()).replace("interface = \"gw2\"", "interface = \"up0\"");
    let e = error(&text);
    assert!(
        e.starts_with("lb.toml:26:13: gateway[2].interface: interface `up0` is already used"),
        "{e}"
    );
}

#[test]
fn a_missing_policy_file_is_refused_listing_what_is_there() {
    let dir = policies();
    let text = good(dir.path()).replace("name = \"round-robin\"", "name = \"maglev\"");
    let e = error(&text);
    assert!(
        e.starts_with("lb.toml:11:8: policy.name: no policy file "),
        "{e}"
    );
    assert!(
        e.ends_with("maglev.wasm (policies there: round-robin)"),
        "{e}"
    );
}

#[test]
fn unknown_fields_and_bad_values_name_their_field() {
    let dir = policies();
    let cases = [
        ("drain = true", "drian = true", "gateway.drian"),
        (
            "mac = \"02:00:5e:00:00:01\"",
            "mac = \"02:00:5e:00:01\"",
            "gateway[1].mac",
        ),
        (
            "\"10.1.0.0/16\"",
            "\"10.1.0.0/33\"",
            "balancer.proxy_gateways",
        ),
        (
            "metrics = \"127.0.0.1:9469\"",
            "metrics = \"localhost\"",
            "balancer.metrics",
        ),
        ("spi_max = 0xc2ffffff\n", "\n", "gateway[2].spi_min"),
    ];
    for (from, to, field) in cases {
        let text = good(dir.path()).replace(from, to);
        let e = error(&text);
        assert!(e.contains(&format!(": {field}: ")), "{to}: {e}");
        assert!(e.starts_with("lb.toml:"), "{e}");
    }
}

#[test]
fn interfaces_missing_on_this_host_are_named_with_their_line() {
    let dir = policies();
    let c = parse(&good(dir.path())).unwrap();
    let present: Vec<String> = ["lo", "up0", "gw1"].map(String::from).to_vec();
    let e = c.check_interfaces(&present).unwrap_err().to_string();
    assert_eq!(
        e,
        "lb.toml:26:13: gateway[2].interface: no interface `gw2` here (interfaces: lo, up0, gw1)"
    );
    let all: Vec<String> = ["up0", "gw1", "gw2"].map(String::from).to_vec();
    c.check_interfaces(&all).unwrap();
}

#[test]
fn macs_parse_and_print() {
    assert_eq!(parse_mac("02:00:5E:00:00:0a"), Some([2, 0, 0x5e, 0, 0, 10]));
    assert_eq!(parse_mac("02-00-5e-00-00-0a"), Some([2, 0, 0x5e, 0, 0, 10]));
    assert_eq!(parse_mac("02:00:5e:00:00"), None);
    assert_eq!(parse_mac("02:00:5e:00:00:0a:01"), None);
    assert_eq!(parse_mac("2:00:5e:00:00:0a"), None);
    assert_eq!(format_mac(&[2, 0, 0x5e, 0, 0, 10]), "02:00:5e:00:00:0a");
}

#[test]
fn one_policy_gets_its_own_limits_over_the_policy_tables() {
    let dir = policies();
    let text = good(dir.path()).replace(
        "params = {",
        "memory_mib = 48\nsetup_timeout_ms = 900\ncache_dir = \"cache\"\n\
         limits.py-heavy = { memory_mib = 128, call_timeout_ms = 50 }\nparams = {",
    );
    let c = parse(&text).unwrap();
    let base = c.policy.limits_for("round-robin");
    assert_eq!(base.memory, 48 << 20);
    assert_eq!(base.setup, Duration::from_millis(900));
    assert_eq!(base.call, Limits::default().call);
    let heavy = c.policy.limits_for("py-heavy");
    assert_eq!(heavy.memory, 128 << 20);
    assert_eq!(heavy.call, Duration::from_millis(50));
    // What it does not say, it takes from [policy].
    assert_eq!(heavy.setup, Duration::from_millis(900));
    assert_eq!(c.policy.cache, Some(PathBuf::from("/etc/segwlb/cache")));
    let off = parse(&good(dir.path()).replace("params = {", "cache = false\nparams = {")).unwrap();
    assert_eq!(off.policy.cache, None);
}

#[test]
fn bad_limits_are_named_with_their_table() {
    let dir = policies();
    let with = |extra: &str| {
        error(&good(dir.path()).replace("params = {", &format!("{extra}\nparams = {{")))
    };
    let e = with("limits.py = { memory_mib = 0 }");
    assert!(
        e.contains("policy.limits.py.memory_mib") && e.contains("between 1 and 4096"),
        "{e}"
    );
    let e = with("call_timeout_ms = 0");
    assert!(
        e.contains("policy.call_timeout_ms") && e.contains("at least 1"),
        "{e}"
    );
    let e = with("limits.py = { memory = 3 }");
    assert!(e.contains("memory"), "{e}");
}

#[test]
fn metrics_stay_on_loopback_unless_told_and_control_groups_resolve() {
    let dir = policies();
    let open = good(dir.path()).replace("127.0.0.1:9469", "0.0.0.0:9469");
    let e = error(&open);
    assert!(
        e.contains(": balancer.metrics: `0.0.0.0:9469` is not a loopback address"),
        "{e}"
    );
    let told = open.replace(
        "metrics = \"0.0.0.0:9469\"",
        "metrics = \"0.0.0.0:9469\"\nmetrics_remote = true",
    );
    assert_eq!(
        parse(&told).unwrap().metrics,
        Some("0.0.0.0:9469".parse().unwrap())
    );
    let ipv6 = good(dir.path()).replace("127.0.0.1:9469", "[::1]:9469");
    assert!(parse(&ipv6).is_ok(), "::1 is loopback");

    assert_eq!(
        parse(&good(dir.path())).unwrap().control_groups,
        Groups::default()
    );
    let groups = good(dir.path()).replace(
        "control_socket = \"run/segwlb.sock\"",
        "control_socket = \"run/segwlb.sock\"\ncontrol_group = \"root\"\nstatus_group = \"65534\"",
    );
    assert_eq!(
        parse(&groups).unwrap().control_groups,
        Groups {
            control: Some(0),
            status: Some(65534)
        }
    );
    let unknown = groups.replace("\"root\"", "\"no-such-group-segwlb\"");
    let e = error(&unknown);
    assert!(
        e.contains(": balancer.control_group: no group `no-such-group-segwlb` on this machine"),
        "{e}"
    );
}

#[test]
fn the_fast_path_is_on_where_the_kernel_allows_unless_the_config_says_otherwise() {
    let dir = policies();
    let text = good(dir.path());
    assert_eq!(parse(&text).unwrap().fast_path, FastPathMode::Auto);
    for (name, mode) in [
        ("off", FastPathMode::Off),
        ("xdp", FastPathMode::Xdp),
        ("auto", FastPathMode::Auto),
    ] {
        let with = format!("{text}\n[dataplane]\nfast_path = \"{name}\"\n");
        assert_eq!(parse(&with).unwrap().fast_path, mode, "{name}");
    }
    let e = error(&format!("{text}\n[dataplane]\nfast_path = \"fast\"\n"));
    assert!(
        e.contains("dataplane.fast_path") && e.contains("`fast`"),
        "{e}"
    );
    assert!(e.contains("lb.toml:"), "names the line: {e}");
}

#[test]
fn the_xdp_mode_is_generic_unless_native_is_asked_for() {
    let dir = policies();
    let text = good(dir.path());
    assert_eq!(parse(&text).unwrap().xdp_mode, XdpMode::Generic);
    let native = format!("{text}\n[dataplane]\nxdp_mode = \"native\"\n");
    assert_eq!(parse(&native).unwrap().xdp_mode, XdpMode::Native);
    let e = error(&format!("{text}\n[dataplane]\nxdp_mode = \"driver\"\n"));
    assert!(
        e.contains("dataplane.xdp_mode") && e.contains("`driver`"),
        "{e}"
    );
}

#[test]
fn moves_take_a_pace_and_a_hook_whose_placeholders_are_checked() {
    let dir = policies();
    let base = good(dir.path());
    let c = parse(&base).unwrap();
    assert_eq!(c.moves, MovesConfig::default());
    assert!(c.moves.hook.is_none());
    let with = |moves: &str| format!("{base}\n[moves]\n{moves}\n");
    let c = parse(&with(
        "per_second = 5\ntimeout_s = 12\nhook = [\"/bin/redirect\", \"{from}\", \"{ike_spi}\"]",
    ))
    .unwrap();
    assert_eq!(c.moves.settings.per_second, 5.0);
    assert_eq!(c.moves.settings.timeout, Duration::from_secs(12));
    assert_eq!(
        c.moves.hook.as_deref(),
        Some(
            &[
                "/bin/redirect".to_string(),
                "{from}".into(),
                "{ike_spi}".into()
            ][..]
        )
    );
    for (moves, field) in [
        ("per_second = 0", "moves.per_second"),
        ("linger_s = -1", "moves.linger_s"),
        ("hook = []", "moves.hook"),
        ("hook = [\"x\", \"{segw}\"]", "moves.hook"),
    ] {
        let e = error(&with(moves));
        assert!(e.contains(&format!(": {field}: ")), "{moves}: {e}");
    }
}

#[test]
fn the_uplink_next_hop_is_a_mac_or_an_address_and_nonsense_is_named() {
    let dir = policies();
    let with = |hop: &str| {
        good(dir.path()).replace(
            "uplink = \"up0\"",
            &format!("uplink = \"up0\"\nnext_hop = \"{hop}\""),
        )
    };
    assert_eq!(parse(&good(dir.path())).unwrap().next_hop, None);
    assert_eq!(
        parse(&with("02:aa:00:00:00:01")).unwrap().next_hop,
        Some(UplinkNextHop::Mac([2, 0xaa, 0, 0, 0, 1]))
    );
    assert_eq!(
        parse(&with("192.0.2.1")).unwrap().next_hop,
        Some(UplinkNextHop::Address("192.0.2.1".parse().unwrap()))
    );
    assert_eq!(
        parse(&with("fe80::1")).unwrap().next_hop,
        Some(UplinkNextHop::Address("fe80::1".parse().unwrap()))
    );
    let e = error(&with("router"));
    assert!(
        e.starts_with("lb.toml:4:12: balancer.next_hop: `router` is neither a MAC"),
        "{e}"
    );
}
