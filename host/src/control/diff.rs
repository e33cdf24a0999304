//! What a changed config file changes: a pure comparison of two validated
//! configurations, so that a reload applies exactly the difference and
//! moves no tunnel it does not have to.

use crate::balancer::{HealthConfig, Prefix};

use super::config::{GatewayConfig, RunConfig};

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Proxy {
        uplink: Vec<Prefix>,
        gateways: Vec<Prefix>,
    },
    Health(Option<HealthConfig>),
    /// The policy's name, parameters or limits changed: load it again.
    Policy,
    AddGateway(GatewayConfig),
    /// Its tunnels move on their next packet.
    RemoveGateway(String),
    Weight(String, u32),
    Capacity(String, u64),
    Throughput(String, u64),
    Drain(String, bool),
    /// A field that only a restart applies (names it).
    NeedsRestart(&'static str),
}

/// The changes that turn `old` into `new`, in the order to apply them:
/// removals before additions (an interface may pass from one gateway to
/// another), the policy after the gateway set.
pub fn diff(old: &RunConfig, new: &RunConfig) -> Vec<Change> {
    let mut changes = Vec::new();
    let restart: [(&'static str, bool); 12] = [
        ("balancer.uplink", old.uplink.value != new.uplink.value),
        ("balancer.next_hop", old.next_hop != new.next_hop),
        ("balancer.vip", old.vips != new.vips),
        ("balancer.max_tunnels", old.max_tunnels != new.max_tunnels),
        (
            "balancer.idle_timeout_s / half_open_timeout_s",
            old.timeouts != new.timeouts,
        ),
        (
            "balancer.control_socket",
            old.control_socket != new.control_socket,
        ),
        (
            "balancer.metrics / control_group / status_group",
            old.metrics != new.metrics || old.control_groups != new.control_groups,
        ),
        (
            "balancer.state_file / state_interval_s",
            old.state_file != new.state_file || old.state_interval != new.state_interval,
        ),
        ("policy.compiler", old.compiler != new.compiler),
        (
            "dataplane.fast_path / xdp_mode",
            old.fast_path != new.fast_path || old.xdp_mode != new.xdp_mode,
        ),
        ("moves", old.moves != new.moves),
        // The role in the file is the one at start: keepalived changes it.
        (
            "pair.listen / peer / key",
            old.pair.as_ref().map(|p| (p.listen, p.peer, &p.key))
                != new.pair.as_ref().map(|p| (p.listen, p.peer, &p.key)),
        ),
    ];
    changes.extend(
        restart
            .into_iter()
            .filter(|(_, changed)| *changed)
            .map(|(field, _)| Change::NeedsRestart(field)),
    );
    if old.proxy_uplink != new.proxy_uplink || old.proxy_gateways != new.proxy_gateways {
        changes.push(Change::Proxy {
            uplink: new.proxy_uplink.clone(),
            gateways: new.proxy_gateways.clone(),
        });
    }
    if old.health != new.health {
        changes.push(Change::Health(new.health));
    }
    for g in &old.gateways {
        match new.gateway(&g.name) {
            None => changes.push(Change::RemoveGateway(g.name.clone())),
            // A gateway on another interface, MAC or SPI ranges is another
            // gateway: take it out and put it back.
            Some(n)
                if n.interface.value != g.interface.value
                    || n.mac != g.mac
                    || n.steering != g.steering =>
            {
                changes.push(Change::RemoveGateway(g.name.clone()));
            }
            Some(_) => {}
        }
    }
    for n in &new.gateways {
        match old.gateway(&n.name) {
            Some(g)
                if n.interface.value == g.interface.value
                    && n.mac == g.mac
                    && n.steering == g.steering =>
            {
                if n.weight != g.weight {
                    changes.push(Change::Weight(n.name.clone(), n.weight));
                }
                if n.capacity != g.capacity {
                    changes.push(Change::Capacity(n.name.clone(), n.capacity));
                }
                if n.throughput != g.throughput {
                    changes.push(Change::Throughput(n.name.clone(), n.throughput));
                }
                if n.drain != g.drain {
                    changes.push(Change::Drain(n.name.clone(), n.drain));
                }
            }
            _ => changes.push(Change::AddGateway(n.clone())),
        }
    }
    if old.policy != new.policy {
        changes.push(Change::Policy);
    }
    changes
}

/// Record in `running` that `change`, taken from `new`, was applied:
/// `running` starts as the config in force and, change by change, becomes
/// what the balancer is really running. A change that failed is simply not
/// recorded, so the next reload offers it again; a field that needs a
/// restart keeps its old value until then.
pub fn record(running: &mut RunConfig, change: &Change, new: &RunConfig) {
    match change {
        Change::Proxy { .. } => {
            running.proxy_uplink = new.proxy_uplink.clone();
            running.proxy_gateways = new.proxy_gateways.clone();
        }
        Change::Health(h) => running.health = *h,
        Change::Policy => running.policy = new.policy.clone(),
        Change::AddGateway(g) => {
            running.gateways.retain(|r| r.name != g.name);
            running.gateways.push(g.clone());
        }
        Change::RemoveGateway(name) => running.gateways.retain(|r| &r.name != name),
        Change::Weight(name, w) => {
            if let Some(g) = running.gateways.iter_mut().find(|g| &g.name == name) {
                g.weight = *w;
            }
        }
        Change::Capacity(name, c) => {
            if let Some(g) = running.gateways.iter_mut().find(|g| &g.name == name) {
                g.capacity = *c;
            }
        }
        Change::Throughput(name, t) => {
            if let Some(g) = running.gateways.iter_mut().find(|g| &g.name == name) {
                g.throughput = *t;
            }
        }
        Change::Drain(name, d) => {
            if let Some(g) = running.gateways.iter_mut().find(|g| &g.name == name) {
                g.drain = *d;
            }
        }
        Change::NeedsRestart(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(dir: &Path, gateways: &str, policy: &str) -> RunConfig {
        let text = format!(
            r#"
[balancer]
uplink = "up0"
vip = "10.2.2.1"
proxy_uplink = ["10.2.2.1/32"]
[policy]
name = "{policy}"
dir = "{}"
{gateways}
"#,
            dir.display()
        );
        RunConfig::parse(&text, Path::new("lb.toml"), dir).unwrap()
    }

    fn gw(name: &str, iface: &str, extra: &str) -> String {
        format!("[[gateway]]\nname = \"{name}\"\ninterface = \"{iface}\"\n{extra}\n")
    }

    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for p in ["round-robin", "weighted"] {
            std::fs::write(d.path().join(format!("{p}.wasm")), b"").unwrap();
        }
        d
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let d = dir();
        let gws = gw("segw1", "a", "") + &gw("segw2", "b", "weight = 2");
        let a = config(d.path(), &gws, "round-robin");
        assert_eq!(diff(&a, &a.clone()), vec![]);
    }

    #[test]
    fn weights_drains_additions_and_removals_are_each_one_change() {
        let d = dir();
        let before = gw("segw1", "a", "") + &gw("segw2", "b", "") + &gw("segw3", "c", "");
        let after = gw("segw1", "a", "weight = 3")
            + &gw("segw2", "b", "drain = true")
            + &gw("segw4", "d", "");
        let changes = diff(
            &config(d.path(), &before, "round-robin"),
            &config(d.path(), &after, "round-robin"),
        );
        let names: Vec<String> = changes
            .iter()
            .map(|c| match c {
                Change::RemoveGateway(n) => format!("remove {n}"),
                Change::AddGateway(g) => format!("add {}", g.name),
                Change::Weight(n, w) => format!("weight {n} {w}"),
                Change::Drain(n, d) => format!("drain {n} {d}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            vec![
                "remove segw3",
                "weight segw1 3",
                "drain segw2 true",
                "add segw4"
            ]
        );
    }

    #[test]
    fn a_gateway_moved_to_another_interface_is_removed_then_added() {
        let d = dir();
        let changes = diff(
            &config(d.path(), &gw("segw1", "a", ""), "round-robin"),
            &config(d.path(), &gw("segw1", "z", ""), "round-robin"),
        );
        assert!(matches!(&changes[0], Change::RemoveGateway(n) if n == "segw1"));
        assert!(matches!(&changes[1], Change::AddGateway(g) if g.interface.value == "z"));
        assert_eq!(changes.len(), 2);
    }

    #[test]
    fn a_policy_change_comes_after_the_gateway_set_and_restart_fields_are_named() {
        let d = dir();
        let a = config(d.path(), &gw("segw1", "a", ""), "round-robin");
        let mut b = config(
            d.path(),
            &(gw("segw1", "a", "") + &gw("segw2", "b", "")),
            "weighted",
        );
        b.vips = vec!["10.2.2.1".parse().unwrap()];
        b.max_tunnels = 5;
        let changes = diff(&a, &b);
        assert_eq!(changes[0], Change::NeedsRestart("balancer.max_tunnels"));
        assert!(matches!(&changes[1], Change::AddGateway(g) if g.name == "segw2"));
        assert_eq!(changes[2], Change::Policy);
    }

    #[test]
    fn what_failed_to_apply_is_offered_again_on_the_next_reload() {
        let d = dir();
        let before = config(
            d.path(),
            &(gw("segw1", "a", "") + &gw("segw2", "b", "")),
            "round-robin",
        );
        let after = config(
            d.path(),
            &(gw("segw1", "a", "weight = 3") + &gw("segw3", "c", "")),
            "weighted",
        );
        let changes = diff(&before, &after);
        // Everything took but the new segw3 (say its interface was not
        // there yet) and the policy (say its file was broken).
        let mut running = before.clone();
        for c in &changes {
            if !matches!(c, Change::AddGateway(_) | Change::Policy) {
                record(&mut running, c, &after);
            }
        }
        let names: Vec<&str> = running.gateways.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, vec!["segw1"]);
        assert_eq!(running.gateways[0].weight, 3);
        assert_eq!(running.policy.name, "round-robin");
        // The same file again: exactly what failed, nothing that took.
        let again = diff(&running, &after);
        assert!(
            matches!(&again[0], Change::AddGateway(g) if g.name == "segw3"),
            "{again:?}"
        );
        assert_eq!(again[1], Change::Policy);
        assert_eq!(again.len(), 2);
        // Recording every change gives the new config.
        for c in &again {
            record(&mut running, c, &after);
        }
        assert_eq!(diff(&running, &after), vec![]);
    }
}
