/**
 * `genvault sync` endpoints for repositories served over SSH (`genvault serve`, with
 * --permissions full and no namespace): the same interfaces as the local ones
 * (src/sync/endpoint.ts), each call one request of the remote protocol (sync-server.ts).
 * The destination checks every record itself with the repository's key, so this side
 * needs no key for either end.
 */
import { GenvaultError } from '../util/errors.js';
import type { RepoConfig } from '../format/config.js';
import type { ChunkLocation } from '../format/pack.js';
import type { Generation } from '../format/generation.js';
import { checkedLeaf, checkedTop } from '../format/chunkmap.js';
import type { RetentionRules } from '../lifecycle/retention.js';
import type { PinnedGeneration, RecordMember, SyncDestination, SyncSource } from '../sync/endpoint.js';
import { RemoteRepository, type RemoteOptions } from './client.js';
import { T, parseJson } from './protocol.js';
import { MAX_DIGESTS, b64, boolsOf, hexList, locationOf, locationText } from './sync-wire.js';

/** Leaves' bytes per call (base64 in JSON: well under a frame). */
const LEAF_BYTES_PER_CALL = 8 << 20;

async function openServed(url: string, opts: RemoteOptions): Promise<{ remote: RemoteRepository; config: RepoConfig }> {
  const remote = await RemoteRepository.open(url, opts);
  try {
    const { config } = await remote.call<{ config: RepoConfig }>('sync-config');
    return { remote, config };
  } catch (e) {
    remote.close();
    throw e;
  }
}

async function inBatches<T>(items: Buffer[], fn: (part: Buffer[]) => Promise<T[]>): Promise<T[]> {
  const out: T[] = [];
  for (let i = 0; i < items.length; i += MAX_DIGESTS) out.push(...(await fn(items.slice(i, i + MAX_DIGESTS))));
  return out;
}

export class RemoteDestination implements SyncDestination {
  readonly keys = null;
  private stored = 0;

  private constructor(
    private readonly remote: RemoteRepository,
    readonly config: RepoConfig,
    private readonly wait: boolean,
  ) {}

  static async open(url: string, opts: RemoteOptions & { wait?: boolean }): Promise<RemoteDestination> {
    const { remote, config } = await openServed(url, opts);
    return new RemoteDestination(remote, config, opts.wait === true);
  }

  get description(): string {
    return this.remote.dir;
  }

  get storedBytes(): number {
    return this.stored;
  }

  async generations(names?: string[]): Promise<Generation[]> {
    return (await this.remote.call<{ generations: Generation[] }>('sync-generations', { names: names ?? [] })).generations;
  }

  async begin(): Promise<void> {
    await this.remote.call('sync-dst-begin', { wait: this.wait });
  }

  async lockImage(name: string): Promise<void> {
    await this.remote.call('sync-dst-lock', { name });
  }

  async unlockImage(): Promise<void> {
    await this.remote.call('sync-dst-unlock');
  }

  private async lacking(op: string, digests: Buffer[]): Promise<boolean[]> {
    return inBatches(digests, async (part) => boolsOf((await this.remote.call<{ lacking: unknown }>(op, { digests: hexList(part) })).lacking, part.length, op));
  }

  lackingChunks(digests: Buffer[]): Promise<boolean[]> {
    return this.lacking('sync-dst-lacking-chunks', digests);
  }

  lackingLeaves(digests: Buffer[]): Promise<boolean[]> {
    return this.lacking('sync-dst-lacking-leaves', digests);
  }

  async copyRecord(record: Buffer, loc: ChunkLocation, digest: Buffer): Promise<number> {
    const head = Buffer.from(JSON.stringify({ location: locationText(loc), digest: digest.toString('hex') }));
    const n = Buffer.alloc(4);
    n.writeUInt32BE(head.length);
    const f = await this.remote.request(T.RECORD, Buffer.concat([n, head, record]));
    const r = parseJson(f.payload, 'RECORD');
    if (typeof r.put !== 'number') throw new GenvaultError(`${this.description}: malformed answer to RECORD`, 'PROTOCOL');
    return r.put;
  }

  async putRecord(_record: Buffer, _members: RecordMember[]): Promise<void> {
    throw new GenvaultError('a served destination takes records through copyRecord', 'INTERNAL');
  }

  async putLeaves(leaves: Array<{ digest: Buffer; bytes: Buffer }>): Promise<void> {
    let part: Array<{ digest: string; bytes: string }> = [];
    let bytes = 0;
    const send = async () => {
      if (part.length) await this.remote.call('sync-dst-put-leaves', { leaves: part });
      part = [];
      bytes = 0;
    };
    for (const l of leaves) {
      part.push({ digest: l.digest.toString('hex'), bytes: l.bytes.toString('base64') });
      bytes += l.bytes.length;
      if (bytes > LEAF_BYTES_PER_CALL || part.length >= 4096) await send();
    }
    await send();
  }

  private note(r: { stored?: unknown }): void {
    if (typeof r.stored === 'number') this.stored = r.stored;
  }

  async flush(): Promise<void> {
    this.note(await this.remote.call('sync-dst-flush'));
  }

  async commitGeneration(gen: Generation, top: Buffer): Promise<boolean> {
    const r = await this.remote.call<{ committed: boolean; stored: number }>('sync-dst-commit', { gen, top: top.toString('base64') });
    this.note(r);
    return r.committed === true;
  }

  async updateState(gen: Generation, state: { tags: string[]; protected: boolean }): Promise<boolean> {
    return (await this.remote.call<{ changed: boolean }>('sync-dst-update', { gen, tags: state.tags, protected: state.protected })).changed === true;
  }

  async prune(names: string[], rules: RetentionRules, opts: { minAgeMs?: number; dryRun?: boolean }): Promise<Generation[]> {
    return (await this.remote.call<{ removed: Generation[] }>('sync-dst-prune', { names, rules, minAgeMs: opts.minAgeMs, dryRun: opts.dryRun === true })).removed;
  }

  async end(): Promise<void> {
    await this.remote.call('sync-dst-end');
  }

  async abort(): Promise<void> {
    // A lost connection aborts on the server by itself (the session's end).
    if (!this.remote.lost) await this.remote.call('sync-dst-abort').catch(() => undefined);
  }

  async close(): Promise<void> {
    this.remote.close();
  }
}

export class RemoteSource implements SyncSource {
  private constructor(
    private readonly remote: RemoteRepository,
    readonly config: RepoConfig,
  ) {}

  static async open(url: string, opts: RemoteOptions): Promise<RemoteSource> {
    const { remote, config } = await openServed(url, opts);
    return new RemoteSource(remote, config);
  }

  get description(): string {
    return this.remote.dir;
  }

  async generations(names?: string[]): Promise<Generation[]> {
    return (await this.remote.call<{ generations: Generation[] }>('sync-generations', { names: names ?? [], strict: true })).generations;
  }

  async pin(g: Generation): Promise<PinnedGeneration | null> {
    const r = await this.remote.call<{ pinned: { gen: Generation; top: string } | null }>('sync-src-pin', { gen: g });
    if (!r.pinned) return null;
    const release = async () => {
      if (!this.remote.lost) await this.remote.call('sync-src-release', { id: g.id }).catch(() => undefined);
    };
    try {
      const top = b64(r.pinned.top, 'map', 64 << 20);
      const gen = r.pinned.gen;
      if (gen.id !== g.id || gen.name !== g.name) throw new GenvaultError(`${this.description}: pinned another generation than asked`, 'PROTOCOL');
      const refs = checkedTop(top, gen);
      return { gen, top, refs, release };
    } catch (e) {
      await release();
      throw e instanceof GenvaultError ? e : new GenvaultError(`${this.description}: ${g.name}@${g.id}: ${(e as Error).message}`, 'DAMAGED');
    }
  }

  async leaves(digests: Buffer[]): Promise<Buffer[]> {
    return inBatches(digests, async (part) => {
      const r = await this.remote.call<{ leaves: unknown }>('sync-src-leaves', { digests: hexList(part) });
      if (!Array.isArray(r.leaves) || r.leaves.length !== part.length) throw new GenvaultError(`${this.description}: malformed leaves`, 'PROTOCOL');
      return r.leaves.map((v, k) => {
        const b = b64(v, 'leaf', 4 << 20);
        checkedLeaf(b, part[k]!);
        return b;
      });
    });
  }

  async locate(digests: Buffer[]): Promise<Array<ChunkLocation | null>> {
    return inBatches(digests, async (part) => {
      const r = await this.remote.call<{ locations: unknown }>('sync-src-locate', { digests: hexList(part) });
      if (!Array.isArray(r.locations) || r.locations.length !== part.length) throw new GenvaultError(`${this.description}: malformed locations`, 'PROTOCOL');
      return r.locations.map((v) => locationOf(v, 'location'));
    });
  }

  async readRecord(loc: ChunkLocation): Promise<Buffer> {
    const f = await this.remote.request(T.RECREAD, Buffer.from(locationText(loc)!));
    if (f.type !== T.DATA || f.payload.length < 1 || f.payload[0] !== 0) throw new GenvaultError(`${this.description}: malformed record answer`, 'PROTOCOL');
    return f.payload.subarray(1);
  }

  async close(): Promise<void> {
    this.remote.close();
  }
}
