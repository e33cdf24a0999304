"""A hostile policy, in Python: for testing the host's sandbox, never for use.

`configure` takes `mode` (default `ok`) and, for some modes, `path`, `host`
and `port`; `spin` (a count) makes every start slow, for the host's restart
path. `set_gateways` stores the set; `choose` misbehaves by mode:

- `ok`: the first gateway that takes new tunnels (healthy, not draining,
  weight > 0), or none.
- `loop`: spins forever (the host's deadline must interrupt it).
- `alloc`: allocates 1 MiB blocks, keeping every one, until memory runs out
  (the host's memory limit must stop it).
- `open`: reads the file `path` (default /etc/passwd). Read succeeded: the
  SECOND gateway of the set (the breach answer); any error: the FIRST.
- `connect`: TCP-connects to `host`:`port` (default 127.0.0.1:9). Connected:
  the SECOND gateway; any error: the FIRST.
- `env`: looks at the environment (`os.environ`, `os.getenv("HOME")`). Any
  variable visible: the SECOND gateway; none: the FIRST.
- `stdout`: prints about 4 MiB to stdout, then answers the FIRST gateway
  (an error from the writes is caught: the flood is the point, not a trap).
- `raise`: raises an exception (a trap, to the host).
- `sleep`: sleeps an hour (`time.sleep(3600)`). The host's clock is virtual:
  the sleep must return at once, and the guest's monotonic clock must show
  the hour passed: then the FIRST gateway; a clock that did not move: the
  SECOND.

So against a host that grants nothing, `open`, `connect` and `env` answer
the first gateway of the set, and the second means the sandbox leaked.
Any failure answers the first, a probe's own bug too: so tests/polyglot.rs
runs each probe again in a host of its own that grants the act (a
directory preopened, a variable passed, the network open), where it must
answer the second. That is what shows the first answer was a refusal.

Built WITHOUT `--stub-wasi`, unlike the other Python examples: the component
then imports the WASI 0.2 interfaces CPython uses (filesystem, sockets,
environment, stdio, ...) and the attempts reach the host, which must refuse
them. With `--stub-wasi` the same attempts would trap inside the guest
instead, and prove nothing about the host.

    .tools/venv/bin/componentize-py -d wit -w policy componentize \
        -p examples/policies/py-hostile app -o policies/py-hostile.wasm

State lives in module globals: componentize-py makes one `Balancer` instance
per exported function, so `self` is not shared between `configure` and
`choose` (see examples/policies/py-round-robin/app.py).
"""

# `encodings.idna` because socket.getaddrinfo encodes the host name with it
# at run time, and a componentize-py component can only import at run time
# what was imported at build time (else: LookupError: unknown encoding: idna).
import encodings.idna  # noqa: F401
import ipaddress
import json
import os
import socket
import sys
import time
from typing import List, Optional, Tuple

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import log, types

MODES = ["ok", "loop", "alloc", "open", "connect", "env", "stdout", "raise", "sleep"]
PARAMS = ["mode", "path", "host", "port", "spin"]

# Set by `configure` / `set_gateways`.
MODE = "ok"
PATH = "/etc/passwd"
HOST = "127.0.0.1"
PORT = 9
GATEWAYS: List[types.Gateway] = []
# What `alloc` holds on to, so nothing it allocates is ever freed.
HOARD: List[bytes] = []


def first() -> Optional[int]:
    return GATEWAYS[0].id if GATEWAYS else None


def second() -> Optional[int]:
    """The breach answer."""
    return GATEWAYS[1].id if len(GATEWAYS) > 1 else None


def quoted(s: str) -> str:
    """A value in double quotes, as the Rust SDK's messages show it."""
    return json.dumps(s, ensure_ascii=False)


def parse_port(raw: str) -> int:
    text = raw.strip()
    if not text.isdigit() or not text.isascii() or int(text) > 65535:
        raise Err(f"parameter `port` = {quoted(raw)}: not a port number (0 to 65535)")
    return int(text)


class Balancer(exports.Balancer):
    def configure(self, params: List[Tuple[str, str]]) -> None:
        global MODE, PATH, HOST, PORT
        mode, path, host, port = "ok", "/etc/passwd", "127.0.0.1", 9
        for key, value in params:
            if key == "mode":
                if value not in MODES:
                    raise Err(f"parameter `mode` = {quoted(value)}: not one of {', '.join(MODES)}")
                mode = value
            elif key == "path":
                path = value
            elif key == "host":
                host = value
            elif key == "port":
                port = parse_port(value)
            elif key == "spin":
                # A slow start, for the host's restart path: this many
                # iterations of busy work in every `configure`.
                if not value.isdigit():
                    raise Err(f"parameter `spin` = {quoted(value)}: not a count")
                for _ in range(int(value)):
                    pass
            else:
                raise Err(f"unknown parameter `{key}`: this policy takes {', '.join(PARAMS)}")
        MODE, PATH, HOST, PORT = mode, path, host, port

    def set_gateways(self, gateways: List[types.Gateway]) -> None:
        global GATEWAYS
        GATEWAYS = list(gateways)

    def choose(self, key: types.TunnelKey) -> Optional[int]:
        if MODE == "ok":
            for g in GATEWAYS:
                if g.healthy and not g.draining and g.weight > 0:
                    return g.id
            return None

        if MODE == "loop":
            n = 0
            while True:
                n += 1

        if MODE == "alloc":
            while True:
                # bytes of a repeated value: every page is written, not just
                # reserved.
                HOARD.append(b"\xa5" * (1 << 20))

        if MODE == "open":
            try:
                with open(PATH, "rb") as f:
                    f.read()
            except BaseException as e:  # noqa: BLE001 - any failure is the expected answer
                log.log(log.Level.INFO, f"open {PATH}: refused ({type(e).__name__}: {e})")
                return first()
            log.log(log.Level.ERROR, f"open {PATH}: READ SUCCEEDED")
            return second()

        if MODE == "connect":
            try:
                try:
                    family = socket.AF_INET6 if ipaddress.ip_address(HOST).version == 6 else socket.AF_INET
                except ValueError:
                    family = None
                if family is None:
                    # A name: resolve it (wasi:sockets/ip-name-lookup) first.
                    s = socket.create_connection((HOST, PORT), timeout=5)
                else:
                    s = socket.socket(family, socket.SOCK_STREAM)
                    s.settimeout(5)
                    s.connect((HOST, PORT))
                s.close()
            except BaseException as e:  # noqa: BLE001
                log.log(log.Level.INFO, f"connect {HOST}:{PORT}: refused ({type(e).__name__}: {e})")
                return first()
            log.log(log.Level.ERROR, f"connect {HOST}:{PORT}: CONNECTED")
            return second()

        if MODE == "env":
            try:
                seen = sorted(os.environ.keys())
                home = os.getenv("HOME")
            except BaseException as e:  # noqa: BLE001
                log.log(log.Level.INFO, f"env: refused ({type(e).__name__}: {e})")
                return first()
            if seen or home is not None:
                log.log(log.Level.ERROR, f"env: {len(seen)} variables visible: {', '.join(seen[:8])}")
                return second()
            log.log(log.Level.INFO, "env: empty")
            return first()

        if MODE == "stdout":
            line = "x" * 1023
            written = 0
            try:
                for _ in range(4096):
                    print(line)
                    written += 1024
                sys.stdout.flush()
            except BaseException as e:  # noqa: BLE001
                log.log(log.Level.INFO, f"stdout: stopped after {written} bytes ({type(e).__name__}: {e})")
                return first()
            log.log(log.Level.INFO, f"stdout: wrote {written} bytes")
            return first()

        if MODE == "raise":
            raise RuntimeError("hostile policy: raise mode")

        if MODE == "sleep":
            # In integer ns: float seconds lose the last nanosecond.
            before = time.monotonic_ns()
            time.sleep(3600)
            slept = time.monotonic_ns() - before
            log.log(log.Level.INFO, f"sleep: the clock moved {slept} ns")
            return first() if slept >= 3600 * 10**9 else second()

        return None
