// Tab safety with Web Locks: one tab at a time owns a storage slot (an IndexedDB database and
// the replica id stored in it). A replica id must be live in one place only (it is the
// Automerge actor and seeds the Yrs client id), and two writers on one store would interleave
// batches. The lock is held until the repo is closed or the tab goes away.

export interface Slot {
  index: number;
  release: () => void;
}

function acquire(name: string, ifAvailable: boolean): Promise<(() => void) | null> {
  return new Promise((resolve, reject) => {
    navigator.locks
      .request(name, { ifAvailable }, (lock) => {
        if (!lock) {
          resolve(null);
          return undefined;
        }
        // Hold the lock until release() is called.
        return new Promise<void>((release) => resolve(() => release()));
      })
      .catch(reject);
  });
}

/**
 * 'separate' (the default): take the first free slot 0, 1, 2, ...; a second tab gets its own
 * database and replica id and works at once. 'wait': wait for slot 0 (one replica per origin).
 */
export async function acquireSlot(
  name: string,
  mode: 'separate' | 'wait',
  maxSlots = 16,
): Promise<Slot> {
  if (!('locks' in navigator)) throw new Error('Web Locks (navigator.locks) are unavailable');
  if (mode === 'wait') {
    const release = await acquire(`accord:${name}:0`, false);
    return { index: 0, release: release! };
  }
  for (let index = 0; index < maxSlots; index++) {
    const release = await acquire(`accord:${name}:${index}`, true);
    if (release) return { index, release };
  }
  throw new Error(`all ${maxSlots} storage slots of "${name}" are in use`);
}
