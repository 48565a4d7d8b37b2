/**
 * A local repository as the source of a sync: opened for reading only (its index, its
 * packs; never its key: the index is plaintext and sealed records are copied as they
 * are). Generations being copied are pinned (locks/pin-ID-PID.json, as the mount pins
 * the files it has open), so a forget or prune at the source meanwhile only hides them
 * and a gc keeps their data until the copy is done.
 */
import type { IndexKeys } from '../format/index-seal.js';
import { GenvaultError, REPAIR_HINT } from '../util/errors.js';
import { getOrNull } from '../index/db.js';
import { chunkKey, leafKey } from '../format/keys.js';
import { checkedLeaf, checkedTop } from '../format/chunkmap.js';
import { RECORD_HEADER_SIZE, decodeLocation, isLocation, type ChunkLocation } from '../format/pack.js';
import { type Generation } from '../format/generation.js';
import { readRecordSpan } from '../store/pack-reader.js';
import { Pin } from '../repository/locks.js';
import { Repository } from '../repository/repository.js';
import { openCurrent } from '../lifecycle/open-current.js';
import type { PinnedGeneration, SyncSource } from './endpoint.js';

export class LocalSource implements SyncSource {
  private constructor(
    private readonly repo: Repository,
    /** Opened here (closed by close()), or the caller's (a job's repository, left open). */
    private readonly owned: boolean,
  ) {}

  static async open(dir: string): Promise<LocalSource> {
    return new LocalSource(await openCurrent(dir, { withoutKey: true }), true);
  }

  /** A repository the caller has open (a sync job's); close() leaves it open. */
  static of(repo: Repository): LocalSource {
    return new LocalSource(repo, false);
  }

  get description(): string {
    return this.repo.dir;
  }

  get config() {
    return this.repo.config;
  }

  adoptIndexKeys(keys: IndexKeys): void {
    this.repo.adoptIndexKeys(keys);
  }

  async generations(names?: string[]): Promise<Generation[]> {
    // A sealed index (format 7) needs the key: the destination's (adopted), else our own.
    await this.repo.unlockIndex();
    if (!names?.length) return this.repo.generations();
    const out: Generation[] = [];
    for (const n of [...new Set(names)]) {
      const gens = await this.repo.generations(n);
      if (!gens.length) throw new GenvaultError(`no image named ${n} in ${this.repo.dir}`, 'NOT_FOUND');
      out.push(...gens);
    }
    return out;
  }

  async pin(g: Generation): Promise<PinnedGeneration | null> {
    // On read-only media no pin can be written; nothing can forget the generation there either.
    const pin = await Pin.take(this.repo.dir, g.id).catch(() => null);
    const release = async () => {
      await pin?.release().catch(() => undefined);
    };
    try {
      // Read again once pinned: forgotten before the pin, it is gone (or hidden) now.
      const k = this.repo.generationKey(g);
      const v = await getOrNull(this.repo.db, k);
      if (!v) return (await release(), null);
      let gen: Generation;
      try {
        gen = this.repo.genIndex.parse(k, v);
      } catch (e) {
        throw new GenvaultError(`source index damaged: the generation record of ${g.name}@${g.id} is corrupt (${(e as Error).message}; ${REPAIR_HINT})`, 'DAMAGED');
      }
      if (gen.removed) return (await release(), null);
      const top = await getOrNull(this.repo.db, Repository.mapKey(g.id));
      if (!top) throw new GenvaultError(`source index damaged: the map of ${g.name}@${g.id} is missing (${REPAIR_HINT})`, 'DAMAGED');
      let refs;
      try {
        refs = checkedTop(top, gen);
      } catch (e) {
        throw new GenvaultError(`source index damaged: ${g.name}@${g.id}: ${(e as Error).message} (${REPAIR_HINT})`, 'DAMAGED');
      }
      return { gen, top: Buffer.from(top), refs, release };
    } catch (e) {
      await release();
      throw e;
    }
  }

  async leaves(digests: Buffer[]): Promise<Buffer[]> {
    const got = await this.repo.db.getMany(digests.map((d) => leafKey(d)));
    return got.map((v, i) => {
      const d = digests[i]!;
      if (!v) throw new GenvaultError(`source index damaged: map leaf ${d.toString('hex')} is missing (${REPAIR_HINT})`, 'DAMAGED');
      const b = Buffer.from(v);
      try {
        checkedLeaf(b, d);
      } catch (e) {
        throw new GenvaultError(`source index damaged: map leaf ${d.toString('hex')}: ${(e as Error).message} (${REPAIR_HINT})`, 'DAMAGED');
      }
      return b;
    });
  }

  async locate(digests: Buffer[]): Promise<Array<ChunkLocation | null>> {
    const got = await this.repo.db.getMany(digests.map((d) => chunkKey(d)));
    return got.map((v, i) => {
      if (v === undefined || v === null) return null;
      if (!isLocation(v)) throw new GenvaultError(`source index damaged: the entry of chunk ${digests[i]!.toString('hex')} is not a location (${REPAIR_HINT})`, 'DAMAGED');
      return decodeLocation(v);
    });
  }

  async readRecord(loc: ChunkLocation): Promise<Buffer> {
    const len = RECORD_HEADER_SIZE + loc.storedLength;
    const buf = Buffer.allocUnsafe(len);
    const got = await readRecordSpan(this.repo.store, loc.packId, loc.offset, len, buf);
    return buf.subarray(0, got);
  }

  async close(): Promise<void> {
    if (this.owned) await this.repo.close();
  }
}
