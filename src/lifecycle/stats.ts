/**
 * Space per image, from the chunk maps and the chunk index alone (no pack is read): what
 * each image's generations reference, how much of that only this image references (what
 * forgetting every generation of it, then `gc`, would free), and per generation what only
 * that generation references (what forgetting it would free).
 *
 * A chunk's stored size is its record's share of its pack (format/pack.ts recordShare: a
 * group record's bytes apportioned to its members by raw length). Map leaves and the
 * index itself are not counted.
 */
import { walkChunks } from '../format/chunkmap.js';
import type { Generation } from '../format/generation.js';
import { K_CHUNK } from '../format/keys.js';
import { recordShare } from '../format/pack.js';
import type { Repository } from '../repository/repository.js';

export interface GenerationSpace {
  id: string;
  created: string;
  protected: boolean;
  /** Stored bytes of chunks no other generation references: freed by forgetting it (then gc). */
  uniqueBytes: number;
}

export interface ImageSpace {
  name: string;
  generations: number;
  /** Size of the newest generation's image. */
  size: number;
  /** Stored bytes of every distinct chunk the image's generations reference. */
  storedBytes: number;
  /** Of those, referenced by no other image: freed by forgetting the whole image (then gc). */
  uniqueBytes: number;
  /** storedBytes - uniqueBytes: also referenced by other images. */
  sharedBytes: number;
  /** Per generation, oldest first (only when asked for). */
  perGeneration?: GenerationSpace[];
}

export interface RepositorySpace {
  images: ImageSpace[];
  /** Stored bytes of every chunk some generation references. */
  referencedBytes: number;
  /** Stored bytes of chunk entries no generation references: what `gc` would reclaim now. */
  unreferencedBytes: number;
  /** Bytes of the pack files as stored (records, headers, and space gc has yet to reclaim). */
  packBytes: number;
  /** Chunks referenced by a map that the chunk index lacks (damage: see `genvault verify`). */
  missingChunks: number;
}

/** Per distinct chunk: its stored share and which images and generations reference it. */
interface Use {
  stored: number;
  known: boolean;
  lastImage: number;
  images: number;
  lastGen: number;
  gens: number;
}

async function chunkTable(repo: Repository): Promise<Map<string, Use>> {
  const uses = new Map<string, Use>();
  for await (const [k, v] of repo.db.iterator({ gte: Buffer.of(K_CHUNK), lt: Buffer.of(K_CHUNK + 1) })) {
    uses.set(k.subarray(1).toString('latin1'), { stored: recordShare(v), known: true, lastImage: -1, images: 0, lastGen: -1, gens: 0 });
  }
  return uses;
}

/** Walk every generation's map, counting per chunk the images and generations that use it. */
async function markUses(repo: Repository, gens: Generation[], images: ImageSpace[], uses: Map<string, Use>): Promise<number> {
  let missing = 0;
  let imageIdx = -1;
  for (let gi = 0; gi < gens.length; gi++) {
    const g = gens[gi]!;
    if (images[imageIdx]?.name !== g.name) imageIdx++; // generations() lists each image's together
    const img = images[imageIdx]!;
    for await (const c of walkChunks(await repo.chunkMap(g))) {
      if (c.zero) continue;
      const d = c.digest.toString('latin1');
      let u = uses.get(d);
      if (!u) {
        missing++;
        u = { stored: 0, known: false, lastImage: -1, images: 0, lastGen: -1, gens: 0 };
        uses.set(d, u);
      }
      if (u.lastGen !== gi) {
        u.lastGen = gi;
        u.gens++;
      }
      if (u.lastImage !== imageIdx) {
        u.lastImage = imageIdx;
        u.images++;
        img.storedBytes += u.stored;
      }
    }
  }
  return missing;
}

export async function repositorySpace(repo: Repository, opts: { perGeneration?: boolean } = {}): Promise<RepositorySpace> {
  const gens = await repo.generations();
  const images: ImageSpace[] = [];
  for (const g of gens) {
    const last = images.at(-1);
    if (last?.name === g.name) {
      last.generations++;
      last.size = g.size;
    } else images.push({ name: g.name, generations: 1, size: g.size, storedBytes: 0, uniqueBytes: 0, sharedBytes: 0 });
  }
  const uses = await chunkTable(repo);
  const missingChunks = await markUses(repo, gens, images, uses);
  const genUnique = new Float64Array(gens.length);
  let referencedBytes = 0;
  let unreferencedBytes = 0;
  for (const u of uses.values()) {
    if (!u.gens) {
      unreferencedBytes += u.stored;
      continue;
    }
    referencedBytes += u.stored;
    if (u.images === 1) images[u.lastImage]!.uniqueBytes += u.stored;
    if (u.gens === 1) genUnique[u.lastGen] += u.stored;
  }
  let gi = 0;
  for (const img of images) {
    img.sharedBytes = img.storedBytes - img.uniqueBytes;
    const mine = gens.slice(gi, gi + img.generations);
    if (opts.perGeneration) img.perGeneration = mine.map((g, i) => ({ id: g.id, created: g.created, protected: g.protected === true, uniqueBytes: genUnique[gi + i]! }));
    gi += img.generations;
  }
  let packBytes = 0;
  for await (const o of repo.store.list('packs')) packBytes += o.size;
  return { images, referencedBytes, unreferencedBytes, packBytes, missingChunks };
}
