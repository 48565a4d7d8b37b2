/**
 * A small, strict XML parser for S3 responses (list results, multipart replies, errors).
 * Every byte of a response is treated as hostile: the document size, the nesting depth and
 * the element count are bounded; there is no DOCTYPE (so no entity expansion), no
 * processing instruction but the XML declaration, and only the five predefined entities
 * and character references. Anything else is one XmlError naming what was wrong.
 * Attributes are checked for form and dropped: S3 puts nothing in them that we read.
 */

export interface XmlElement {
  name: string;
  children: XmlElement[];
  /** The element's own character data, entities decoded. */
  text: string;
}

export class XmlError extends Error {
  readonly code = 'EPROTO';
}

const MAX_BYTES = 8 << 20;
const MAX_DEPTH = 16;
const MAX_ELEMENTS = 200_000;
const NAME = /^[A-Za-z_][A-Za-z0-9._:-]*$/;
const ENTITIES: Record<string, string> = { lt: '<', gt: '>', amp: '&', quot: '"', apos: "'" };

function decode(s: string, at: number): string {
  return s.replace(/&([^;&<]{0,12});?/g, (whole, ent: string) => {
    if (!whole.endsWith(';')) throw new XmlError(`bad XML: a bare '&' near offset ${at}`);
    if (ent in ENTITIES) return ENTITIES[ent];
    const m = /^#(?:x([0-9A-Fa-f]{1,6})|([0-9]{1,7}))$/.exec(ent);
    if (!m) throw new XmlError(`bad XML: unknown entity &${ent.slice(0, 12)}; near offset ${at}`);
    const cp = m[1] !== undefined ? parseInt(m[1], 16) : Number(m[2]);
    // Code points XML allows (no NUL, no surrogates, within Unicode).
    if (cp === 0 || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) throw new XmlError(`bad XML: character reference &${ent}; near offset ${at}`);
    return String.fromCodePoint(cp);
  });
}

/** Parse a document into its root element. */
export function parseXml(input: Buffer | string): XmlElement {
  if (input.length > MAX_BYTES) throw new XmlError(`XML response too large (${input.length} bytes)`);
  const s = typeof input === 'string' ? input : input.toString('utf8');
  if (s.includes('\0')) throw new XmlError('bad XML: NUL character');
  let i = s.charCodeAt(0) === 0xfeff ? 1 : 0;
  const stack: XmlElement[] = [];
  let root: XmlElement | null = null;
  let count = 0;
  const fail = (why: string): never => {
    throw new XmlError(`bad XML: ${why} at offset ${i}`);
  };
  while (i < s.length) {
    const lt = s.indexOf('<', i);
    const textEnd = lt < 0 ? s.length : lt;
    const chunk = s.slice(i, textEnd);
    if (stack.length) stack[stack.length - 1].text += decode(chunk, i);
    else if (chunk.trim() !== '') fail('text outside the root element');
    if (lt < 0) break;
    i = lt;
    if (s.startsWith('<?xml', i)) {
      if (i !== 0 && !(i === 1 && s.charCodeAt(0) === 0xfeff)) fail('XML declaration not at the start');
      const end = s.indexOf('?>', i);
      if (end < 0) fail('unterminated XML declaration');
      i = end + 2;
    } else if (s.startsWith('<!--', i)) {
      const end = s.indexOf('-->', i + 4);
      if (end < 0) fail('unterminated comment');
      i = end + 3;
    } else if (s.startsWith('<!', i) || s.startsWith('<?', i)) {
      fail('DOCTYPE, CDATA or processing instruction');
    } else if (s.startsWith('</', i)) {
      const end = s.indexOf('>', i);
      if (end < 0) fail('unterminated end tag');
      const name = s.slice(i + 2, end).trim();
      const open = stack.pop();
      if (!open || open.name !== name) fail(`end tag </${name.slice(0, 40)}> does not match`);
      i = end + 1;
    } else {
      const end = s.indexOf('>', i);
      if (end < 0) fail('unterminated tag');
      const selfClosing = s[end - 1] === '/';
      const body = s.slice(i + 1, selfClosing ? end - 1 : end);
      const m = /^([^\s]+)((?:\s+[A-Za-z_][A-Za-z0-9._:-]*\s*=\s*(?:"[^"<]*"|'[^'<]*'))*)\s*$/.exec(body);
      if (!m || !NAME.test(m[1])) fail('malformed start tag');
      if (root && !stack.length) fail('a second root element');
      if (stack.length >= MAX_DEPTH) fail('elements nested too deep');
      if (++count > MAX_ELEMENTS) fail('too many elements');
      const el: XmlElement = { name: m![1], children: [], text: '' };
      if (stack.length) stack[stack.length - 1].children.push(el);
      else root = el;
      if (!selfClosing) stack.push(el);
      i = end + 1;
    }
  }
  if (stack.length) throw new XmlError(`bad XML: <${stack[stack.length - 1].name}> not closed`);
  if (!root) throw new XmlError('bad XML: no root element');
  return root;
}

/** The children named `name`. */
export function children(el: XmlElement, name: string): XmlElement[] {
  return el.children.filter((c) => c.name === name);
}

/** The text of the one child named `name`, or undefined; more than one is an error. */
export function childText(el: XmlElement, name: string): string | undefined {
  const found = children(el, name);
  if (found.length > 1) throw new XmlError(`bad S3 response: more than one <${name}> in <${el.name}>`);
  return found[0]?.text;
}

/** The text of a child that must be there. */
export function requireText(el: XmlElement, name: string): string {
  const t = childText(el, name);
  if (t === undefined) throw new XmlError(`bad S3 response: <${el.name}> without <${name}>`);
  return t;
}

/** A size or count: a non-negative safe integer in decimal. */
export function requireSize(el: XmlElement, name: string): number {
  const t = requireText(el, name).trim();
  const n = Number(t);
  if (!/^[0-9]{1,16}$/.test(t) || !Number.isSafeInteger(n)) throw new XmlError(`bad S3 response: <${name}> is not a size: ${JSON.stringify(t.slice(0, 40))}`);
  return n;
}

/** 'true' or 'false'; absent is false. */
export function flag(el: XmlElement, name: string): boolean {
  const t = childText(el, name)?.trim();
  if (t === undefined || t === 'false') return false;
  if (t === 'true') return true;
  throw new XmlError(`bad S3 response: <${name}> is ${JSON.stringify(t.slice(0, 40))}`);
}

/** Escape text for a request body. */
export function escapeXml(s: string): string {
  return s.replace(/[<>&"']/g, (c) => `&${Object.keys(ENTITIES).find((k) => ENTITIES[k] === c)};`);
}
