// IndexedDB as a plain key-value store for the engine's KvStorage (see src/storage.rs).
// The Rust side owns the key layout; this file only reads everything back and applies
// recorded writes, one transaction per flush.

export interface KvWrite {
  op: 'put' | 'delete' | 'deleteRange';
  key?: string;
  value?: Uint8Array;
  from?: string;
  to?: string;
}

const STORE = 'kv';

function request<T>(r: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

export class KvDatabase {
  private constructor(private readonly db: IDBDatabase) {}

  static async open(name: string): Promise<KvDatabase> {
    const r = indexedDB.open(name, 1);
    r.onupgradeneeded = () => {
      if (!r.result.objectStoreNames.contains(STORE)) r.result.createObjectStore(STORE);
    };
    return new KvDatabase(await request(r));
  }

  /** Every (key, value) pair, in key order. */
  async loadAll(): Promise<{ keys: string[]; values: Uint8Array[] }> {
    const tx = this.db.transaction(STORE, 'readonly');
    const store = tx.objectStore(STORE);
    const [keys, values] = await Promise.all([
      request(store.getAllKeys()),
      request(store.getAll()),
    ]);
    return { keys: keys as string[], values: values as Uint8Array[] };
  }

  /** Applies writes in one transaction; resolves once it committed (strict durability). */
  apply(writes: KvWrite[]): Promise<void> {
    return new Promise((resolve, reject) => {
      const tx = this.db.transaction(STORE, 'readwrite', { durability: 'strict' });
      const store = tx.objectStore(STORE);
      for (const w of writes) {
        if (w.op === 'put') store.put(w.value!, w.key!);
        else if (w.op === 'delete') store.delete(w.key!);
        else store.delete(IDBKeyRange.bound(w.from!, w.to!, false, true));
      }
      tx.oncomplete = () => resolve();
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error ?? new Error('IndexedDB transaction aborted'));
    });
  }

  close(): void {
    this.db.close();
  }
}
