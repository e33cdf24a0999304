// Checks policy.js's arithmetic under plain Node, no component needed:
//
//     node examples/policies/js-consistent-hash/check.mjs
//
// Expected values come from the Rust sources: the pinned ones from the
// tests in plugins/sdk/src/hash.rs, table.rs and plugins/consistent-hash
// (GOLDEN_3), the others computed by an independent Python port of hash.rs
// (Python ints masked to 64 bits) and of the Maglev fill (the textbook
// `(offset + next·skip) % M`, where policy.js steps incrementally).
//
// policy.js imports `segwlb:policy/log@0.3.0`, which only exists inside a
// component: here that import is swapped for a stub that records the lines.

import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const here = fileURLToPath(new URL('.', import.meta.url));
const source = readFileSync(`${here}/policy.js`, 'utf8');
globalThis.__logs = [];
const stub = 'export function log(level, message) { globalThis.__logs.push([level, message]); }';
const stubUrl = `data:text/javascript,${encodeURIComponent(stub)}`;
const patched = source.replace(
  /^import \{ log \} from 'segwlb:policy\/log@0\.3\.0';$/m,
  `import { log } from ${JSON.stringify(stubUrl)};`,
);
if (patched === source) throw new Error('policy.js no longer imports segwlb:policy/log@0.3.0');
const p = await import(`data:text/javascript,${encodeURIComponent(patched)}`);

let passed = 0;
let failed = 0;
function eq(name, got, want) {
  const g = typeof got === 'bigint' ? `0x${got.toString(16)}` : JSON.stringify(got);
  const w = typeof want === 'bigint' ? `0x${want.toString(16)}` : JSON.stringify(want);
  if (g === w) {
    passed++;
  } else {
    failed++;
    console.log(`FAIL ${name}: got ${g}, want ${w}`);
  }
}
function throws(name, f, want) {
  try {
    f();
    eq(name, 'no error', want);
  } catch (e) {
    eq(name, String(e), want);
  }
}

// hash.rs: pinned in its tests.
eq('mix(0)', p.mix(0n), 0n);
eq('mix(1)', p.mix(1n), 0x5692161d100b05e5n);
eq('words([])', p.words([]), 0x243f6a8885a308d3n);
// Computed with the Python port.
eq('mix(u64::MAX)', p.mix(0xffffffffffffffffn), 0xb4d055fcf2cbbd7bn);
eq('words([4,0,10.0.0.1,500])', p.words([4n, 0n, 0x0a000001n, 500n]), 0x81f71a4004cc6482n);
eq('str_seeded(segw1, a5a5)', p.strSeeded('segw1', 0xa5a5), 0x3af4cfad8039198en);
eq('str_seeded(segw1, 5a5a)', p.strSeeded('segw1', 0x5a5a), 0x2480449543b7e99dn);
eq('str_seeded(non-ASCII)', p.strSeeded('gw-é€😀', 0xa5a5), 0x44f3572a05a005efn);
eq(
  'endpoint_hash v4',
  p.endpointHash({ peer: { tag: 'v4', val: 0x0a000001 }, peerPort: 500 }),
  0x81f71a4004cc6482n,
);
eq(
  'endpoint_hash v6',
  p.endpointHash({ peer: { tag: 'v6', val: [0x20010db800000000n, 1n] }, peerPort: 4500 }),
  0xa379cd60b204a42en,
);
// A v4 address with the top bit set must stay unsigned.
eq(
  'endpoint_hash v4 high bit',
  p.endpointHash({ peer: { tag: 'v4', val: 0xc0a80101 }, peerPort: 0 }),
  p.words([4n, 0n, 0xc0a80101n, 0n]),
);

// table.rs: pinned in its tests.
eq('primes', [p.isPrime(65537), p.isPrime(101), p.isPrime(65536), p.isPrime(1)], [true, true, false, false]);
eq('next_prime(401)', p.nextPrime(401), 401);
eq('next_prime(402)', p.nextPrime(402), 409);
eq('size_for(65537, 64)', p.sizeFor(65537, 64), 65537);
globalThis.__logs = [];
eq('size_for(101, 3)', p.sizeFor(101, 3), 307);
eq('size_for logs', globalThis.__logs, [['warn', '3 gateways outgrow table-size 101: using 307']]);

const gw = (id, extra = {}) => ({
  id,
  name: `segw${id}`,
  weight: 1,
  healthy: true,
  draining: false,
  tunnels: 0n,
  ...extra,
});
const key = (n, port = 500) => ({
  peer: { tag: 'v4', val: 0x0a010000 + n },
  peerPort: port,
  vip: { tag: 'v4', val: 0x0a020201 },
  ikeSpi: undefined,
  openedBy: 'ike',
});
const place = (n) => Array.from({ length: n }, (_, i) => p.balancer.choose(key(i)));

// consistent-hash's golden_keys test.
p.balancer.configure([]);
p.balancer.setGateways([gw(1), gw(2), gw(3)]);
eq('GOLDEN_3', place(12), [2, 2, 2, 2, 1, 2, 3, 3, 2, 3, 1, 3]);
// host_order_does_not_matter
const before = place(1000);
p.balancer.setGateways([gw(3), gw(2), gw(1)]);
eq('host order', place(1000), before);
// Gateways that take no tunnels are not members.
p.balancer.setGateways([
  gw(1),
  gw(2, { healthy: false }),
  gw(3, { draining: true }),
  gw(4, { weight: 0 }),
]);
eq('only takers', [...new Set(place(200))], [1]);
p.balancer.setGateways([gw(1, { draining: true })]);
eq('no members, no answer', p.balancer.choose(key(1)), undefined);

// Whole tables against the Python port: words() over every slot.
const members = (ids, names) =>
  ids.map((id, i) => ({ id, name: names[i], bytes: p.utf8(names[i]) }));
eq(
  'maglev(segw1..5, 503)',
  p.words(Array.from(p.maglevTable(members([1, 2, 3, 4, 5], ['segw1', 'segw2', 'segw3', 'segw4', 'segw5']), 503), BigInt)),
  0x35fef2df4ccc12den,
);
eq(
  'maglev(segw1..3, 65537)',
  p.words(Array.from(p.maglevTable(members([1, 2, 3], ['segw1', 'segw2', 'segw3']), 65537), BigInt)),
  0xf8ee3f0b0bf42dc0n,
);

// Growth through configure: 101 with 3 gateways becomes 307, with a warning.
globalThis.__logs = [];
p.balancer.configure([['table-size', ' 101 ']]);
p.balancer.setGateways([gw(1), gw(2), gw(3)]);
eq('growth warns', globalThis.__logs, [['warn', '3 gateways outgrow table-size 101: using 307']]);
eq(
  'growth placement (Python port, M=307)',
  place(12),
  [1, 1, 2, 1, 2, 3, 2, 1, 2, 1, 2, 3],
);
// Sort by name then id, bytewise, as Rust's String ordering.
p.balancer.configure([]);
p.balancer.setGateways([
  { ...gw(7), name: 'b' },
  { ...gw(5), name: 'a' },
  { ...gw(6), name: 'a' },
  { ...gw(9), name: '\u{ff61}' },
  { ...gw(8), name: '\u{1f600}' },
]);
eq('sorting (Python port)', place(12), [5, 8, 8, 8, 8, 9, 8, 5, 9, 9, 6, 6]);

// params.rs and table::validate wording.
throws('bad value', () => p.balancer.configure([['table-size', 'x']]), 'parameter `table-size` = "x": invalid digit found in string');
throws('empty value', () => p.balancer.configure([['table-size', ' ']]), 'parameter `table-size` = " ": cannot parse integer from empty string');
throws('too large', () => p.balancer.configure([['table-size', '4294967296']]), 'parameter `table-size` = "4294967296": number too large to fit in target type');
throws('not prime', () => p.balancer.configure([['table-size', '65536']]), 'parameter `table-size` = 65536: must be a prime ≥ 101');
throws('too small', () => p.balancer.configure([['table-size', '97']]), 'parameter `table-size` = 97: must be a prime ≥ 101');
throws('unknown', () => p.balancer.configure([['tabel-size', '7']]), 'unknown parameter `tabel-size`: this policy takes table-size');
// Vec::swap_remove: taking table-size moves the last pair to the front.
throws(
  'swap_remove order',
  () => p.balancer.configure([['table-size', '101'], ['a', '1'], ['b', '2']]),
  'unknown parameter `b`: this policy takes table-size',
);
throws('duplicate', () => p.balancer.configure([['table-size', '101'], ['table-size', '103']]), 'unknown parameter `table-size`: this policy takes table-size');
p.balancer.configure([['table-size', '+65537']]);

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
