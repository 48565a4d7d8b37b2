/**
 * What the NBD server serves: a generation, read with the mount's reader (src/read: the
 * shared decoded-chunk cache, and each connection its own read-ahead), optionally behind
 * a copy-on-write overlay (overlay.ts) that takes the client's writes.
 *
 * While an export exists its generation is pinned (locks/pin-ID-PID.json, as the mount
 * pins the generations of its open files), so prune, forget and gc leave its data alone.
 */
import { Generation, generationFileName } from '../format/generation.js';
import { ChunkLoader, ImageReader } from '../read/reader.js';
import { Pin } from '../repository/locks.js';
import type { Repository } from '../repository/repository.js';
import type { Overlay } from './overlay.js';

export interface Extent {
  length: number;
  zero: boolean;
}

/** One client's use of an export. */
export interface ExportConnection {
  /** Fill out[0, length) with the image bytes at offset (in range: checked by the server). */
  read(out: Buffer, offset: number, length: number): Promise<void>;
  /** Zero and data runs over [offset, offset + length), at most maxRuns of them. */
  extents(offset: number, length: number, maxRuns: number): Promise<Extent[]>;
  write?(data: Buffer, offset: number, fua: boolean): Promise<void>;
  zero?(offset: number, length: number, fua: boolean): Promise<void>;
  flush?(): Promise<void>;
  close(): Promise<void> | void;
}

export interface NbdExport {
  /** The generation's file name in the mounted tree. */
  readonly canonicalName: string;
  readonly description: string;
  readonly size: number;
  readonly writable: boolean;
  open(): Promise<ExportConnection>;
}

/** Pins per generation id held by this process: one pin file, counted. */
const pins = new Map<string, { count: number; pin: Promise<Pin> }>();

async function pin(repoDir: string, id: string): Promise<void> {
  const p = pins.get(id);
  if (p) {
    p.count++;
    await p.pin;
    return;
  }
  const entry = { count: 1, pin: Pin.take(repoDir, id) };
  pins.set(id, entry);
  await entry.pin.catch((e) => {
    pins.delete(id);
    throw e;
  });
}

async function unpin(id: string): Promise<void> {
  const p = pins.get(id);
  if (!p || --p.count > 0) return;
  pins.delete(id);
  await (await p.pin).release();
}

export class GenerationExport implements NbdExport {
  readonly canonicalName: string;
  readonly description: string;
  private released = false;

  private constructor(
    readonly repo: Repository,
    readonly gen: Generation,
    private loader: ChunkLoader,
    private readahead: number,
    private overlay: Overlay | null,
  ) {
    this.canonicalName = generationFileName(gen);
    this.description = `${gen.name}@${gen.id} (${gen.created})${overlay ? `, writable through ${overlay.file}` : ''}`;
  }

  /** An export of `gen`, pinned until release(). */
  static async create(repo: Repository, gen: Generation, loader: ChunkLoader, opts: { readahead?: number; overlay?: Overlay | null } = {}): Promise<GenerationExport> {
    await pin(repo.dir, gen.id);
    return new GenerationExport(repo, gen, loader, opts.readahead ?? 32 << 20, opts.overlay ?? null);
  }

  get size(): number {
    return this.gen.size;
  }

  get writable(): boolean {
    return this.overlay !== null;
  }

  async open(): Promise<ExportConnection> {
    const reader = await ImageReader.open(this.repo, this.gen, this.loader, this.readahead);
    const base = async (out: Buffer, offset: number, length: number) => {
      // tryRead: the synchronous path when read-ahead already decoded every chunk needed.
      const n = reader.tryRead(out, offset, length) ?? (await reader.read(out, offset, length));
      if (n !== length) throw new Error(`short read at ${offset}: ${n} of ${length} bytes`);
    };
    const baseExtents = (offset: number, length: number, maxRuns: number) => reader.extents(offset, length, maxRuns);
    const ov = this.overlay;
    if (!ov) return { read: base, extents: baseExtents, close: () => undefined };
    return {
      read: (out, offset, length) => ov.read(out, offset, length, base),
      extents: (offset, length, maxRuns) => ov.extents(offset, length, maxRuns, baseExtents),
      write: (data, offset, fua) => ov.write(data, offset, fua, base),
      zero: (offset, length, fua) => ov.zero(offset, length, fua, base),
      flush: () => ov.flush(),
      close: () => undefined,
    };
  }

  /** Unpin the generation (and close the overlay); the export must not be opened again. */
  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    await this.overlay?.close().catch(() => undefined);
    await unpin(this.gen.id);
  }
}
