/**
 * The repository's keys in a worker thread (format 6): they arrive with the pool's setup
 * (workerData), never through a file or a command line. Without them (an unencrypted
 * repository) identities are SHA-256 and the fast hash plain BLAKE3, as in formats 1-5.
 */
import { createHash, createHmac } from 'node:crypto';
import { workerData } from 'node:worker_threads';
import { Blake3Hasher, blake3 } from '@napi-rs/blake-hash';
import { asKeys, type RepoKeys } from '../format/crypto.js';
import { UNSEEDED } from '../format/chunker.js';

const given = (workerData as { keys?: RepoKeys | null } | null)?.keys;

/** This worker's keys, or null for an unencrypted repository. */
export const keys: RepoKeys | null = given ? asKeys(given) : null;

/** The chunker's seeds. */
export const chunkSeed: readonly [number, number] = keys ? keys.chunkSeed : UNSEEDED;

/** A chunk's identity: keyed HMAC-SHA256, or SHA-256 without keys. */
export function identityOf(data: Uint8Array): Buffer {
  return keys ? createHmac('sha256', keys.identity).update(data).digest() : createHash('sha256').update(data).digest();
}

/** A chunk's BLAKE3 for map entries of kind 2: keyed with the fast key, or plain. */
export function fastOf(data: Uint8Array): Buffer {
  return keys ? Blake3Hasher.newKeyed(keys.fast as Buffer).update(data as Buffer).digestBuffer() : blake3(data);
}
