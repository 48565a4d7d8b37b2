/**
 * How `genvault sync`'s calls cross the remote protocol (sync-server.ts, sync-client.ts):
 * digests as hex, locations as their index encoding in base64, leaves and maps in base64.
 * Decoding checks everything: these come from the peer.
 */
import { decodeLocation, encodeLocation, isLocation, type ChunkLocation } from '../format/pack.js';
import { ProtocolError } from './frames.js';

/** Digests per call (a batch of the copy loop is a few thousand). */
export const MAX_DIGESTS = 1 << 16;

export function hexList(ds: Buffer[]): string[] {
  return ds.map((d) => d.toString('hex'));
}

export function digestsOf(v: unknown, what: string): Buffer[] {
  if (!Array.isArray(v) || v.length > MAX_DIGESTS) throw new ProtocolError(`${what}: a list of at most ${MAX_DIGESTS} digests expected`);
  return v.map((s) => {
    if (typeof s !== 'string' || !/^[0-9a-f]{64}$/.test(s)) throw new ProtocolError(`${what}: malformed digest`);
    return Buffer.from(s, 'hex');
  });
}

export function boolsOf(v: unknown, n: number, what: string): boolean[] {
  if (!Array.isArray(v) || v.length !== n || v.some((b) => typeof b !== 'boolean')) throw new ProtocolError(`${what}: ${n} booleans expected`);
  return v as boolean[];
}

export function b64(v: unknown, what: string, max = 32 << 20): Buffer {
  if (typeof v !== 'string' || v.length > Math.ceil((max * 4) / 3) + 4 || !/^[A-Za-z0-9+/]*={0,2}$/.test(v)) throw new ProtocolError(`${what}: base64 expected`);
  return Buffer.from(v, 'base64');
}

export function locationText(l: ChunkLocation | null): string | null {
  return l ? encodeLocation(l).toString('base64') : null;
}

export function locationOf(v: unknown, what: string): ChunkLocation | null {
  if (v === null) return null;
  const b = b64(v, what, 64);
  if (!isLocation(b)) throw new ProtocolError(`${what}: malformed chunk location`);
  return decodeLocation(b);
}
