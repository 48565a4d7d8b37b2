// gc-synth: fill an empty, unencrypted local repository with N synthetic chunks, for
// measuring gc at scale (scripts/bench-gc-scale). Used by a bench script, never by tests.
//
//   node scripts/gc-synth.mjs REPO N
//
// Chunk i is a raw record of 16 bytes (i and a seed), so that the chunk count, not the
// data, is what costs. Packs hold 2^20 records each and are spread over 4 generations of
// 4 images. Which chunks no generation references depends on the pack's number p:
//   p % 8 == 7   all (the pack is deleted)
//   p % 8 == 6   80% (the pack is rewritten: 20% copied)
//   otherwise    10% (the pack stays)
// about 30% of the chunks in all. Generations live in the index only (no metadata
// records in packs): gc does not read them there, repair could not rebuild them.
import { createHash, randomBytes } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const dist = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist');
const { Repository } = await import(path.join(dist, 'repository/repository.js'));
const { WriterRegistration } = await import(path.join(dist, 'repository/locks.js'));
const { PackWriter } = await import(path.join(dist, 'store/pack-writer.js'));
const { encodeRecordHeader, encodeLocation, COMP_RAW, RECORD_HEADER_SIZE } = await import(path.join(dist, 'format/pack.js'));
const { chunkKey, leafKey } = await import(path.join(dist, 'format/keys.js'));
const { LeafBuilder, encodeTop } = await import(path.join(dist, 'format/chunkmap.js'));

const [dir, nArg] = process.argv.slice(2);
const N = Number(nArg);
if (!dir || !Number.isSafeInteger(N) || N < 1) {
  console.error('usage: node scripts/gc-synth.mjs REPO N');
  process.exit(2);
}
const PER_PACK = Number(process.env.GC_SYNTH_PER_PACK ?? 1 << 20); // smaller for a quick check
const BATCH = Math.min(1 << 16, PER_PACK);
const PAYLOAD = 16;
const REC = RECORD_HEADER_SIZE + PAYLOAD;
const IMAGES = 4;

const garbage = (p, i) => (p % 8 === 7 ? true : p % 8 === 6 ? i % 10 < 8 : i % 10 === 9);

const repo = await Repository.open(dir, { write: true });
if (repo.config.encryption) throw new Error('gc-synth: an unencrypted repository, please');
const writer = await WriterRegistration.register(repo.dir, 'gc-synth');
const seed = randomBytes(8);
const packs = Math.ceil(N / PER_PACK);
const started = Date.now();
let gen = null;

/** The generation image `k` gets: packs [k*packs/IMAGES, (k+1)*packs/IMAGES). */
function newGen(k) {
  return { k, leaves: new LeafBuilder(repo.config.leaf.minChunks, repo.config.leaf.maxChunks), refs: [], chunks: 0 };
}

async function commitGen(g, ops) {
  const last = g.leaves.finish();
  if (last) {
    g.refs.push(last.ref);
    ops.push({ type: 'put', key: leafKey(last.ref.digest), value: last.encoded });
  }
  const id = randomBytes(8).toString('hex');
  const size = g.chunks * PAYLOAD;
  const rec = {
    id,
    name: `synth-${g.k}`,
    created: new Date().toISOString(),
    size,
    chunking: repo.config.chunking,
    leaves: g.refs.length,
    tags: [],
    source: 'gc-synth',
    parent: null,
    stats: { bytesRead: size, zeroBytes: 0, chunks: g.chunks, newChunks: g.chunks, newBytes: size, newStored: size, durationMs: 0 },
  };
  ops.push({ type: 'put', key: Repository.mapKey(id), value: encodeTop(g.refs) });
  ops.push({ type: 'put', key: repo.generationKey(rec), value: repo.genIndex.value(rec, Buffer.from(JSON.stringify(rec))) });
}

for (let p = 0; p < packs; p++) {
  const k = Math.floor((p * IMAGES) / packs);
  const ops = [];
  if (!gen || gen.k !== k) {
    if (gen) await commitGen(gen, ops);
    gen = newGen(k);
  }
  const w = await PackWriter.create(repo.store, { toc: repo.config.version >= 5, register: (id) => writer.addPack(id) });
  const first = p * PER_PACK;
  const end = Math.min(N, first + PER_PACK);
  for (let at = first; at < end; at += BATCH) {
    const n = Math.min(BATCH, end - at);
    const buf = Buffer.alloc(n * REC);
    const base = w.size;
    for (let j = 0; j < n; j++) {
      const i = at + j;
      const o = j * REC;
      const payload = buf.subarray(o + RECORD_HEADER_SIZE, o + REC);
      payload.writeUInt32LE(i % 0x1_0000_0000, 0);
      payload.writeUInt32LE(Math.floor(i / 0x1_0000_0000), 4);
      seed.copy(payload, 8);
      const d = createHash('sha256').update(payload).digest();
      encodeRecordHeader(buf, o, COMP_RAW, PAYLOAD, PAYLOAD, d);
      ops.push({ type: 'put', key: chunkKey(d), value: encodeLocation({ packId: w.packId, offset: base + o, storedLength: PAYLOAD, rawLength: PAYLOAD, compression: COMP_RAW }) });
      if (garbage(p, i)) continue;
      gen.chunks++;
      const leaf = gen.leaves.add({ length: PAYLOAD, zero: false, digest: d });
      if (leaf) {
        gen.refs.push(leaf.ref);
        ops.push({ type: 'put', key: leafKey(leaf.ref.digest), value: leaf.encoded });
      }
    }
    await w.append(buf);
    await w.sync();
    ops.push(w.commitOp());
    await repo.db.batch(ops.splice(0), { sync: true });
  }
  await w.close();
  process.stderr.write(`gc-synth: pack ${p + 1}/${packs}, ${end} chunks, ${Math.round((Date.now() - started) / 1000)} s\n`);
}
const ops = [];
await commitGen(gen, ops);
await repo.db.batch(ops, { sync: true });
await writer.release();
await repo.close();
process.stderr.write(`gc-synth: ${N} chunks in ${packs} packs, ${Math.round((Date.now() - started) / 1000)} s\n`);
if (process.env.GC_SYNTH_SETTLE === '1') await settle(path.join(dir, 'index'));

/**
 * Writing as fast as LevelDB takes it leaves compaction behind (levels over their targets,
 * L0 files queued): the first process to open the index would pay for it (measured in
 * native-notes/performance.md). A repository filled by backups over months does not carry
 * that debt, so the bench lets LevelDB finish (its LOG quiet for 15 s).
 */
async function settle(index) {
  const { ClassicLevel } = await import('classic-level');
  const { stat } = await import('node:fs/promises');
  const t0 = Date.now();
  const db = new ClassicLevel(index, { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  await db.open();
  let last = -1;
  for (let quiet = 0; quiet < 15; ) {
    await new Promise((r) => setTimeout(r, 1000));
    const size = (await stat(path.join(index, 'LOG'))).size;
    quiet = size === last ? quiet + 1 : 0;
    last = size;
  }
  await db.close();
  process.stderr.write(`gc-synth: LevelDB settled in ${Math.round((Date.now() - t0) / 1000) - 15} s\n`);
}
