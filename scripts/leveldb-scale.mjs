// leveldb-scale: what LevelDB's own operations cost per key in a repository's index, the
// primitives gc is made of, so that gc's time at growing chunk counts can be set against
// its index's (scripts/bench-gc-scale, BENCH_GC_LEVELDB=1). Used by a bench script, never
// by tests. Run it on a copy: it writes keys into the index and deletes them again.
//
//   node scripts/leveldb-scale.mjs INDEX_DIR
//
// Opened as gc opens it (a table cache of OPEN_FILES_FOR_PASSES), no genvault code on the
// path, one JSON line on stdout with microseconds per key for:
//   pass     every chunk entry ('c'), nextv 1,024 at a time (condemning, planning, gathering)
//   get      1 in 50 of them, shuffled, getMany 2,048 at a time (the repack's moves)
//   sortedget the same keys sorted, getMany 2,048 at a time (the sweep)
//   put      1 in 10 as many new keys, in key order, batches of 16,384, synced (condemning)
//   scandel  those keys read back a slice at a time and deleted, batches of 16,384, synced
//            (finishing)
// Keys are put under a prefix byte no genvault key uses ('~'), so nothing of the
// repository's meaning changes even if the run is cut off; the copy is for the space.
import { randomBytes, randomInt } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const dist = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist');
const { OPEN_FILES_FOR_PASSES } = await import(path.join(dist, 'index/db.js'));
const { K_CHUNK } = await import(path.join(dist, 'format/keys.js'));
const { ClassicLevel } = await import('classic-level');

const [dir] = process.argv.slice(2);
if (!dir) {
  console.error('usage: node scripts/leveldb-scale.mjs INDEX_DIR');
  process.exit(2);
}
const PROBE = 0x7e;
const db = new ClassicLevel(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer', maxOpenFiles: OPEN_FILES_FOR_PASSES, createIfMissing: false });
await db.open();
const out = {};
const timed = async (name, count, fn) => {
  const t0 = process.hrtime.bigint();
  const c0 = process.cpuUsage();
  await fn();
  const ns = Number(process.hrtime.bigint() - t0);
  const cpu = process.cpuUsage(c0);
  out[name] = { keys: count(), us: +(ns / 1e3 / count()).toFixed(3), cpuUs: +((cpu.user + cpu.system) / count()).toFixed(3) };
  process.stderr.write(`leveldb-scale: ${name}: ${count()} keys, ${(ns / 1e9).toFixed(1)} s\n`);
};

// pass, sampling 1 in 50 keys for the gets
let n = 0;
const sample = [];
await timed('pass', () => n, async () => {
  const it = db.iterator({ gte: Buffer.of(K_CHUNK), lt: Buffer.of(K_CHUNK + 1) });
  try {
    for (;;) {
      const part = await it.nextv(1024);
      if (!part.length) break;
      for (const [k] of part) if (n++ % 50 === 0) sample.push(k);
    }
  } finally {
    await it.close();
  }
});
for (let i = sample.length - 1; i > 0; i--) {
  const j = randomInt(i + 1);
  [sample[i], sample[j]] = [sample[j], sample[i]];
}
await timed('get', () => sample.length, async () => {
  for (let at = 0; at < sample.length; at += 2048) {
    const got = await db.getMany(sample.slice(at, at + 2048));
    if (got.some((v) => v === undefined)) throw new Error('leveldb-scale: a sampled key is gone: is something else writing this index?');
  }
});
// The same keys again, sorted first: consecutive gets fall in the same tables.
const sorted = [...sample].sort(Buffer.compare);
await timed('sortedget', () => sorted.length, async () => {
  for (let at = 0; at < sorted.length; at += 2048) await db.getMany(sorted.slice(at, at + 2048));
});

const W = Math.ceil(n / 10);
// In key order, spread over the key space as the condemned set is (an 8-byte step, random below it).
const step = 2n ** 64n / BigInt(W);
const key = (i) => {
  const k = Buffer.concat([Buffer.of(PROBE), randomBytes(32)]);
  k.writeBigUInt64BE(BigInt(i) * step, 1);
  return k;
};
const value = randomBytes(41);
await timed('put', () => W, async () => {
  for (let at = 0; at < W; at += 16384) {
    const ops = [];
    for (let i = at; i < Math.min(W, at + 16384); i++) ops.push({ type: 'put', key: key(i), value });
    await db.batch(ops, { sync: true });
  }
});
// Read back and deleted as finishing does: a slice at a time, deletes in batches of 16,384.
let seen = 0;
await timed('scandel', () => seen, async () => {
  const it = db.iterator({ gte: Buffer.of(PROBE), lt: Buffer.of(PROBE + 1), values: false });
  let ops = [];
  try {
    for (let part = await it.nextv(1024); part.length; part = await it.nextv(1024)) {
      seen += part.length;
      for (const k of part) ops.push({ type: 'del', key: k });
      if (ops.length >= 16384) {
        await db.batch(ops, { sync: true });
        ops = [];
      }
    }
    if (ops.length) await db.batch(ops, { sync: true });
  } finally {
    await it.close();
  }
});
if (seen !== W) throw new Error(`leveldb-scale: ${seen} keys read back of ${W}`);
await db.close();
console.log(JSON.stringify({ chunks: n, ...out }));
