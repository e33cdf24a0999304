// A hostile policy, in JavaScript: for testing the host's sandbox, never for
// use.
//
// `configure` takes `mode` (default `ok`) and, for some modes, `path`,
// `host` and `port`. `setGateways` stores the set; `choose` misbehaves by
// mode:
//
// - `ok`: the first gateway that takes new tunnels (healthy, not draining,
//   weight > 0), or none.
// - `loop`: spins forever (the host's deadline must interrupt it).
// - `alloc`: allocates 1 MiB blocks, keeping every one, until memory runs
//   out (the host's memory limit must stop it).
// - `open`: reads the file `path` (default /etc/passwd) through
//   wasi:filesystem (StarlingMonkey has no file API of its own). Read
//   succeeded: the SECOND gateway of the set (the breach answer); any
//   error: the FIRST.
// - `connect`: TCP-connects to `host`:`port` (default 127.0.0.1:9) through
//   wasi:sockets. Connected: the SECOND gateway; any error: the FIRST.
//   CAVEAT, componentize-js 0.23.0: its generated glue for
//   instanceNetwork() builds the result from a class
//   `import_network_0_2_12$Network` that it never defines (the interface
//   wasi:sockets/network has a resource but no function, so no class is
//   emitted), and the glue runs in its own global, out of this module's
//   reach. So instanceNetwork() throws a ReferenceError inside the guest,
//   after the host call itself succeeded, and this mode answers the FIRST
//   gateway whatever the host allows: with this toolchain it tests only
//   that the attempt does not crash the host. The code below is what works
//   once that is fixed.
//   (`fetch()` exists as a global but, with componentize-js's `http`
//   feature disabled, calling it traps instead of throwing; enabling `http`
//   would import wasi:http, which a host without wasi-http cannot link.)
// - `env`: looks at `process.env` (absent in StarlingMonkey) and
//   wasi:cli/environment. Any variable visible: the SECOND gateway; none:
//   the FIRST.
// - `stdout`: console.log()s about 4 MiB (wasi:cli/stdout), then answers
//   the FIRST gateway.
// - `raise`: throws an exception (a trap, to the host).
//
// So against a host that grants nothing, `open`, `connect` and `env` answer
// the first gateway of the set, and the second means the sandbox leaked.
// Any failure answers the first, a probe's own bug too: tests/polyglot.rs
// runs `open` and `env` again in a host of its own that grants the act,
// where they must answer the second (`connect` cannot, see above).
//
// Built against the world in wit/hostile.wit (the contract plus those WASI
// imports), with every componentize-js feature but `stdio` disabled:
//
//     scripts/build-polyglot.sh
//
// (it assembles wit/ with its dependencies in a scratch directory and runs
// `componentize-js policy.js -w DIR -n hostile -d random clocks http
// fetch-event -o policies/js-hostile.wasm`).

import { log } from 'segwlb:policy/log@0.3.0';
import { getDirectories } from 'wasi:filesystem/preopens@0.2.12';
import { getEnvironment } from 'wasi:cli/environment@0.2.12';
import { instanceNetwork } from 'wasi:sockets/instance-network@0.2.12';
import { createTcpSocket } from 'wasi:sockets/tcp-create-socket@0.2.12';
import { resolveAddresses } from 'wasi:sockets/ip-name-lookup@0.2.12';

const MODES = ['ok', 'loop', 'alloc', 'open', 'connect', 'env', 'stdout', 'raise'];
const PARAMS = ['mode', 'path', 'host', 'port'];

let mode = 'ok';
let path = '/etc/passwd';
let host = '127.0.0.1';
let port = 9;
let gateways = [];
// What `alloc` holds on to, so nothing it allocates is ever freed.
const hoard = [];

const first = () => (gateways.length > 0 ? gateways[0].id : undefined);
// The breach answer.
const second = () => (gateways.length > 1 ? gateways[1].id : undefined);

// A WASI error arrives as a thrown value whose `payload` is the error code.
const why = (e) => {
  const p = e && typeof e === 'object' && 'payload' in e ? e.payload : e;
  return typeof p === 'string' ? p : String(p && p.message ? p.message : JSON.stringify(p));
};

function readFile(file) {
  // wasi:filesystem opens relative to a preopened directory: find one that
  // covers the path. A host that grants nothing preopens nothing.
  const dirs = getDirectories();
  const match = dirs
    .map(([dir, at]) => [dir, at.endsWith('/') ? at : `${at}/`])
    .find(([, at]) => file.startsWith(at) || `${file}/` === at);
  if (!match) throw `no preopened directory covers ${file} (${dirs.length} preopens)`;
  const [dir, at] = match;
  const fd = dir.openAt({ symlinkFollow: true }, file.slice(at.length) || '.', {}, { read: true });
  const [bytes] = fd.read(65536n, 0n);
  return bytes.length;
}

function parseIpv4(s) {
  const parts = s.split('.');
  if (parts.length !== 4 || !parts.every((p) => /^\d{1,3}$/.test(p) && Number(p) < 256)) return undefined;
  return parts.map(Number);
}

function parseIpv6(s) {
  if (!/^[0-9a-fA-F:]+$/.test(s)) return undefined;
  const halves = s.split('::');
  if (halves.length > 2) return undefined;
  const groups = (h) => (h === '' ? [] : h.split(':'));
  const head = groups(halves[0]);
  const tail = halves.length === 2 ? groups(halves[1]) : [];
  const fill = 8 - head.length - tail.length;
  if ((halves.length === 1 && fill !== 0) || fill < 0) return undefined;
  const all = [...head, ...Array(halves.length === 2 ? fill : 0).fill('0'), ...tail];
  if (!all.every((g) => /^[0-9a-fA-F]{1,4}$/.test(g))) return undefined;
  return all.map((g) => parseInt(g, 16));
}

function resolve(network, name) {
  const v4 = parseIpv4(name);
  if (v4) return { tag: 'ipv4', val: v4 };
  const v6 = parseIpv6(name);
  if (v6) return { tag: 'ipv6', val: v6 };
  const stream = resolveAddresses(network, name);
  for (;;) {
    try {
      const addr = stream.resolveNextAddress();
      if (addr === undefined) throw `${name}: no address`;
      return addr;
    } catch (e) {
      if (why(e) !== 'would-block') throw e;
      stream.subscribe().block();
    }
  }
}

function connect(name, toPort) {
  const network = instanceNetwork();
  const ip = resolve(network, name);
  const socket = createTcpSocket(ip.tag);
  const remote =
    ip.tag === 'ipv4'
      ? { tag: 'ipv4', val: { port: toPort, address: ip.val } }
      : { tag: 'ipv6', val: { port: toPort, flowInfo: 0, address: ip.val, scopeId: 0 } };
  socket.startConnect(network, remote);
  const ready = socket.subscribe();
  for (;;) {
    try {
      socket.finishConnect();
      return;
    } catch (e) {
      if (why(e) !== 'would-block') throw e;
      ready.block();
    }
  }
}

function environment() {
  const fromProcess = globalThis.process && globalThis.process.env ? Object.keys(globalThis.process.env) : [];
  const fromWasi = getEnvironment().map(([k]) => k);
  return [...fromProcess, ...fromWasi];
}

export const balancer = {
  configure(params) {
    let [m, p, h, n] = ['ok', '/etc/passwd', '127.0.0.1', 9];
    for (const [key, value] of params) {
      if (key === 'mode') {
        if (!MODES.includes(value)) {
          throw `parameter \`mode\` = ${JSON.stringify(value)}: not one of ${MODES.join(', ')}`;
        }
        m = value;
      } else if (key === 'path') {
        p = value;
      } else if (key === 'host') {
        h = value;
      } else if (key === 'port') {
        const t = value.trim();
        if (!/^\d{1,5}$/.test(t) || Number(t) > 65535) {
          throw `parameter \`port\` = ${JSON.stringify(value)}: not a port number (0 to 65535)`;
        }
        n = Number(t);
      } else {
        throw `unknown parameter \`${key}\`: this policy takes ${PARAMS.join(', ')}`;
      }
    }
    [mode, path, host, port] = [m, p, h, n];
  },

  setGateways(set) {
    gateways = set;
  },

  choose(key) {
    switch (mode) {
      case 'ok': {
        const g = gateways.find((g) => g.healthy && !g.draining && g.weight > 0);
        return g ? g.id : undefined;
      }
      case 'loop': {
        let n = 0;
        for (;;) n++;
      }
      case 'alloc':
        for (;;) hoard.push(new Uint8Array(1 << 20).fill(0xa5));
      case 'open':
        try {
          const n = readFile(path);
          log('error', `open ${path}: READ SUCCEEDED (${n} bytes)`);
          return second();
        } catch (e) {
          log('info', `open ${path}: refused (${why(e)})`);
          return first();
        }
      case 'connect':
        try {
          connect(host, port);
          log('error', `connect ${host}:${port}: CONNECTED`);
          return second();
        } catch (e) {
          log('info', `connect ${host}:${port}: refused (${why(e)})`);
          return first();
        }
      case 'env': {
        let seen;
        try {
          seen = environment();
        } catch (e) {
          log('info', `env: refused (${why(e)})`);
          return first();
        }
        if (seen.length > 0) {
          log('error', `env: ${seen.length} variables visible: ${seen.slice(0, 8).join(', ')}`);
          return second();
        }
        log('info', 'env: empty');
        return first();
      }
      case 'stdout': {
        const line = 'x'.repeat(1023);
        let written = 0;
        try {
          for (let i = 0; i < 4096; i++) {
            console.log(line);
            written += 1024;
          }
        } catch (e) {
          log('info', `stdout: stopped after ${written} bytes (${why(e)})`);
          return first();
        }
        log('info', `stdout: wrote ${written} bytes`);
        return first();
      }
      case 'raise':
        throw new Error('hostile policy: raise mode');
      default:
        return undefined;
    }
  },
};
