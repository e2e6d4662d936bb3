#!/usr/bin/env node
// sva alert bus subscriber in Node.js: a complete integrator example.
//
// - CURVE: the server's public key and this client's keypair come from ZeroMQ
//   certificate files as written by `sva keys gen` (KEYS_DIR/server.key and
//   KEYS_DIR/clients/NAME.key_secret).
// - Zero loss: every event carries a sequence number; heartbeats carry the latest one.
//   A jump, or a heartbeat ahead of us, is a gap: we ask the replay endpoint
//   (DEALER -> the publisher's ROUTER) for the missing events and deliver everything
//   exactly once, in order. Ranges the publisher no longer has are reported, not skipped
//   silently.
// - Every delivered event is validated against sva's JSON Schema (sva/bus/schema/*.json).
//
// Output: one JSON line per event on stdout: {"seq", "id", "type", "topic", "valid", "errors"?}
// Lost ranges and warnings go to stderr.
//
// Usage:
//   node subscriber.js --endpoint tcp://HOST:7755 [--replay-endpoint tcp://HOST:7756]
//                      --keys-dir DIR [--client NAME] [--since N] [--count N]
//                      [--timeout-ms MS] [--schema-dir DIR] [--plaintext]
"use strict";

const fs = require("fs");
const path = require("path");
const zmq = require("zeromq");
const Ajv2020 = require("ajv/dist/2020");
const addFormats = require("ajv-formats");

function parseArgs(argv) {
  const opts = {
    endpoint: "tcp://127.0.0.1:7755",
    replayEndpoint: null,
    keysDir: process.env.SVA_KEYS_DIR || "/etc/sva/keys",
    client: "client",
    since: null,
    count: null,
    timeoutMs: null,
    schemaDir: path.join(__dirname, "..", "..", "sva", "bus", "schema"),
    plaintext: false,
  };
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--endpoint") opts.endpoint = next();
    else if (a === "--replay-endpoint") opts.replayEndpoint = next();
    else if (a === "--keys-dir") opts.keysDir = next();
    else if (a === "--client") opts.client = next();
    else if (a === "--since") opts.since = parseInt(next(), 10);
    else if (a === "--count") opts.count = parseInt(next(), 10);
    else if (a === "--timeout-ms") opts.timeoutMs = parseInt(next(), 10);
    else if (a === "--schema-dir") opts.schemaDir = next();
    else if (a === "--plaintext") opts.plaintext = true;
    else throw new Error(`unknown argument ${a}`);
  }
  if (!opts.replayEndpoint) {
    // The publisher's default: PUB port + 1 (ipc: path + ".replay").
    const m = /^tcp:\/\/(.+):(\d+)$/.exec(opts.endpoint);
    if (m) opts.replayEndpoint = `tcp://${m[1]}:${parseInt(m[2], 10) + 1}`;
    else if (opts.endpoint.startsWith("ipc://")) opts.replayEndpoint = opts.endpoint + ".replay";
    else throw new Error("give --replay-endpoint");
  }
  return opts;
}

// A ZeroMQ certificate (zcert format): public-key = "..." / secret-key = "...", Z85.
function readCert(file) {
  const text = fs.readFileSync(file, "utf8");
  const pub = /public-key\s*=\s*"([^"]{40})"/.exec(text);
  const sec = /secret-key\s*=\s*"([^"]{40})"/.exec(text);
  if (!pub) throw new Error(`${file}: no public-key`);
  return { publicKey: pub[1], secretKey: sec ? sec[1] : null };
}

function curveOptions(opts) {
  if (opts.plaintext) return {};
  const server = readCert(path.join(opts.keysDir, "server.key"));
  const me = readCert(path.join(opts.keysDir, "clients", `${opts.client}.key_secret`));
  if (!me.secretKey) throw new Error("client certificate has no secret key");
  return { curveServerKey: server.publicKey, curvePublicKey: me.publicKey, curveSecretKey: me.secretKey };
}

function loadValidator(schemaDir) {
  const ajv = new Ajv2020({ allErrors: true, strict: false });
  addFormats(ajv);
  let eventId = null;
  for (const name of fs.readdirSync(schemaDir).filter((n) => n.endsWith(".json"))) {
    const schema = JSON.parse(fs.readFileSync(path.join(schemaDir, name), "utf8"));
    ajv.addSchema(schema);
    if (name === "event.json") eventId = schema.$id;
  }
  if (!eventId) throw new Error(`${schemaDir}: no event.json`);
  return ajv.getSchema(eventId);
}

class Replay {
  // Lazy Pirate: a request that gets no answer in time gets a fresh socket next time.
  constructor(endpoint, curve) {
    this.endpoint = endpoint;
    this.curve = curve;
    this.sock = null;
    this.req = 0;
  }
  socket() {
    if (!this.sock) {
      this.sock = new zmq.Dealer({ linger: 0, receiveTimeout: 3000, ...this.curve });
      this.sock.connect(this.endpoint);
    }
    return this.sock;
  }
  reset() {
    if (this.sock) this.sock.close();
    this.sock = null;
  }
  // -> {events: [[topic, body]], end}
  async fetch(since, until, max) {
    const req = ++this.req;
    const sock = this.socket();
    const request = { since, max, req };
    if (until !== null && until !== undefined) request.until = until;
    await sock.send(["sva.replay", JSON.stringify(request)]);
    const events = [];
    for (;;) {
      let frames;
      try {
        frames = await sock.receive();
      } catch (e) {
        this.reset();
        throw new Error(`replay ${this.endpoint}: no answer (${e.code || e.message})`);
      }
      if (frames.length !== 2) continue;
      const topic = frames[0].toString();
      if (topic === "sva.replay.end" || topic === "sva.replay.error") {
        const d = JSON.parse(frames[1].toString());
        if (d.req !== req) { events.length = 0; continue; }
        if (topic === "sva.replay.error") throw new Error(`replay refused: ${d.error}`);
        return { events, end: d };
      }
      events.push([topic, frames[1]]);
    }
  }
  close() { this.reset(); }
}

async function main() {
  const opts = parseArgs(process.argv);
  const curve = curveOptions(opts);
  const validate = loadValidator(opts.schemaDir);
  const sub = new zmq.Subscriber({ linger: 0, receiveTimeout: 250, ...curve });
  sub.connect(opts.endpoint);
  sub.subscribe("sva."); // everything: gaps are only visible on the whole stream
  const replay = new Replay(opts.replayEndpoint, curve);

  let next = opts.since === null ? null : opts.since + 1; // next seq to deliver
  let latest = opts.since === null ? -1 : opts.since + 1; // highest seq known to exist
  let delivered = 0;
  let invalid = 0;
  let stream = null;
  const started = Date.now();
  const done = () => (opts.count !== null && delivered >= opts.count) ||
    (opts.timeoutMs !== null && Date.now() - started > opts.timeoutMs);

  function deliver(ev) {
    next = ev.seq + 1;
    const ok = validate(ev);
    const line = { seq: ev.seq, id: ev.id, type: ev.type, topic: ev.topic, valid: ok };
    if (!ok) {
      invalid++;
      line.errors = validate.errors.map((e) => `${e.instancePath || "/"} ${e.message}`);
    }
    process.stdout.write(JSON.stringify(line) + "\n");
    delivered++;
  }

  async function fillGap() {
    while (next !== null && latest >= next && !done()) {
      let reply;
      try {
        reply = await replay.fetch(next - 1, latest, 1000);
      } catch (e) {
        process.stderr.write(`warning: gap ${next}..${latest} not filled yet: ${e.message}\n`);
        await new Promise((r) => setTimeout(r, 500));
        return;
      }
      const { events, end } = reply;
      if (stream === null) stream = end.stream;
      // Events and missing ranges together cover (since, through]: walk them in seq order.
      const items = events.map(([topic, body]) => {
        const ev = JSON.parse(body.toString());
        if (ev.topic !== topic.toString()) throw new Error(`topic frame ${topic} differs from ${ev.topic}`);
        return { seq: ev.seq, ev };
      });
      for (const [a, b, why] of end.missing) items.push({ seq: a, last: b, why });
      items.sort((x, y) => x.seq - y.seq);
      for (const it of items) {
        if (it.ev) {
          if (it.seq < next) continue;
          if (it.seq > next) reportLost(next, it.seq - 1, "unexplained");
          deliver(it.ev);
          if (done()) return;
        } else if (it.last >= next) {
          reportLost(Math.max(it.seq, next), it.last, it.why);
        }
      }
      if (end.through >= next) next = end.through + 1;
      latest = end.latest;
    }
  }

  function reportLost(a, b, why) {
    process.stderr.write(`LOST ${a} ${b} ${why}\n`);
    next = Math.max(next, b + 1);
  }

  while (!done()) {
    await fillGap();
    if (done()) break;
    let frames;
    try {
      frames = await sub.receive();
    } catch (e) {
      if (e.code === "EAGAIN") continue; // receiveTimeout: loop to check count/timeout
      throw e;
    }
    if (frames.length !== 2) continue;
    let ev;
    try {
      ev = JSON.parse(frames[1].toString());
    } catch (e) {
      process.stderr.write(`warning: malformed message on ${frames[0]}\n`);
      continue;
    }
    if (ev.type === "heartbeat") {
      const p = ev.payload || {};
      if (stream !== null && p.stream !== stream) process.stderr.write("warning: publisher journal changed\n");
      stream = p.stream;
      if (next === null) next = p.latest_seq + 1;
      latest = Math.max(latest, p.latest_seq);
      continue;
    }
    if (next === null) next = ev.seq;
    latest = Math.max(latest, ev.seq);
    if (ev.seq === next) deliver(ev); // in order: deliver; ahead: the gap is fetched above
  }
  sub.close();
  replay.close();
  process.exitCode = invalid ? 1 : 0;
}

main().catch((e) => {
  process.stderr.write(`error: ${e.message}\n`);
  process.exit(2);
});
