// The protocol's bytes, in the browser: canonical msgpack (protocol.md section 2),
// BLAKE2b-256 event ids (section 3.2), and Ed25519 signing through WebCrypto.
// No library: WebCrypto has Ed25519 but no BLAKE2b, so that is written out here
// (RFC 7693, with BigInt for the 64-bit words; events are small).

export const EVENT_DOMAIN = utf8("formicary/v1/event\u0000");
export const BOARD_AUTH_DOMAIN = utf8("formicary/v1/board-auth\u0000");

export function utf8(text) {
  return new TextEncoder().encode(text);
}

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

export function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function fromHex(text) {
  if (!/^([0-9a-f]{2})*$/i.test(text)) throw new Error("not hex");
  return Uint8Array.from(text.match(/../g) || [], (h) => parseInt(h, 16));
}

export function b64(bytes) {
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text);
}

export function fromB64(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

// -- canonical msgpack ------------------------------------------------------------------

// Values: null, booleans, integers (Number or BigInt), strings, Uint8Array (bin),
// arrays, and plain objects (maps, keys sorted by their UTF-8 bytes).
export function encode(value) {
  const out = [];
  write(value, out);
  return Uint8Array.from(out);
}

function bytesOf(n, size) {
  const out = [];
  let v = BigInt(n);
  for (let i = 0; i < size; i++) {
    out.unshift(Number(v & 0xffn));
    v >>= 8n;
  }
  return out;
}

function head(out, small, tags, n) {
  // small: [limit, base] for the fix form; tags: [[tag, size, limit], ...]
  if (small && n <= small[0]) return out.push(small[1] | n);
  for (const [tag, size, limit] of tags) {
    if (n <= limit) return out.push(tag, ...bytesOf(n, size));
  }
  throw new Error("too long");
}

function write(value, out) {
  if (value === null || value === undefined) return out.push(0xc0);
  if (value === false) return out.push(0xc2);
  if (value === true) return out.push(0xc3);
  if (typeof value === "number" && !Number.isInteger(value)) {
    const view = new DataView(new ArrayBuffer(8));
    view.setFloat64(0, value);
    return out.push(0xcb, ...new Uint8Array(view.buffer));
  }
  if (typeof value === "number" || typeof value === "bigint") {
    const n = BigInt(value);
    if (n >= 0n) {
      if (n <= 127n) return out.push(Number(n));
      if (n <= 0xffn) return out.push(0xcc, ...bytesOf(n, 1));
      if (n <= 0xffffn) return out.push(0xcd, ...bytesOf(n, 2));
      if (n <= 0xffffffffn) return out.push(0xce, ...bytesOf(n, 4));
      return out.push(0xcf, ...bytesOf(n, 8));
    }
    if (n >= -32n) return out.push(Number(n & 0xffn));
    const twos = (size) => bytesOf(BigInt.asUintN(size * 8, n), size);
    if (n >= -128n) return out.push(0xd0, ...twos(1));
    if (n >= -32768n) return out.push(0xd1, ...twos(2));
    if (n >= -2147483648n) return out.push(0xd2, ...twos(4));
    return out.push(0xd3, ...twos(8));
  }
  if (typeof value === "string") {
    const data = utf8(value);
    head(out, [31, 0xa0], [[0xd9, 1, 0xff], [0xda, 2, 0xffff], [0xdb, 4, 0xffffffff]], data.length);
    return out.push(...data);
  }
  if (value instanceof Uint8Array) {
    head(out, null, [[0xc4, 1, 0xff], [0xc5, 2, 0xffff], [0xc6, 4, 0xffffffff]], value.length);
    return out.push(...value);
  }
  if (Array.isArray(value)) {
    head(out, [15, 0x90], [[0xdc, 2, 0xffff], [0xdd, 4, 0xffffffff]], value.length);
    for (const item of value) write(item, out);
    return;
  }
  const keys = Object.keys(value).filter((k) => value[k] !== undefined);
  keys.sort((a, b) => compareBytes(utf8(a), utf8(b)));
  head(out, [15, 0x80], [[0xde, 2, 0xffff], [0xdf, 4, 0xffffffff]], keys.length);
  for (const key of keys) {
    write(key, out);
    write(value[key], out);
  }
}

// Decoding, enough to read an event's own fields (the page checks what it shows
// against the signed bytes, not against what the relay says about them).
export function decode(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let at = 0;
  const uint = (size) => {
    let n = 0n;
    for (let i = 0; i < size; i++) n = (n << 8n) | BigInt(bytes[at++]);
    return n;
  };
  const num = (n) => (n <= BigInt(Number.MAX_SAFE_INTEGER) && n >= -BigInt(Number.MAX_SAFE_INTEGER) ? Number(n) : n);
  const take = (n) => bytes.subarray(at, (at += n));
  const text = (n) => new TextDecoder("utf-8", { fatal: true }).decode(take(n));
  const array = (n) => Array.from({ length: n }, () => read());
  const map = (n) => {
    const out = {};
    for (let i = 0; i < n; i++) out[read()] = read();
    return out;
  };
  function read() {
    if (at >= bytes.length) throw new Error("truncated");
    const tag = bytes[at++];
    if (tag <= 0x7f) return tag;
    if (tag >= 0xe0) return tag - 0x100;
    if ((tag & 0xf0) === 0x80) return map(tag & 0x0f);
    if ((tag & 0xf0) === 0x90) return array(tag & 0x0f);
    if ((tag & 0xe0) === 0xa0) return text(tag & 0x1f);
    switch (tag) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return take(Number(uint(1)));
      case 0xc5: return take(Number(uint(2)));
      case 0xc6: return take(Number(uint(4)));
      case 0xcb: { const v = view.getFloat64(at); at += 8; return v; }
      case 0xcc: return Number(uint(1));
      case 0xcd: return Number(uint(2));
      case 0xce: return Number(uint(4));
      case 0xcf: return num(uint(8));
      case 0xd0: return num(BigInt.asIntN(8, uint(1)));
      case 0xd1: return num(BigInt.asIntN(16, uint(2)));
      case 0xd2: return num(BigInt.asIntN(32, uint(4)));
      case 0xd3: return num(BigInt.asIntN(64, uint(8)));
      case 0xd9: return text(Number(uint(1)));
      case 0xda: return text(Number(uint(2)));
      case 0xdb: return text(Number(uint(4)));
      case 0xdc: return array(Number(uint(2)));
      case 0xdd: return array(Number(uint(4)));
      case 0xde: return map(Number(uint(2)));
      case 0xdf: return map(Number(uint(4)));
    }
    throw new Error(`no msgpack type 0x${tag.toString(16)} here`);
  }
  const value = read();
  if (at !== bytes.length) throw new Error("trailing bytes");
  return value;
}

function compareBytes(a, b) {
  for (let i = 0; i < Math.min(a.length, b.length); i++) {
    if (a[i] !== b[i]) return a[i] - b[i];
  }
  return a.length - b.length;
}

// -- BLAKE2b ----------------------------------------------------------------------------

const M64 = (1n << 64n) - 1n;
const IV = [
  0x6a09e667f3bcc908n, 0xbb67ae8584caa73bn, 0x3c6ef372fe94f82bn, 0xa54ff53a5f1d36f1n,
  0x510e527fade682d1n, 0x9b05688c2b3e6c1fn, 0x1f83d9abfb41bd6bn, 0x5be0cd19137e2179n,
];
const SIGMA = [
  [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
  [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
  [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
  [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
  [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
  [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
  [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
  [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
  [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
  [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
];

const rotr = (x, n) => ((x >> BigInt(n)) | (x << BigInt(64 - n))) & M64;

function mix(v, a, b, c, d, x, y) {
  v[a] = (v[a] + v[b] + x) & M64;
  v[d] = rotr(v[d] ^ v[a], 32);
  v[c] = (v[c] + v[d]) & M64;
  v[b] = rotr(v[b] ^ v[c], 24);
  v[a] = (v[a] + v[b] + y) & M64;
  v[d] = rotr(v[d] ^ v[a], 16);
  v[c] = (v[c] + v[d]) & M64;
  v[b] = rotr(v[b] ^ v[c], 63);
}

function compress(h, block, t, last) {
  const v = h.concat(IV);
  v[12] ^= t & M64;
  v[13] ^= t >> 64n;
  if (last) v[14] ^= M64;
  const m = [];
  for (let i = 0; i < 16; i++) {
    let word = 0n;
    for (let j = 7; j >= 0; j--) word = (word << 8n) | BigInt(block[i * 8 + j]);
    m.push(word);
  }
  for (let r = 0; r < 12; r++) {
    const s = SIGMA[r % 10];
    mix(v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
    mix(v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
    mix(v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
    mix(v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
    mix(v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
    mix(v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
    mix(v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
    mix(v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
  }
  for (let i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

export function blake2b(data, size = 32) {
  const h = IV.slice();
  h[0] ^= 0x01010000n ^ BigInt(size);
  let t = 0n;
  let at = 0;
  while (data.length - at > 128) {
    t += 128n;
    compress(h, data.subarray(at, at + 128), t, false);
    at += 128;
  }
  const block = new Uint8Array(128);
  block.set(data.subarray(at));
  t += BigInt(data.length - at);
  compress(h, block, t, true);
  const out = new Uint8Array(size);
  for (let i = 0; i < size; i++) out[i] = Number((h[i >> 3] >> BigInt(8 * (i & 7))) & 0xffn);
  return out;
}

// -- keys -------------------------------------------------------------------------------

const PKCS8_ED25519 = fromHex("302e020100300506032b657004220420");
export const PASSPHRASE_SALT = utf8("formicary/v1/board-key");
export const PASSPHRASE_ROUNDS = 200000;

async function fromPkcs8(der) {
  const key = await crypto.subtle.importKey("pkcs8", der, { name: "Ed25519" }, true, ["sign"]);
  const jwk = await crypto.subtle.exportKey("jwk", key);
  const pub = fromB64(jwk.x.replace(/-/g, "+").replace(/_/g, "/") + "=");
  return { key, publicKey: pub, jwk };
}

// A key file as `formicary keygen` writes it: unencrypted PKCS#8 PEM.
export async function keyFromPem(pem) {
  const body = pem.replace(/-----[^-]+-----/g, "").replace(/\s+/g, "");
  return fromPkcs8(fromB64(body));
}

// A key from a passphrase: PBKDF2-SHA256 (salt and rounds above) gives the 32-byte
// Ed25519 seed (operations.md, "The oversight board").
export async function keyFromPassphrase(passphrase) {
  const base = await crypto.subtle.importKey("raw", utf8(passphrase), "PBKDF2", false, [
    "deriveBits",
  ]);
  const bits = await crypto.subtle.deriveBits(
    { name: "PBKDF2", hash: "SHA-256", salt: PASSPHRASE_SALT, iterations: PASSPHRASE_ROUNDS },
    base,
    256,
  );
  return fromPkcs8(concat(PKCS8_ED25519, new Uint8Array(bits)));
}

export async function keyFromJwk(jwk) {
  const key = await crypto.subtle.importKey("jwk", jwk, { name: "Ed25519" }, true, ["sign"]);
  const pub = fromB64(jwk.x.replace(/-/g, "+").replace(/_/g, "/") + "=");
  return { key, publicKey: pub, jwk };
}

export async function sign(key, message) {
  return new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, key, message));
}

export async function verify(publicKey, sig, message) {
  try {
    const key = await crypto.subtle.importKey("raw", publicKey, { name: "Ed25519" }, false, [
      "verify",
    ]);
    return await crypto.subtle.verify({ name: "Ed25519" }, key, sig, message);
  } catch {
    return false;
  }
}

// A signed event, ready for the board socket's `publish`.
export async function signedEvent(signer, ns, kind, body) {
  const event = {
    author: signer.publicKey,
    body,
    deps: [],
    kind,
    nonce: crypto.getRandomValues(new Uint8Array(16)),
    ns,
    ts: Date.now(),
    v: 1,
  };
  const raw = encode(event);
  const sig = await sign(signer.key, concat(EVENT_DOMAIN, blake2b(raw)));
  return { raw, sig };
}

// The event these bytes are, if `sig` is its author's signature of them (the author
// read from the bytes themselves), else null.
export async function checkEvent(raw, sig) {
  let event;
  try {
    event = decode(raw);
  } catch {
    return null;
  }
  if (!(event.author instanceof Uint8Array) || event.author.length !== 32) return null;
  const ok = await verify(event.author, sig, concat(EVENT_DOMAIN, blake2b(raw)));
  return ok ? event : null;
}
