/**
 * The repository's keys in a worker thread (format 6): they arrive with the pool's setup
 * (workerData), never through a file or a command line. Without them (an unencrypted
 * repository) identities are SHA-256 and the fast hash plain BLAKE3, as in formats 1-5.
 */
import { createHash, createHmac } from 'node:crypto';
import { workerData } from 'node:worker_threads';
import { Blake3Hasher, blake3 } from '@napi-rs/blake-hash';
import { asKeys, type IdentityKeys, type RepoKeys } from '../format/crypto.js';
import { UNSEEDED } from '../format/chunker.js';

const given = (workerData as { keys?: RepoKeys | IdentityKeys | null } | null)?.keys;

/** This worker's keys, or null for an unencrypted repository (or a remote writer's client). */
export const keys: RepoKeys | null = given && 'seal' in given ? asKeys(given) : null;

/**
 * The identity key: the repository's, or the one a remote writer's client was given (it
 * chunks and identifies as the repository does, and holds no other key).
 */
const identityKey: Buffer | null = given ? Buffer.from(given.identity) : null;

/** The chunker's seeds. */
export const chunkSeed: readonly [number, number] = given ? [given.chunkSeed[0], given.chunkSeed[1]] : UNSEEDED;

/** A chunk's identity: keyed HMAC-SHA256, or SHA-256 without keys. */
export function identityOf(data: Uint8Array): Buffer {
  return identityKey ? createHmac('sha256', identityKey).update(data).digest() : createHash('sha256').update(data).digest();
}

/** The keyed BLAKE3's key: the repository's, or the one a remote writer was given. */
const fastKey: Buffer | null = given?.fast ? Buffer.from(given.fast) : null;

/** A chunk's BLAKE3 for map entries of kind 2: keyed with the fast key, or plain. */
export function fastOf(data: Uint8Array): Buffer {
  return fastKey ? Blake3Hasher.newKeyed(fastKey).update(data as Buffer).digestBuffer() : blake3(data);
}
