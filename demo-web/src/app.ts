// Accord's demo: one shared trip on several devices ("replicas") side by side. Each device is a
// real client (its own Repo, its own IndexedDB storage, its own connection to the server).
//
// Everything shown is derived from the document itself: the wallet's balance is the fold of the
// entries no resolution voided; bookings and payments likewise. The timeline is built from the
// resolution and conflict facts the server writes into the document, plus the status of each
// device's own changes (pending → confirmed #seq / rejected / compensated).

import { Repo, type ChangeStatus, type Conflict, type DocHandle } from 'accord-client-wasm';

// ---------------------------------------------------------------------------------------------
// The trip document

interface Entry {
  amount: number;
  kind: 'deposit' | 'spend';
  by: string;
  at: number;
  label?: string;
}
interface Booking {
  seat: string;
  by: string;
  at: number;
}
interface Payment {
  ref: string;
  amount: number;
  by: string;
  at: number;
}
interface Resolution {
  invariant: string;
  policy: string;
  action: 'void' | 'restore' | 'chosen';
  path: (string | number)[];
  victims: string[];
  victim_changes: string[];
  value?: unknown;
  reason: string;
  by: string;
  seq?: number | null;
}
interface ConflictFact {
  invariant: string;
  path: (string | number)[];
  question: string;
  options: { entry?: string | null; value: any; author?: string | null; seq?: number | null }[];
}
interface TripDoc {
  trip?: {
    name?: string;
    status?: string;
    bookings?: Record<string, Booking>;
    payments?: Record<string, Payment>;
    bus?: Record<string, unknown>;
  };
  wallet?: { entries?: Record<string, Entry> };
  notes?: string;
  [key: string]: unknown;
}

const STATUSES = ['planning', 'booked', 'travelling', 'done'] as const;
const STATUS_WORDS: Record<string, string> = {
  planning: 'Planning',
  booked: 'Booked',
  travelling: 'Travelling',
  done: 'Done',
  cancelled: 'Cancelled',
};
const SEATS = ['11A', '11B', '11C', '11D', '12A', '12B', '12C', '12D'];
const RULES: Record<string, { name: string; tone: string }> = {
  'wallet-non-negative': { name: 'The wallet never goes below zero', tone: 'wallet' },
  'seat-once': { name: 'A seat is booked once', tone: 'seat' },
  'status-forward': { name: 'The trip never goes backwards', tone: 'status' },
  'payment-once': { name: 'A payment counts once', tone: 'payment' },
  'bus-capacity': { name: 'The bus has 40 places', tone: 'status' },
};

const PEOPLE = [
  { id: 'ana', name: 'Ana', device: "Ana's phone", kind: 'phone' },
  { id: 'ben', name: 'Ben', device: "Ben's laptop", kind: 'laptop' },
] as const;
type Person = (typeof PEOPLE)[number];

function nameOf(id: string | null | undefined): string {
  if (!id) return 'someone';
  if (id === 'server') return 'the server';
  const p = PEOPLE.find((p) => p.id === id);
  return p ? p.name : id.length > 12 ? 'a device' : id;
}

const euro = new Intl.NumberFormat('en-IE', { style: 'currency', currency: 'EUR', maximumFractionDigits: 0 });
const money = (n: number) => (n < 0 ? '−' + euro.format(-n) : euro.format(n));
const clock = (t: number) =>
  new Date(t).toLocaleTimeString('en-GB', { hour: '2-digit', minute: '2-digit', second: '2-digit' });

function esc(s: unknown): string {
  return String(s ?? '').replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function randomKey(prefix: string): string {
  const b = crypto.getRandomValues(new Uint8Array(5));
  return prefix + Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

function facts(doc: TripDoc) {
  const resolutions: [string, Resolution][] = [];
  const conflicts: [string, ConflictFact][] = [];
  for (const [k, v] of Object.entries(doc)) {
    if (k.startsWith('_accord:resolution:')) resolutions.push([k.slice(19), v as Resolution]);
    else if (k.startsWith('_accord:conflict:')) conflicts.push([k.slice(17), v as ConflictFact]);
  }
  return { resolutions, conflicts };
}

/** Entry key → the resolution that voided it, for the collection at `path`. */
function voidedIn(doc: TripDoc, path: string): Map<string, [string, Resolution]> {
  const out = new Map<string, [string, Resolution]>();
  for (const [key, r] of facts(doc).resolutions) {
    if ((r.path ?? []).join('.') !== path) continue;
    for (const v of r.victims ?? []) out.set(v, [key, r]);
  }
  return out;
}

function sortedEntries<T extends { at?: number }>(m: Record<string, T> | undefined): [string, T][] {
  return Object.entries(m ?? {}).sort((a, b) => (a[1].at ?? 0) - (b[1].at ?? 0) || a[0].localeCompare(b[0]));
}

function wallet(doc: TripDoc) {
  const voided = voidedIn(doc, 'wallet.entries');
  let balance = 0;
  const rows = sortedEntries(doc.wallet?.entries).map(([key, e]) => {
    const v = voided.get(key);
    if (!v) balance += e.kind === 'spend' ? -e.amount : e.amount;
    return { key, e, voided: v };
  });
  return { balance, rows };
}

function bookings(doc: TripDoc) {
  const voided = voidedIn(doc, 'trip.bookings');
  const bySeat = new Map<string, { key: string; b: Booking }[]>();
  for (const [key, b] of sortedEntries(doc.trip?.bookings)) {
    if (voided.has(key) || !b?.seat) continue;
    const list = bySeat.get(b.seat) ?? [];
    list.push({ key, b });
    bySeat.set(b.seat, list);
  }
  return bySeat;
}

function describeEntry(doc: TripDoc, path: string, key: string): string {
  if (path === 'wallet.entries') {
    const e = doc.wallet?.entries?.[key];
    if (e) return `${nameOf(e.by)}'s ${e.kind === 'spend' ? 'spend' : 'deposit'} of ${money(e.amount)}${e.label ? ` (“${e.label}”)` : ''}`;
  }
  if (path === 'trip.bookings') {
    const b = doc.trip?.bookings?.[key];
    if (b) return `${nameOf(b.by)}'s booking of seat ${b.seat}`;
  }
  if (path === 'trip.payments') {
    const p = doc.trip?.payments?.[key];
    if (p) return `${nameOf(p.by)}'s copy of payment ${p.ref}`;
  }
  return `entry ${key}`;
}

function list(words: string[]): string {
  return words.length <= 1 ? words.join('') : `${words.slice(0, -1).join(', ')} and ${words[words.length - 1]}`;
}

/** What a resolution did, in plain words. */
function describeResolution(doc: TripDoc, r: Resolution): { title: string; detail: string } {
  const path = (r.path ?? []).join('.');
  const victims = (r.victims ?? []).map((v) => describeEntry(doc, path, v));
  if (r.action === 'void' && victims.length === 0 && r.reason.startsWith('withdrawn:')) {
    // The server closed a question nobody needs to answer any more (a claim was withdrawn).
    return { title: 'Question withdrawn', detail: 'What it asked about changed before anyone answered.' };
  }
  switch (r.invariant) {
    case 'wallet-non-negative':
      return {
        title: `Refunded ${list(victims)}`,
        detail: `Spends made offline would have taken the wallet below zero. The one committed last was voided, so the balance is ${money(wallet(doc).balance)}.`,
      };
    case 'seat-once': {
      const kept = (r.value as any)?.by ?? null;
      if (r.action === 'chosen') {
        return {
          title: `${nameOf(r.by)} decided who keeps the seat`,
          detail: `${r.reason.replace(/^(\w+) chose (\w+)'s .*$/, (_m, a, b) => `${nameOf(a)} chose ${nameOf(b)}`)}; released ${list(victims)}.`,
        };
      }
      return { title: `Released ${list(victims)}`, detail: kept ? `${nameOf(kept)} keeps it.` : r.reason };
    }
    case 'payment-once':
      return {
        title: `Counted payment once`,
        detail: `The same bank payment was recorded more than once; dropped ${list(victims)}.`,
      };
    case 'status-forward':
      return {
        title: `Kept the trip moving forward`,
        detail: `${statusWords(r.reason)} It stays ${STATUS_WORDS[String(r.value)] ?? r.value}.`,
      };
    default:
      return { title: RULES[r.invariant]?.name ?? r.invariant, detail: r.reason };
  }
}

/** The question of a conflict and its options, in plain words. */
function describeConflict(c: Conflict): { question: string; options: string[]; details: string[] } {
  if (c.invariant === 'seat-once') {
    const seat = (c.options[0]?.value as { seat?: string } | undefined)?.seat ?? "?";
    const who = c.options.map((o) => nameOf(o.author));
    return {
      question: `${list(who)} both booked seat ${seat} while offline. Who keeps it?`,
      options: c.options.map((o) => `${nameOf(o.author)} keeps ${seat}`),
      details: c.options.map((o) => `booked by ${nameOf(o.author)}${o.seq ? ` · committed #${o.seq}` : ''}`),
    };
  }
  return {
    question: c.question,
    options: c.options.map((o) => (o.author ? `${nameOf(o.author)}'s version` : JSON.stringify(o.value))),
    details: c.options.map((o) => (o.seq ? `committed #${o.seq}` : '')),
  };
}

// ---------------------------------------------------------------------------------------------
// The timeline of the reconciliation loop (shared by every device on the page)

type Phase = 'observe' | 'compare' | 'act' | 'decide' | 'reject';
interface TimelineItem {
  at: number;
  phase: Phase;
  title: string;
  detail: string;
  where?: string;
}

const timeline = {
  items: [] as TimelineItem[],
  seen: new Set<string>(),
  counts: { committed: 0, fixed: 0, asked: 0 },
  add(key: string, item: Omit<TimelineItem, 'at'>) {
    if (this.seen.has(key)) return;
    this.seen.add(key);
    this.items.unshift({ ...item, at: Date.now() });
    if (this.items.length > 60) this.items.length = 60;
    if (item.phase === 'observe') this.counts.committed++;
    this.scheduleRender(item.phase);
  },
  pending: 0 as number,
  scheduleRender(phase: Phase) {
    const cycle = document.querySelector('.cycle');
    const p = phase === 'decide' || phase === 'reject' ? 'act' : phase;
    cycle?.querySelectorAll('li').forEach((li) => li.classList.toggle('active', li.dataset.phase === p));
    cancelAnimationFrame(this.pending);
    this.pending = requestAnimationFrame(() => this.render());
  },
  render() {
    const PH: Record<Phase, string> = { observe: 'Observe', compare: 'Compare', act: 'Act', decide: 'Decided', reject: 'Act' };
    patch(
      document.getElementById('timeline')!,
      this.items.length === 0
        ? '<li class="empty">Nothing yet. Make a change on a device: each commit, check and repair appears here.</li>'
        : this.items
            .map(
              (i) => `<li class="tl ${i.phase}">
                <span class="tl-phase">${PH[i.phase]}</span>
                <div class="tl-body"><p class="tl-title">${esc(i.title)}</p>
                ${i.detail ? `<p class="tl-detail">${esc(i.detail)}</p>` : ''}
                <p class="tl-meta">${clock(i.at)}${i.where ? ` · seen on ${esc(i.where)}` : ''}</p></div></li>`,
            )
            .join(''),
    );
    document.getElementById('stat-committed')!.textContent = String(this.counts.committed);
    document.getElementById('stat-fixed')!.textContent = String(this.counts.fixed);
    document.getElementById('stat-asked')!.textContent = String(this.counts.asked);
  },
};

/** Replaces `el`'s content if it differs, keeping keyboard focus on the element with the same
 * data-key. */
function patch(el: HTMLElement, html: string): void {
  if ((el as any)._html === html) return;
  (el as any)._html = html;
  const active = document.activeElement as HTMLElement | null;
  const key = active && el.contains(active) ? active.dataset.key : undefined;
  el.innerHTML = html;
  if (key) (el.querySelector(`[data-key="${CSS.escape(key)}"]`) as HTMLElement | null)?.focus();
}

// ---------------------------------------------------------------------------------------------
// One device

interface Tracked {
  id: string;
  label: string;
  at: number;
  last?: string;
}

const WS_URL = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/sync`;

class Device {
  repo!: Repo;
  handle!: DocHandle<TripDoc>;
  root!: HTMLElement;
  changes: Tracked[] = [];
  offline = false;
  private noteText = '';

  constructor(readonly person: Person) {}

  get label(): string {
    return this.repo.storageSlot > 0 ? `${this.person.device} · tab ${this.repo.storageSlot + 1}` : this.person.device;
  }

  async open(schemas: object[]): Promise<void> {
    this.repo = await Repo.open({
      url: WS_URL,
      name: `demo-${this.person.id}`,
      schemas,
      backoff: { baseMs: 200, maxMs: 3000 },
    });
  }

  attach(handle: DocHandle<TripDoc>): void {
    this.handle = handle;
    this.root = document.createElement('article');
    this.root.className = `device ${this.person.kind}`;
    this.root.dataset.replica = this.person.id;
    this.root.setAttribute('aria-labelledby', `${this.person.id}-title`);
    this.root.innerHTML = this.skeleton();
    this.bind();
    handle.on('change', () => this.render());
    handle.on('confirmed', () => this.render());
    handle.on('rejected', () => this.render());
    handle.on('violations', (v) => this.warn(v.map((x) => RULES[x.invariant]?.name ?? x.invariant)));
    this.repo.on('connection', () => this.renderConnection());
    this.render();
  }

  private skeleton(): string {
    const p = this.person;
    return `
    <header class="device-head">
      <span class="avatar ${p.id}" aria-hidden="true">${p.name[0]}</span>
      <div class="device-name">
        <h2 id="${p.id}-title">${esc(this.label)}</h2>
        <p class="conn" data-conn aria-live="polite"></p>
      </div>
      <label class="switch">
        <span>Offline</span>
        <button type="button" role="switch" aria-checked="false" data-action="offline" aria-label="${esc(p.device)} offline"><span class="knob"></span></button>
      </label>
    </header>
    <div class="warn" data-warn role="status" hidden></div>
    <section class="panel inbox" data-inbox aria-label="Decisions for ${esc(p.name)}" hidden></section>
    <section class="panel" aria-labelledby="${p.id}-status-h">
      <h3 id="${p.id}-status-h">Trip status</h3>
      <div class="stepper" data-status role="group" aria-label="Set the trip's status"></div>
    </section>
    <section class="panel" aria-labelledby="${p.id}-wallet-h">
      <div class="panel-head"><h3 id="${p.id}-wallet-h">Shared wallet</h3><p class="balance" data-balance aria-live="polite"></p></div>
      <form class="row-form" data-form="spend">
        <label class="field grow"><span>What for</span><input name="label" autocomplete="off" placeholder="Dinner at Ramiro" maxlength="40"></label>
        <label class="field amount"><span>Amount €</span><input name="amount" type="number" min="1" max="100000" step="1" value="60" inputmode="numeric" required></label>
        <div class="form-buttons">
          <button class="button primary" type="submit" data-kind="spend">Spend</button>
          <button class="button" type="submit" data-kind="deposit">Add money</button>
        </div>
      </form>
      <ul class="entries" data-entries></ul>
    </section>
    <section class="panel" aria-labelledby="${p.id}-seats-h">
      <div class="panel-head"><h3 id="${p.id}-seats-h">Seats on the train</h3><p class="muted small">Pick a free seat; pick yours again to release it.</p></div>
      <div class="seats" data-seats role="group" aria-label="Seats"></div>
    </section>
    <section class="panel" aria-labelledby="${p.id}-pay-h">
      <h3 id="${p.id}-pay-h">Hotel payments</h3>
      <form class="row-form" data-form="payment">
        <label class="field grow"><span>Bank reference</span><input name="ref" value="p-991" autocomplete="off" maxlength="20" required></label>
        <label class="field amount"><span>Amount €</span><input name="amount" type="number" min="1" max="100000" value="240" required></label>
        <div class="form-buttons"><button class="button" type="submit">Record payment</button></div>
      </form>
      <ul class="entries" data-payments></ul>
    </section>
    <section class="panel" aria-labelledby="${p.id}-notes-h">
      <div class="panel-head"><h3 id="${p.id}-notes-h"><label for="${p.id}-notes">Shared notes</label></h3><p class="muted small">Edits merge letter by letter, never a conflict.</p></div>
      <textarea id="${p.id}-notes" class="notes" data-notes rows="5" spellcheck="false"></textarea>
    </section>
    <section class="panel" aria-labelledby="${p.id}-log-h">
      <h3 id="${p.id}-log-h">${esc(p.name)}'s changes</h3>
      <ol class="log" data-log aria-live="polite"></ol>
    </section>`;
  }

  private $(sel: string): HTMLElement {
    return this.root.querySelector(sel) as HTMLElement;
  }

  private bind(): void {
    this.$('[data-action="offline"]').addEventListener('click', () => this.setOffline(!this.offline));
    this.root.querySelectorAll('form').forEach((form) =>
      form.addEventListener('submit', (ev) => {
        ev.preventDefault();
        const submitter = (ev as SubmitEvent).submitter as HTMLButtonElement | null;
        const data = new FormData(form);
        const amount = Math.round(Number(data.get('amount')));
        if (!(amount > 0)) return;
        if (form.dataset.form === 'spend') {
          const kind = submitter?.dataset.kind === 'deposit' ? 'deposit' : 'spend';
          const label = String(data.get('label') ?? '').trim() || (kind === 'spend' ? 'Something' : 'Top-up');
          this.addEntry(kind, amount, label);
          (form.elements.namedItem('label') as HTMLInputElement).value = '';
        } else {
          const ref = String(data.get('ref') ?? '').trim();
          if (ref) this.addPayment(ref, amount);
        }
      }),
    );
    this.$('[data-seats]').addEventListener('click', (ev) => {
      const b = (ev.target as HTMLElement).closest('button[data-seat]') as HTMLButtonElement | null;
      if (b && !b.disabled) this.toggleSeat(b.dataset.seat!);
    });
    this.$('[data-status]').addEventListener('click', (ev) => {
      const b = (ev.target as HTMLElement).closest('button[data-to]') as HTMLButtonElement | null;
      if (b) this.setStatus(b.dataset.to!);
    });
    this.$('[data-inbox]').addEventListener('click', (ev) => {
      const b = (ev.target as HTMLElement).closest('button[data-choice]') as HTMLButtonElement | null;
      if (b) this.choose(b.dataset.conflict!, Number(b.dataset.choice), b.textContent ?? '');
    });
    const notes = this.$('[data-notes]') as HTMLTextAreaElement;
    notes.addEventListener('input', () => this.editNotes(notes.value));
  }

  // -- edits --------------------------------------------------------------------------------

  private track(label: string, id: string | undefined): void {
    if (!id) return;
    this.changes.unshift({ id, label, at: Date.now() });
    if (this.changes.length > 40) this.changes.length = 40;
    this.render();
  }

  addEntry(kind: 'spend' | 'deposit', amount: number, label: string): void {
    const key = randomKey('e-');
    const value: Entry = { amount, kind, by: this.person.id, at: Date.now(), label };
    const id = this.handle.change((d) => d.put(['wallet', 'entries', key], value));
    this.track(`${kind === 'spend' ? 'Spent' : 'Added'} ${money(amount)} · ${label}`, id);
  }

  addPayment(ref: string, amount: number): void {
    const key = randomKey('pay-');
    const id = this.handle.change((d) =>
      d.put(['trip', 'payments', key], { ref, amount, by: this.person.id, at: Date.now() }),
    );
    this.track(`Recorded payment ${ref} · ${money(amount)}`, id);
  }

  toggleSeat(seat: string): void {
    const mine = (bookings(this.handle.doc()).get(seat) ?? []).find((x) => x.b.by === this.person.id);
    if (mine) {
      const id = this.handle.change((d) => d.delete(['trip', 'bookings', mine.key]));
      this.track(`Released seat ${seat}`, id);
      return;
    }
    const key = randomKey('b-');
    const id = this.handle.change((d) =>
      d.put(['trip', 'bookings', key], { seat, by: this.person.id, at: Date.now() }),
    );
    this.track(`Booked seat ${seat}`, id);
  }

  setStatus(to: string): void {
    const id = this.handle.change((d) => d.put(['trip', 'status'], to));
    this.track(`Set the trip to ${STATUS_WORDS[to] ?? to}`, id);
  }

  choose(key: string, choice: number, words: string): void {
    const id = this.handle.resolveConflict(key, choice, this.person.id);
    this.track(`Decided: ${words}`, id);
  }

  editNotes(value: string): void {
    const before = Array.from(this.noteText);
    const after = Array.from(value);
    let start = 0;
    while (start < before.length && start < after.length && before[start] === after[start]) start++;
    let endB = before.length;
    let endA = after.length;
    while (endB > start && endA > start && before[endB - 1] === after[endA - 1]) {
      endB--;
      endA--;
    }
    if (endB === start && endA === start) return;
    this.noteText = value;
    const insert = after.slice(start, endA).join('');
    const id = this.handle.change((d) => d.splice(['notes'], start, endB - start, insert));
    // Typing makes many small changes: the log shows one line per burst.
    const last = this.changes[0];
    if (last && last.label === 'Edited the notes' && Date.now() - last.at < 4000 && id) {
      last.id = id;
      last.at = Date.now();
      this.render();
    } else this.track('Edited the notes', id);
  }

  setOffline(offline: boolean): void {
    this.offline = offline;
    if (offline) this.repo.disconnect();
    else this.repo.connect();
    this.renderConnection();
  }

  private warnTimer: ReturnType<typeof setTimeout> | undefined;
  private warn(rules: string[]): void {
    const el = this.$('[data-warn]');
    if (rules.length === 0) {
      el.hidden = true;
      return;
    }
    el.hidden = false;
    el.textContent = `Heads-up: this copy breaks “${rules.join('”, “')}”. The server will fix it when it sees the changes.`;
    clearTimeout(this.warnTimer);
    this.warnTimer = setTimeout(() => (el.hidden = true), 8000);
  }

  // -- rendering -------------------------------------------------------------------------------

  renderConnection(): void {
    const state = this.repo.connectionState;
    const pending = this.repo.outboxSize;
    const words: Record<string, string> = {
      connected: 'Online',
      connecting: 'Connecting…',
      disconnected: this.offline ? 'Offline' : 'Reconnecting…',
      offline: 'Offline (no network)',
      closed: 'Closed',
    };
    const conn = this.$('[data-conn]');
    conn.className = `conn ${state === 'connected' ? 'on' : this.offline ? 'off' : 'wait'}`;
    conn.textContent = `${words[state] ?? state}${pending ? ` · ${pending} waiting to sync` : ' · all synced'}`;
    const sw = this.$('[data-action="offline"]');
    sw.setAttribute('aria-checked', String(this.offline));
    this.root.classList.toggle('is-offline', this.offline);
  }

  render(): void {
    const doc = this.handle.doc();
    this.renderConnection();
    const ready = !!doc.trip;
    this.root.classList.toggle('is-loading', !ready);
    this.root.querySelectorAll<HTMLButtonElement | HTMLInputElement | HTMLTextAreaElement>('form button, form input, textarea').forEach((el) => (el.disabled = !ready));
    if (!this.$('[data-warn]').hidden && this.handle.violations().length === 0) this.$('[data-warn]').hidden = true;
    this.renderInbox(doc);
    this.renderStatus(doc);
    this.renderWallet(doc);
    this.renderSeats(doc);
    this.renderPayments(doc);
    this.renderNotes(doc);
    this.renderLog(doc);
    this.feedTimeline(doc);
  }

  private renderInbox(doc: TripDoc): void {
    const el = this.$('[data-inbox]');
    const open = this.handle.conflicts();
    const settled = facts(doc).resolutions.filter(([, r]) => r.action === 'chosen');
    el.hidden = open.length === 0 && settled.length === 0;
    const openHtml = open
      .map((c) => {
        const d = describeConflict(c);
        return `<div class="question" data-conflict-key="${esc(c.key)}">
          <p class="q-rule">${esc(RULES[c.invariant]?.name ?? c.invariant)}</p>
          <p class="q-text">${esc(d.question)}</p>
          <div class="choices">${d.options
            .map(
              (o, i) => `<button type="button" class="button choice" data-key="${esc(c.key)}-${i}" data-conflict="${esc(c.key)}" data-choice="${i}">${esc(o)}</button>`,
            )
            .join('')}</div>
          <p class="q-meta">${d.details.map(esc).join(' · ')}</p>
        </div>`;
      })
      .join('');
    const settledHtml = settled
      .map(([, r]) => {
        const seat = (r.value as any)?.seat;
        const kept = (doc.trip?.bookings ?? {}) as Record<string, Booking>;
        const keeper = Object.entries(kept).find(([k, b]) => b.seat && !r.victims.includes(k) && r.reason.includes(b.seat))?.[1];
        const what = keeper ? `${nameOf(keeper.by)} keeps seat ${keeper.seat}` : seat ? `seat ${seat}` : r.reason;
        return `<li><span class="who ${esc(r.by)}">${esc(nameOf(r.by))}</span> chose: ${esc(what)}</li>`;
      })
      .join('');
    patch(
      el,
      `<h3>${open.length ? `Needs a decision <span class="count">${open.length}</span>` : 'Decisions'}</h3>
       ${open.length ? openHtml : '<p class="muted small">Nothing to decide.</p>'}
       ${settledHtml ? `<ul class="settled" aria-label="Who chose what">${settledHtml}</ul>` : ''}`,
    );
  }

  private renderStatus(doc: TripDoc): void {
    const current = doc.trip?.status ?? 'planning';
    const at = STATUSES.indexOf(current as any);
    patch(
      this.$('[data-status]'),
      STATUSES.map((s, i) => {
        const state = s === current ? 'current' : at >= 0 && i < at ? 'past' : 'future';
        return `<button type="button" class="step ${state}" data-key="status-${s}" data-to="${s}" aria-pressed="${s === current}">
          <span class="step-dot" aria-hidden="true">${i < at ? '✓' : i + 1}</span><span>${STATUS_WORDS[s]}</span></button>`;
      }).join('') + (current === 'cancelled' ? '<p class="muted small">The trip was cancelled.</p>' : ''),
    );
  }

  private renderWallet(doc: TripDoc): void {
    const w = wallet(doc);
    const bal = this.$('[data-balance]');
    bal.innerHTML = `<span class="muted small">Balance</span> <strong class="${w.balance < 0 ? 'neg' : ''}">${money(w.balance)}</strong>`;
    patch(
      this.$('[data-entries]'),
      w.rows.length === 0
        ? '<li class="muted small">No money yet.</li>'
        : w.rows
            .slice(-8)
            .reverse()
            .map(({ key, e, voided }) => {
              const sign = e.kind === 'spend' ? '−' : '+';
              return `<li class="entry ${e.kind} ${voided ? 'voided' : ''}" data-entry="${esc(key)}">
                <span class="who ${esc(e.by)}">${esc(nameOf(e.by))}</span>
                <span class="what">${esc(e.label ?? (e.kind === 'spend' ? 'Spend' : 'Deposit'))}${
                  voided ? `<span class="why">Refunded by the system: the wallet can't go below zero</span>` : ''
                }</span>
                <span class="amt">${sign}${euro.format(e.amount)}</span></li>`;
            })
            .join(''),
    );
  }

  private renderSeats(doc: TripDoc): void {
    const by = bookings(doc);
    const disabled = doc.trip ? '' : 'disabled';
    patch(
      this.$('[data-seats]'),
      SEATS.map((seat) => {
        const holders = by.get(seat) ?? [];
        const mine = holders.some((h) => h.b.by === this.person.id);
        const cls = holders.length > 1 ? 'disputed' : holders.length === 1 ? (mine ? 'mine' : 'taken') : 'free';
        const who = holders.map((h) => nameOf(h.b.by));
        const text = holders.length === 0 ? 'free' : holders.length > 1 ? `${list(who)}?` : who[0];
        const canPress = holders.length === 0 || mine;
        return `<button type="button" class="seat ${cls}" data-key="seat-${seat}" data-seat="${seat}" ${canPress ? disabled : 'disabled'}
          aria-label="Seat ${seat}: ${esc(holders.length ? `booked by ${list(who)}` : 'free')}"><b>${seat}</b><span>${esc(text)}</span></button>`;
      }).join(''),
    );
  }

  private renderPayments(doc: TripDoc): void {
    const voided = voidedIn(doc, 'trip.payments');
    const rows = sortedEntries(doc.trip?.payments);
    const total = rows.filter(([k]) => !voided.has(k)).reduce((s, [, p]) => s + (p.amount ?? 0), 0);
    patch(
      this.$('[data-payments]'),
      (rows.length === 0
        ? '<li class="muted small">No payments recorded.</li>'
        : rows
            .slice(-6)
            .reverse()
            .map(
              ([key, p]) => `<li class="entry ${voided.has(key) ? 'voided' : ''}" data-payment="${esc(key)}">
              <span class="who ${esc(p.by)}">${esc(nameOf(p.by))}</span>
              <span class="what">Bank payment ${esc(p.ref)}${voided.has(key) ? '<span class="why">Already counted: the same payment was recorded twice</span>' : ''}</span>
              <span class="amt">${euro.format(p.amount)}</span></li>`,
            )
            .join('')) + (rows.length ? `<li class="total"><span>Paid to the hotel</span><strong>${euro.format(total)}</strong></li>` : ''),
    );
  }

  private renderNotes(doc: TripDoc): void {
    const text = typeof doc.notes === 'string' ? doc.notes : '';
    if (text === this.noteText) return;
    const ta = this.$('[data-notes]') as HTMLTextAreaElement;
    // Keep the caret where it was, moved by what was inserted or deleted before it.
    const old = this.noteText;
    let start = 0;
    while (start < old.length && start < text.length && old[start] === text[start]) start++;
    const shift = text.length - old.length;
    const move = (pos: number) => (pos <= start ? pos : Math.max(start, pos + shift));
    const focused = document.activeElement === ta;
    const [s, e] = [ta.selectionStart, ta.selectionEnd];
    this.noteText = text;
    ta.value = text;
    if (focused) ta.setSelectionRange(move(s), move(e));
  }

  private renderLog(doc: TripDoc): void {
    void doc;
    const el = this.$('[data-log]');
    const rows = this.changes.map((c) => {
      const s = this.handle.status(c.id);
      const chip = statusChip(s, this.offline);
      const settled = `${s.status}:${(s as any).seq ?? ''}`;
      if (c.last !== settled) {
        this.onStatus(c, s);
        c.last = settled;
      }
      return `<li class="log-row" data-change="${esc(c.id)}" data-status="${s.status}">
        <div><p class="log-label">${esc(c.label)}</p>${chip.detail ? `<p class="log-detail">${esc(chip.detail)}</p>` : ''}</div>
        <span class="chip ${s.status}">${esc(chip.text)}</span></li>`;
    });
    patch(el, rows.length ? rows.join('') : '<li class="muted small">Changes made on this device show here, with their status.</li>');
  }

  private onStatus(c: Tracked, s: ChangeStatus): void {
    const who = this.person.name;
    if (s.status === 'confirmed') {
      timeline.add(`commit:${c.id}`, {
        phase: 'observe',
        title: `Commit #${s.seq}: ${who} · ${c.label}`,
        detail: 'The server put this change in the agreed order and saved it.',
        where: this.label,
      });
    } else if (s.status === 'rejected') {
      timeline.add(`reject:${c.id}`, { phase: 'reject', title: `Refused ${who}'s change: ${c.label}`, detail: s.reason, where: this.label });
    }
  }

  private feedTimeline(doc: TripDoc): void {
    const { resolutions, conflicts } = facts(doc);
    const resolved = new Set(resolutions.map(([k]) => k));
    for (const [key, c] of conflicts) {
      const rule = RULES[c.invariant]?.name ?? c.invariant;
      if (!timeline.seen.has(`conflict:${key}`)) {
        const detail = c.invariant === 'seat-once' ? describeConflict({ ...c, key, escalated: false } as Conflict).question.replace(/ Who keeps it\?$/, '') : c.question;
        timeline.add(`compare:${key}`, { phase: 'compare', title: `Broken: ${rule}`, detail, where: this.label });
        timeline.add(`conflict:${key}`, {
          phase: 'act',
          title: 'Asked the people involved',
          detail: 'No rule can pick the winner fairly, so the question went to everyone’s inbox.',
          where: this.label,
        });
        timeline.counts.asked++;
      }
    }
    for (const [key, r] of resolutions) {
      if (timeline.seen.has(`resolution:${key}`)) continue;
      const rule = RULES[r.invariant]?.name ?? r.invariant;
      const d = describeResolution(doc, r);
      if (r.action !== 'chosen') {
        timeline.add(`compare:${key}`, { phase: 'compare', title: `Broken: ${rule}`, detail: brokenWords(r), where: this.label });
        timeline.counts.fixed++;
        timeline.add(`resolution:${key}`, { phase: 'act', title: d.title, detail: d.detail, where: this.label });
      } else {
        timeline.add(`resolution:${key}`, { phase: 'decide', title: d.title, detail: d.detail, where: this.label });
      }
    }
    void resolved;
  }
}

/** "…status cannot go from "booked" to "planning"" in plain words. */
function statusWords(reason: string): string {
  const m = /from "?(\w+)"? to "?(\w+)"?/.exec(reason);
  return m ? `The trip can't go from ${STATUS_WORDS[m[1]] ?? m[1]} back to ${STATUS_WORDS[m[2]] ?? m[2]}.` : reason;
}

/** What broke, in plain words (the resolution's reason is for engineers). */
function brokenWords(r: Resolution): string {
  const total = /would come to (-?[0-9.]+)/.exec(r.reason);
  if (r.invariant === 'wallet-non-negative' && total) return `Together, the spends would take the wallet to ${money(Number(total[1]))}.`;
  if (r.invariant === 'payment-once') return 'The same bank payment was recorded more than once.';
  if (r.invariant === 'status-forward') return statusWords(r.reason);
  return r.reason;
}

function statusChip(s: ChangeStatus, offline: boolean): { text: string; detail?: string } {
  switch (s.status) {
    case 'pending':
      return { text: 'Waiting', detail: offline ? 'Saved on this device; it syncs when back online.' : undefined };
    case 'confirmed':
      return { text: `Confirmed #${s.seq}` };
    case 'rejected':
      return { text: 'Rejected', detail: s.reason };
    case 'compensated': {
      const rule = RULES[s.invariant]?.name ?? s.invariant;
      const by = s.by === 'server' ? 'the server' : nameOf(s.by);
      const kept = /chose (\w+)'s/.exec(s.reason)?.[1];
      const why =
        s.invariant === 'seat-once' && s.by !== 'server'
          ? `${by} decided ${kept ? nameOf(kept) : 'someone else'} keeps the seat; this booking was released.`
          : s.invariant === 'status-forward'
            ? `Refused by ${by}: ${statusWords(s.reason)}`
            : s.invariant === 'wallet-non-negative'
            ? `Refunded by ${by}: ${rule.toLowerCase()}.`
            : `Undone by ${by}: ${rule.toLowerCase()}.`;
      return { text: 'Undone', detail: why };
    }
    default:
      return { text: 'Unknown' };
  }
}

// ---------------------------------------------------------------------------------------------
// Start

function tripIdFromHash(): string | null {
  const m = /trip=([0-9a-fA-F-]{32,36})/.exec(location.hash);
  return m ? m[1] : null;
}

async function main(): Promise<void> {
  const container = document.getElementById('replicas')!;
  const schema = await fetch('./trip.schema.json').then((r) => (r.ok ? r.json() : null)).catch(() => null);
  const devices = PEOPLE.map((p) => new Device(p));
  await Promise.all(devices.map((d) => d.open(schema ? [schema] : [])));

  let id = tripIdFromHash();
  const [ana, ben] = devices;
  let first: DocHandle<TripDoc>;
  if (!id) {
    first = ana.repo.create<TripDoc>({ kind: 'automerge', type: 'trip' });
    first.change((d) =>
      d
        .put(['trip'], { name: 'Weekend in Lisbon', status: 'planning', bookings: {}, payments: {}, bus: {} })
        .put(['wallet'], {
          entries: {
            'e-start-ana': { amount: 60, kind: 'deposit', by: 'ana', at: Date.now(), label: 'Kitty' },
            'e-start-ben': { amount: 40, kind: 'deposit', by: 'ben', at: Date.now() + 1, label: 'Kitty' },
          },
        })
        .splice(['notes'], 0, 0, 'Packing list:\n- passports\n'),
    );
    id = first.documentId;
    history.replaceState(null, '', `#trip=${id}`);
  } else {
    first = ana.repo.find<TripDoc>(id, { kind: 'automerge' });
  }
  container.innerHTML = '';
  for (const d of devices) {
    d.attach(d === ana ? first : d.repo.find<TripDoc>(id, { kind: 'automerge' }));
    container.append(d.root);
  }
  timeline.render();
  const share = document.getElementById('share') as HTMLAnchorElement;
  share.href = location.href;
  document.getElementById('new-trip')!.addEventListener('click', () => {
    location.hash = '';
    location.reload();
  });
  addEventListener('hashchange', () => {
    if (tripIdFromHash() !== id) location.reload();
  });
  (window as any).demo = { id, devices, timeline };
  document.body.dataset.ready = 'true';
  void ben;
}

main().catch((e) => {
  console.error(e);
  const c = document.getElementById('replicas');
  if (c) c.innerHTML = `<p class="error" role="alert">The demo could not start: ${esc(e?.message ?? e)}</p>`;
});
