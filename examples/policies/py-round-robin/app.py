"""Round-robin, in Python: a port of plugins/round-robin.

Each new tunnel goes to the next gateway that takes new tunnels (healthy, not
draining, weight > 0), in the host's order. The cursor remembers the *id* of
the last gateway chosen, not an index, so a gateway joining, leaving or going
down does not make the rotation skip or repeat the others. Weights other than
0 are ignored.

Build (from the repo root, after `scripts/setup.sh --polyglot`):

    scripts/build-polyglot.sh            # all examples into policies/

or by hand:

    cd examples/policies/py-round-robin
    ../../../.tools/venv/bin/componentize-py -d ../../../wit -w policy \
        componentize --stub-wasi app -o ../../../policies/py-round-robin.wasm

How componentize-py maps the contract (world `policy` in wit/policy.wit):
- the module (here `app`, any name but `wit_world`) must define a class named
  after the exported interface, `Balancer`, subclassing
  `wit_world.exports.Balancer`; its methods are the interface's functions in
  snake_case (`configure`, `set_gateways`, `choose`);
- the class is instantiated at build time (componentize-py snapshots the
  initialised interpreter), once PER EXPORTED FUNCTION (0.25.1: three
  instances, so `configure` and `choose` never see the same `self`): keep
  state in module globals, never on `self`, and call no import (`log`) from
  `__init__` (at build time the imports are trapping stubs);
- `result<_, string>` is "return None" for ok, `raise Err("...")` for err;
- `option<u32>` is `Optional[int]`; records are dataclasses; `ip-address` is
  `IpAddress_V4(value=int)` or `IpAddress_V6(value=(hi, lo))`.
"""

from typing import List, Optional, Tuple

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import types


def takes_new_tunnels(g: types.Gateway) -> bool:
    """May this gateway take a new tunnel? Healthy, not draining, weight > 0."""
    return g.healthy and not g.draining and g.weight > 0


def finish(params: List[Tuple[str, str]], accepted: List[str]) -> None:
    """Reject leftover parameters, worded as the Rust SDK's `Params::finish`."""
    if not params:
        return
    key = params[0][0]
    if not accepted:
        raise Err(f"unknown parameter `{key}`: this policy takes none")
    raise Err(f"unknown parameter `{key}`: this policy takes {', '.join(accepted)}")


class RoundRobin:
    """The policy proper: plain Python, no bindings, testable as is."""

    def __init__(self) -> None:
        # Every gateway in set order, with whether it takes new tunnels.
        self.order: List[Tuple[int, bool]] = []
        self.last: Optional[int] = None

    def set_gateways(self, gateways: List[types.Gateway]) -> None:
        self.order = [(g.id, takes_new_tunnels(g)) for g in gateways]

    def choose(self) -> Optional[int]:
        n = len(self.order)
        # Start just after the last one chosen; from the top if it is gone.
        start = 0
        if self.last is not None:
            for i, (gid, _) in enumerate(self.order):
                if gid == self.last:
                    start = i + 1
                    break
        for step in range(n):
            gid, takes = self.order[(start + step) % n]
            if takes:
                self.last = gid
                return gid
        return None


# The one policy of this component, made by `configure`. A module global, not
# an attribute of the `Balancer` instance: see the module docstring. Like the
# Rust SDK's slot: no policy until `configure` succeeds, and a failed
# `configure` leaves the previous one in place.
POLICY: Optional[RoundRobin] = None


class Balancer(exports.Balancer):
    """The export: `segwlb:policy/balancer`."""

    def configure(self, params: List[Tuple[str, str]]) -> None:
        global POLICY
        finish(params, [])
        POLICY = RoundRobin()

    def set_gateways(self, gateways: List[types.Gateway]) -> None:
        if POLICY is not None:
            POLICY.set_gateways(gateways)

    def choose(self, key: types.TunnelKey) -> Optional[int]:
        if POLICY is None:
            return None
        return POLICY.choose()
