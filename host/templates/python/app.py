"""{{name}}: a segwlb balancing policy, in Python.

Build it into a component (componentize-py, installed by
`scripts/setup.sh --polyglot`):

    segwlb policy build app.py

The contract is wit/policy.wit (world `policy`): the host calls `configure`
once with the `[policy.params]` of the config, `set_gateways` whenever the
gateway set changes, and `choose` for each NEW tunnel (existing tunnels stay
where they are without asking). This starting point spreads new tunnels over
the gateways that take them by a hash of the tunnel's outer address and port,
the same hash as the Rust SDK's `TunnelKey::endpoint_hash`.

What to know about Python policies (componentize-py):
- keep this module's class named `Balancer`, subclassing
  `wit_world.exports.Balancer`: the name is the exported interface's;
- the class is instantiated at build time, ONCE PER EXPORTED FUNCTION, so
  `configure`, `set_gateways` and `choose` each get a different `self`:
  keep state in module globals, as below;
- no import (`log`) may be called at module level or from `__init__`: both
  run at build time;
- a load-aware policy reads the live tunnel count of a gateway inside
  `choose` with `from wit_world.imports import load` and
  `load.tunnels(gateway_id)` (one call into the host each); each gateway's
  `capacity` (0: no limit) comes with the set;
- a policy is sandboxed: no files, network, environment or clock; `random`
  and `hash()` of strings are fixed at build time. Decide from the
  parameters, the gateway set and the key only;
- an exception escaping `choose` is a trap: the host counts it and places
  the tunnel itself. `configure` reports a bad config with `raise Err(...)`.
"""

from typing import List, Optional, Tuple

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import log, types

# ----------------------------------------------------------------- hashing

MASK64 = (1 << 64) - 1


def mix(z: int) -> int:
    """SplitMix64's finaliser, as the Rust SDK's hash::mix (64-bit wrapping)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def words(ws: List[int]) -> int:
    """Hash a sequence of u64 words, as hash::words."""
    h = 0x243F6A8885A308D3
    for w in ws:
        h = mix(h ^ mix(w & MASK64))
    return h


def endpoint_hash(key: types.TunnelKey) -> int:
    """The tunnel's outer address and UDP port, as TunnelKey::endpoint_hash."""
    if isinstance(key.peer, types.IpAddress_V4):
        family, hi, lo = 4, 0, key.peer.value
    else:
        family, (hi, lo) = 6, key.peer.value
    return words([family, hi, lo, key.peer_port])


# ------------------------------------------------------------------ policy

# Ids of the gateways that take new tunnels, in the host's order; None until
# `configure` succeeded (then `choose` answers none and the host decides).
MEMBERS: Optional[List[int]] = None


def takes_new_tunnels(g: types.Gateway) -> bool:
    """Healthy, not draining, weight > 0: the host refuses any other answer."""
    return g.healthy and not g.draining and g.weight > 0


class Balancer(exports.Balancer):
    def configure(self, params: List[Tuple[str, str]]) -> None:
        global MEMBERS
        accepted: List[str] = []  # e.g. ["spread"], then read it below
        for key, value in params:
            # To take a parameter: `if key == "spread": spread = int(value)`
            # (raise Err naming it when the value is bad).
            if key not in accepted:
                takes = ", ".join(accepted) if accepted else "none"
                raise Err(f"unknown parameter `{key}`: this policy takes {takes}")
        MEMBERS = []

    def set_gateways(self, gateways: List[types.Gateway]) -> None:
        global MEMBERS
        if MEMBERS is None:
            return
        MEMBERS = [g.id for g in gateways if takes_new_tunnels(g)]
        if not MEMBERS:
            log.log(log.Level.WARN, "{{name}}: no gateway takes new tunnels")

    def choose(self, key: types.TunnelKey) -> Optional[int]:
        if not MEMBERS:
            return None
        return MEMBERS[endpoint_hash(key) % len(MEMBERS)]
