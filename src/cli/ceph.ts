/**
 * The cluster options of rbd: sources and restore targets (--ceph-conf, --ceph-id,
 * --ceph-keyring), shared by backup and restore. Each one left out is left to rbd: its
 * CEPH_CONF and CEPH_ARGS, then /etc/ceph/ceph.conf and client.admin.
 */
import type { Command } from 'commander';
import type { CephCluster } from '../source/rbd-cli.js';

export interface CephFlags {
  cephConf?: string;
  cephId?: string;
  cephKeyring?: string;
}

export function addCephOptions(cmd: Command): Command {
  return cmd
    .option('--ceph-conf <file>', 'rbd: sources and targets: the cluster\'s ceph.conf (rbd -c; default: $CEPH_CONF, /etc/ceph/ceph.conf)')
    .option('--ceph-id <name>', 'rbd: sources and targets: the client name without "client." (rbd --id; default admin)')
    .option('--ceph-keyring <file>', 'rbd: sources and targets: that client\'s keyring (rbd --keyring; default: as ceph.conf says)');
}

export function cephCluster(f: CephFlags): CephCluster {
  return { conf: f.cephConf, id: f.cephId, keyring: f.cephKeyring };
}

/** Whether any cluster option was given (they need an rbd: source or target). */
export function hasCephFlags(f: CephFlags): boolean {
  return f.cephConf !== undefined || f.cephId !== undefined || f.cephKeyring !== undefined;
}
