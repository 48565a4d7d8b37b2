/** Block device sizes, for local sources (src/source/local.ts) and restore targets (src/read/restore.ts). */
import fs from 'node:fs/promises';

/** Size of a block device from sysfs (stat reports 0 for devices). */
export async function blockDeviceSize(rdev: number): Promise<number | null> {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
  try {
    const sectors = await fs.readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8');
    return Number(sectors.trim()) * 512;
  } catch {
    return null;
  }
}

/** Size of a block device given its path, or null if unknown. */
export async function blockDeviceSizeOf(dev: string): Promise<number | null> {
  const st = await fs.stat(dev);
  return st.isBlockDevice() ? blockDeviceSize(st.rdev) : null;
}
