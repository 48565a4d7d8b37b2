/**
 * The mounted tree, as plain data rebuilt from the generation list:
 *
 *   /                         one directory per image
 *   /NAME/                    one file per generation, plus `latest`
 *   /NAME/2026-11-23T154155.532Z-835737da.img  (UTC creation time in ms + short id: ls sorts by time)
 *   /NAME/latest -> newest generation's file
 */
import { Generation, generationFileName } from '../format/generation.js';

export type Node =
  | { kind: 'root'; names: string[] }
  | { kind: 'image'; name: string; files: string[]; mtime: Date }
  | { kind: 'file'; gen: Generation }
  | { kind: 'link'; target: string; mtime: Date };

export class Tree {
  private images = new Map<string, { files: Map<string, Generation>; latest: Generation }>();
  readonly created = new Date();

  constructor(gens: Generation[]) {
    for (const g of gens) {
      let img = this.images.get(g.name);
      if (!img) {
        img = { files: new Map(), latest: g };
        this.images.set(g.name, img);
      }
      img.files.set(generationFileName(g), g);
      if (Date.parse(g.created) >= Date.parse(img.latest.created)) img.latest = g;
    }
  }

  lookup(p: string): Node | null {
    if (p === '/') return { kind: 'root', names: [...this.images.keys()].sort() };
    const parts = p.split('/').filter(Boolean);
    const img = this.images.get(parts[0]!);
    if (!img) return null;
    if (parts.length === 1) {
      return {
        kind: 'image',
        name: parts[0]!,
        files: [...[...img.files.keys()].sort(), 'latest'],
        mtime: new Date(img.latest.created),
      };
    }
    if (parts.length !== 2) return null;
    if (parts[1] === 'latest') return { kind: 'link', target: generationFileName(img.latest), mtime: new Date(img.latest.created) };
    const g = img.files.get(parts[1]!);
    return g ? { kind: 'file', gen: g } : null;
  }
}
