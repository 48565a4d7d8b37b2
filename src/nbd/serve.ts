/**
 * `genvault nbd`: generations served over NBD. The first generation named is the default
 * export (empty name); every generation is also exported under its file name in the
 * mounted tree (NAME/<time>-<id>.img's last part). With `writable`, the one generation
 * takes writes into a copy-on-write overlay (overlay.ts), by default a new file in
 * REPO/overlays/.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { GenvaultError, UsageError } from '../util/errors.js';
import type { Generation } from '../format/generation.js';
import { ChunkLoader } from '../read/reader.js';
import type { Repository } from '../repository/repository.js';
import { GenerationExport } from './export.js';
import { Overlay, lockOverlay } from './overlay.js';
import { NbdServer } from './server.js';

export type Listen = { socket: string } | { host: string; port: number };

export interface ServeOptions {
  listen: Listen;
  writable?: boolean;
  /** The overlay file of a writable export: reused when it exists (it must belong to the generation), else created. */
  overlay?: string;
  cacheBytes?: number;
  log?: (line: string) => void;
}

export interface Serving {
  server: NbdServer;
  /** Where clients connect, as an NBD URI of the default export. */
  uri: string;
  address: string;
  exports: Array<{ name: string; generation: string; image: string; size: number }>;
  overlay: Overlay | null;
  close(): Promise<void>;
}

/** Longest unix socket path (sun_path holds 108 bytes with its terminating NUL). */
const MAX_SOCKET_PATH = 107;

/** Parse `--listen HOST:PORT` ([v6]:port too); a bare port is refused: TCP only on an explicit address. */
export function parseListen(spec: string): Listen {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(spec);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port < 0 || port > 65535) throw new UsageError(`--listen ${JSON.stringify(spec)}: expected HOST:PORT, e.g. 127.0.0.1:10809`);
  return { host: (m[1] ?? m[2])!, port };
}

export function checkSocketPath(p: string): string {
  const abs = path.resolve(p);
  if (Buffer.byteLength(abs) > MAX_SOCKET_PATH) throw new UsageError(`socket path ${abs} is longer than ${MAX_SOCKET_PATH} bytes; choose a shorter --socket`);
  return abs;
}

async function openOverlay(repo: Repository, gen: Generation, file: string | undefined): Promise<{ overlay: Overlay; unlock: () => Promise<void> }> {
  const target = file ? path.resolve(file) : path.join(repo.dir, 'overlays', `${gen.name}-${gen.id}-${new Date().toISOString().replace(/[:]/g, '')}.overlay`);
  await fs.mkdir(path.dirname(target), { recursive: true, mode: 0o700 });
  const unlock = await lockOverlay(target);
  try {
    const exists = await fs.lstat(target).then(() => true, () => false);
    const overlay = exists ? await Overlay.open(target, true) : await Overlay.create(target, { name: gen.name, generation: gen.id, size: gen.size });
    if (overlay.header.generation !== gen.id) {
      await overlay.close();
      throw new GenvaultError(`${target} is an overlay of ${overlay.header.name}@${overlay.header.generation}, not of ${gen.name}@${gen.id}`, 'BAD_OVERLAY');
    }
    return { overlay, unlock };
  } catch (e) {
    await unlock();
    throw e;
  }
}

export async function serveGenerations(repo: Repository, gens: Generation[], opts: ServeOptions): Promise<Serving> {
  if (!gens.length) throw new UsageError('no generation to serve');
  if (opts.writable && gens.length > 1) throw new UsageError('--writable serves exactly one generation');
  const log = opts.log ?? ((l: string) => process.stderr.write(l + '\n'));
  const loader = new ChunkLoader(repo, opts.cacheBytes ?? 128 << 20, true);
  loader.damageBy = 'mount';
  const server = new NbdServer({ log });
  const made: GenerationExport[] = [];
  let ov: { overlay: Overlay; unlock: () => Promise<void> } | null = null;
  const release = async () => {
    for (const e of made) await e.release().catch(() => undefined);
    await ov?.unlock().catch(() => undefined);
  };
  try {
    if (opts.writable) ov = await openOverlay(repo, gens[0]!, opts.overlay);
    for (const g of gens) {
      const exp = await GenerationExport.create(repo, g, loader, { overlay: made.length === 0 ? ov?.overlay : null });
      made.push(exp);
      if (made.length === 1) server.add('', exp);
      server.add(exp.canonicalName, exp);
    }
    const address = await server.listen(opts.listen);
    const l = opts.listen;
    const uri = 'socket' in l ? `nbd+unix:///?socket=${address}` : `nbd://${l.host.includes(':') ? `[${l.host}]` : l.host}:${address.slice(address.lastIndexOf(':') + 1)}/`;
    return {
      server,
      uri,
      address,
      overlay: ov?.overlay ?? null,
      exports: made.map((e) => ({ name: e.canonicalName, generation: e.gen.id, image: e.gen.name, size: e.size })),
      async close() {
        await server.close();
        if ('socket' in opts.listen) await fs.rm(address, { force: true }).catch(() => undefined);
        await release();
      },
    };
  } catch (e) {
    await server.close().catch(() => undefined);
    await release();
    throw e;
  }
}
