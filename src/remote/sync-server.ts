/**
 * `genvault sync` with a repository served over SSH at either end: the serve session's
 * side. The session's repository is a sync destination (LocalDestination) or source
 * (LocalSource), driven call by call by the client's copy loop (src/sync/sync.ts).
 *
 * Sync copies stored records and map leaves between whole repositories, so it is the
 * repository admin's operation: a session needs `--permissions full` and no namespace.
 * Even so nothing the client sends is taken on trust: every record is checked here in
 * full (header, member table, decoded, hashed against its identity, and with the key,
 * authenticated) before it is appended, leaves are checked against their digests, and a
 * generation is committed only when its map matches its record and every leaf and chunk
 * it names is in the index.
 */
import { GenvaultError } from '../util/errors.js';
import { checkedLeaf, checkedTop, type LeafRef } from '../format/chunkmap.js';
import { chunkKey, leafKey } from '../format/keys.js';
import { generationKey, parseGenerationRecord, type Generation } from '../format/generation.js';
import type { Repository } from '../repository/repository.js';
import type { RetentionRules } from '../lifecycle/retention.js';
import { LocalDestination } from '../sync/local-destination.js';
import { LocalSource } from '../sync/local-source.js';
import { checkSourceRecord } from '../sync/check.js';
import type { PinnedGeneration } from '../sync/endpoint.js';
import type { Access } from './access.js';
import { ProtocolError } from './frames.js';
import { b64, digestsOf, hexList, locationOf, locationText } from './sync-wire.js';
import { num, str, strList } from './protocol.js';

/** Largest record sync hands over (as in src/sync/sync.ts). */
export const MAX_SYNC_RECORD = 32 << 20;

export class SyncServer {
  private dst: LocalDestination | null = null;
  private src: LocalSource | null = null;
  private pinned = new Map<string, PinnedGeneration>();

  constructor(
    private readonly repo: Repository,
    private readonly access: Access,
  ) {}

  private destination(): LocalDestination {
    if (!this.dst) throw new GenvaultError('sync: the destination was not begun', 'PROTOCOL');
    return this.dst;
  }

  private source(): LocalSource {
    this.src ??= LocalSource.of(this.repo);
    return this.src;
  }

  /** One sync call; undefined for ops that are not sync's. */
  async op(op: string, c: Record<string, unknown>): Promise<unknown> {
    if (!op.startsWith('sync-')) return undefined;
    if (this.access.namespace) throw new GenvaultError('permission denied: sync copies whole repositories; this key is pinned to a namespace', 'EPERM');
    this.access.require('full', 'sync');
    switch (op) {
      case 'sync-config':
        return { config: this.repo.config };
      case 'sync-generations': {
        // As a source, an unknown name is an error; as a destination, it has none yet.
        const names = strList(c, 'names', op);
        if (c.strict === true) return { generations: await this.source().generations(names) };
        const all = await this.repo.generations();
        return { generations: names.length ? all.filter((g) => names.includes(g.name)) : all };
      }
      // -- destination
      case 'sync-dst-begin':
        if (this.dst) throw new GenvaultError('sync: already begun', 'PROTOCOL');
        this.dst = LocalDestination.of(this.repo, { wait: c.wait === true });
        await this.dst!.begin();
        return {};
      case 'sync-dst-lock':
        await this.destination().lockImage(this.access.inner(str(c, 'name', op)!));
        return {};
      case 'sync-dst-unlock':
        await this.destination().unlockImage();
        return {};
      case 'sync-dst-lacking-chunks':
        return { lacking: await this.destination().lackingChunks(digestsOf(c.digests, op)) };
      case 'sync-dst-lacking-leaves':
        return { lacking: await this.destination().lackingLeaves(digestsOf(c.digests, op)) };
      case 'sync-dst-put-leaves':
        return this.putLeaves(c.leaves);
      case 'sync-dst-flush':
        await this.destination().flush();
        return { stored: this.destination().storedBytes };
      case 'sync-dst-commit':
        return this.commit(c);
      case 'sync-dst-update': {
        const gen = this.generation(c.gen);
        const tags = strList(c, 'tags', op);
        return { changed: await this.destination().updateState(gen, { tags, protected: c.protected === true }) };
      }
      case 'sync-dst-prune': {
        const names = strList(c, 'names', op).map((n) => this.access.inner(n));
        const rules = (typeof c.rules === 'object' && c.rules !== null ? c.rules : {}) as RetentionRules;
        const removed = await this.destination().prune(names, rules, { minAgeMs: num(c, 'minAgeMs', op, true), dryRun: c.dryRun === true });
        return { removed };
      }
      case 'sync-dst-end':
        await this.destination().end();
        this.dst = null;
        return { stored: 0 };
      case 'sync-dst-abort':
        await this.abort();
        return {};
      // -- source
      case 'sync-src-pin':
        return this.pin(c.gen);
      case 'sync-src-release': {
        const id = str(c, 'id', op)!;
        await this.pinned.get(id)?.release();
        this.pinned.delete(id);
        return {};
      }
      case 'sync-src-leaves':
        return { leaves: (await this.source().leaves(digestsOf(c.digests, op))).map((b) => b.toString('base64')) };
      case 'sync-src-locate':
        return { locations: (await this.source().locate(digestsOf(c.digests, op))).map(locationText) };
      default:
        throw new GenvaultError(`unknown operation ${JSON.stringify(op).slice(0, 100)}`, 'PROTOCOL');
    }
  }

  /** A generation record from the client, checked as the index's own are. */
  private generation(v: unknown): Generation {
    if (typeof v !== 'object' || v === null) throw new ProtocolError('sync: a generation record expected');
    const g = v as Generation;
    try {
      return parseGenerationRecord(generationKey(g), Buffer.from(JSON.stringify(g)));
    } catch (e) {
      throw new ProtocolError(`sync: malformed generation record: ${(e as Error).message}`);
    }
  }

  private async putLeaves(v: unknown): Promise<unknown> {
    if (!Array.isArray(v) || v.length > 4096) throw new ProtocolError('sync: a list of leaves expected');
    const leaves = v.map((l: unknown) => {
      const o = (l ?? {}) as Record<string, unknown>;
      const [digest] = digestsOf([o.digest], 'leaf');
      const bytes = b64(o.bytes, 'leaf', 4 << 20);
      try {
        checkedLeaf(bytes, digest!);
      } catch (e) {
        throw new GenvaultError(`sync: map leaf ${digest!.toString('hex')}: ${(e as Error).message}`, 'DAMAGED');
      }
      return { digest: digest!, bytes };
    });
    await this.destination().putLeaves(leaves);
    return {};
  }

  private async commit(c: Record<string, unknown>): Promise<unknown> {
    const gen = this.generation(c.gen);
    if (!this.access.owns(gen.name)) throw new GenvaultError('sync: generation outside the session', 'EPERM');
    const top = b64(c.top, 'map', 64 << 20);
    let refs: LeafRef[];
    try {
      refs = checkedTop(top, gen);
    } catch (e) {
      throw new GenvaultError(`sync: ${gen.name}@${gen.id}: ${(e as Error).message}`, 'DAMAGED');
    }
    const dst = this.destination();
    await dst.flush();
    await this.referencesPresent(gen, refs);
    return { committed: await dst.commitGeneration(gen, top), stored: dst.storedBytes };
  }

  /** Every leaf of the map and every chunk of every leaf is in the index (committed by the flushes). */
  private async referencesPresent(gen: Generation, refs: LeafRef[]): Promise<void> {
    const label = `${gen.name}@${gen.id}`;
    for (let i = 0; i < refs.length; i += 64) {
      const part = refs.slice(i, i + 64);
      const leaves = await this.repo.db.getMany(part.map((r) => leafKey(r.digest)));
      for (let k = 0; k < part.length; k++) {
        const raw = leaves[k];
        if (!raw) throw new GenvaultError(`sync: ${label} names map leaf ${part[k]!.digest.toString('hex')}, which was not sent`, 'DAMAGED');
        const leaf = checkedLeaf(Buffer.from(raw), part[k]!.digest, part[k]!);
        const ds: Buffer[] = [];
        for (let j = 0; j < leaf.lengths.length; j++) if (!leaf.zero[j]) ds.push(Buffer.from(leaf.digests.subarray(j * 32, j * 32 + 32)));
        const found = await this.repo.db.getMany(ds.map((d) => chunkKey(d)));
        const missing = found.findIndex((v) => v === undefined || v === null);
        if (missing >= 0) throw new GenvaultError(`sync: ${label} names chunk ${ds[missing]!.toString('hex')}, which was not sent`, 'DAMAGED');
      }
    }
  }

  /** A RECORD frame: u32 header length | JSON {location, digest} | the record's stored bytes. */
  async record(payload: Buffer): Promise<unknown> {
    if (payload.length < 4) throw new ProtocolError('RECORD too short');
    const n = payload.readUInt32BE(0);
    if (n > 4096 || 4 + n > payload.length) throw new ProtocolError('RECORD: bad header length');
    let h: Record<string, unknown>;
    try {
      h = JSON.parse(payload.toString('utf8', 4, 4 + n)) as Record<string, unknown>;
    } catch {
      throw new ProtocolError('RECORD: header not valid JSON');
    }
    const loc = locationOf(h.location, 'RECORD');
    const [digest] = digestsOf([h.digest], 'RECORD');
    const rec = payload.subarray(4 + n);
    if (!loc || rec.length > MAX_SYNC_RECORD) throw new ProtocolError('RECORD: bad location or size');
    const dst = this.destination();
    // The client's copy loop checked it too; here it is checked with the repository's key.
    const members = checkSourceRecord(rec, loc, digest!, this.repo.keys);
    const want = members.length > 1 ? await dst.lackingChunks(members.map((m) => m.digest)) : await dst.lackingChunks([digest!]);
    const put = members.filter((_, k) => want[k]);
    if (put.length) await dst.putRecord(Buffer.from(rec), put);
    return { put: put.length, digests: hexList(put.map((m) => m.digest)) };
  }

  private async pin(v: unknown): Promise<unknown> {
    const g = this.generation(v);
    if (!this.access.owns(g.name)) throw new GenvaultError(`no generation ${g.id}`, 'NOT_FOUND');
    const p = await this.source().pin(g);
    if (!p) return { pinned: null };
    await this.pinned.get(g.id)?.release();
    this.pinned.set(g.id, p);
    return { pinned: { gen: p.gen, top: p.top.toString('base64') } };
  }

  /** A RECREAD request: the stored bytes at a location (an admin's session only). */
  async readRecord(payload: Buffer): Promise<Buffer> {
    if (this.access.namespace) throw new GenvaultError('permission denied: sync copies whole repositories; this key is pinned to a namespace', 'EPERM');
    this.access.require('full', 'sync');
    const loc = locationOf(payload.toString('utf8'), 'RECREAD');
    if (!loc || loc.storedLength > MAX_SYNC_RECORD) throw new ProtocolError('RECREAD: bad location');
    return this.source().readRecord(loc);
  }

  private async abort(): Promise<void> {
    const d = this.dst;
    this.dst = null;
    await d?.abort();
  }

  /** The session ends: a destination not ended is aborted (nothing half-visible), pins released. */
  async close(): Promise<void> {
    await this.abort().catch(() => undefined);
    for (const p of this.pinned.values()) await p.release().catch(() => undefined);
    this.pinned.clear();
  }
}
