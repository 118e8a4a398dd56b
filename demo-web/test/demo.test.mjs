// End-to-end tests of the demo: headless Debian Chromium (playwright-core) against a real
// accord-server that serves demo-web/dist at / and enforces the trip schema. Every step saves a
// PNG screenshot into SCREENSHOTS (printed at the start).
//
// Env: ACCORD_SERVER (the binary), CHROMIUM (default /usr/bin/chromium), SCREENSHOTS (a folder).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, mkdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import net from 'node:net';
import { chromium } from 'playwright-core';

const HERE = join(dirname(fileURLToPath(import.meta.url)), '..');
const SERVER_BIN = process.env.ACCORD_SERVER;
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const SCHEMA = join(HERE, '..', 'sync-server', 'examples', 'trip.schema.json');
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'];
const SHOTS = process.env.SCREENSHOTS ?? join(HERE, 'screenshots');
const WAIT = 20_000;
const LAPTOP = { width: 1440, height: 900 };
const PHONE = { width: 390, height: 844 };

let server, serverDir, browser, base, shotNumber = 0;

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

async function waitFor(check, what, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

before(async () => {
  assert.ok(SERVER_BIN, 'set ACCORD_SERVER to the accord-server binary');
  await mkdir(SHOTS, { recursive: true });
  console.log(`screenshots: ${SHOTS}`);
  const port = await freePort();
  serverDir = await mkdtemp(join(tmpdir(), 'accord-demo-test-'));
  server = spawn(
    SERVER_BIN,
    ['serve', '--no-auth', '--listen', `127.0.0.1:${port}`, '--data-dir', serverDir, '--schema', SCHEMA,
     '--reconcile-interval-ms', '500', '--demo-dir', join(HERE, 'dist')],
    { stdio: ['ignore', 'inherit', 'inherit'], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' } },
  );
  server.exited = new Promise((resolve) => server.on('exit', resolve));
  base = `http://127.0.0.1:${port}`;
  await waitFor(async () => (await fetch(`${base}/healthz`)).ok, 'accord-server /healthz');
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ARGS });
});

after(async () => {
  await browser?.close();
  if (server) {
    server.kill('SIGTERM');
    await server.exited;
  }
  if (serverDir) await rm(serverDir, { recursive: true, force: true });
});

async function shot(page, name) {
  shotNumber += 1;
  const file = join(SHOTS, `${String(shotNumber).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`  screenshot ${file}`);
}

/** A fresh browser context (its own IndexedDB) showing the demo; a new trip unless `url`. */
async function openDemo(url = `${base}/`, context) {
  const ctx = context ?? (await browser.newContext({ viewport: LAPTOP }));
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.error('[page error]', e));
  page.on('console', (m) => {
    const quiet = /WebSocket connection to|Failed to load resource/.test(m.text());
    if ((m.type() === 'error' || m.type() === 'warning') && !quiet) console.error(`[browser ${m.type()}]`, m.text());
  });
  await page.goto(url);
  await page.waitForSelector('body[data-ready="true"]', { timeout: WAIT });
  for (const who of ['ana', 'ben']) {
    await waitFor(async () => (await device(page, who).getAttribute('class')).includes('is-loading') === false, `${who} has the trip`);
    await waitFor(async () => /^Online/.test(await device(page, who).locator('[data-conn]').textContent()), `${who} online`);
  }
  return { ctx, page };
}

const device = (page, who) => page.locator(`[data-replica="${who}"]`);

async function setOffline(page, who, offline) {
  const sw = device(page, who).getByRole('switch');
  await sw.click();
  assert.equal(await sw.getAttribute('aria-checked'), String(offline));
  if (!offline) {
    await waitFor(async () => /^Online · all synced/.test(await device(page, who).locator('[data-conn]').textContent()), `${who} synced`);
  }
}

const balanceOf = async (page, who) =>
  Number((await device(page, who).locator('[data-balance] strong').textContent()).replace(/[^0-9−-]/g, '').replace('−', '-'));

async function spend(page, who, label, amount) {
  const d = device(page, who);
  await d.getByLabel('What for').fill(label);
  await d.getByLabel('Amount €').first().fill(String(amount));
  await d.getByRole('button', { name: 'Spend' }).click();
}

test('the server serves the demo with the right content types and nothing outside it', async () => {
  const index = await fetch(`${base}/`);
  assert.equal(index.status, 200);
  assert.match(index.headers.get('content-type'), /text\/html/);
  const wasm = await fetch(`${base}/vendor/accord/pkg/accord_client_wasm_bg.wasm`);
  assert.equal(wasm.headers.get('content-type'), 'application/wasm');
  assert.match((await fetch(`${base}/app.js`)).headers.get('content-type'), /text\/javascript/);
  for (const bad of ['/../Cargo.toml', '/%2e%2e/package.json', '/vendor/..%2f..%2fpackage.json', '/.gitignore']) {
    assert.equal((await fetch(`${base}${bad}`)).status, 404, bad);
  }
  assert.equal((await fetch(`${base}/healthz`)).status, 200, 'routes keep priority');
});

test('both devices book the same seat offline: a conflict in the inbox, one choice settles it everywhere', async () => {
  const { ctx, page } = await openDemo();
  await shot(page, 'seat-start');
  await setOffline(page, 'ana', true);
  await setOffline(page, 'ben', true);
  await device(page, 'ana').getByRole('button', { name: /^Seat 12A/ }).click();
  await device(page, 'ben').getByRole('button', { name: /^Seat 12A/ }).click();
  for (const who of ['ana', 'ben']) {
    await waitFor(async () => (await device(page, who).locator('[data-seat="12A"]').getAttribute('class')).includes('mine'), `${who} holds 12A locally`);
    assert.equal(await device(page, who).locator('.log-row[data-status="pending"]').count(), 1);
  }
  await shot(page, 'seat-both-offline-booked-12A');

  await setOffline(page, 'ana', false);
  await setOffline(page, 'ben', false);
  for (const who of ['ana', 'ben']) {
    await device(page, who).locator('.question').waitFor({ timeout: WAIT });
    assert.match(await device(page, who).locator('.q-text').textContent(), /(Ana and Ben|Ben and Ana) both booked seat 12A while offline\. Who keeps it\?/);
    assert.equal(await device(page, who).locator('[data-seat="12A"]').getAttribute('class').then((c) => c.includes('disputed')), true);
  }
  await shot(page, 'seat-conflict-in-both-inboxes');

  // Ben gives the seat to Ana, with the keyboard.
  const choice = device(page, 'ben').getByRole('button', { name: 'Ana keeps 12A' });
  await choice.focus();
  await shot(page, 'seat-choice-focused');
  await page.keyboard.press('Enter');
  for (const who of ['ana', 'ben']) {
    await waitFor(async () => (await device(page, who).locator('.question').count()) === 0, `${who}: conflict closed`);
    await waitFor(async () => /Ben chose: Ana keeps seat 12A/.test(await device(page, who).locator('.settled').textContent()), `${who}: who chose what`);
    await waitFor(async () => (await device(page, who).getByRole('button', { name: /^Seat 12A/ }).getAttribute('aria-label')) === 'Seat 12A: booked by Ana', `${who}: 12A is Ana's`);
  }
  await waitFor(async () => (await device(page, 'ben').locator('.log-row', { hasText: 'Booked seat 12A' }).getAttribute('data-status')) === 'compensated', "Ben's booking undone");
  assert.equal(await device(page, 'ana').locator('.log-row', { hasText: 'Booked seat 12A' }).getAttribute('data-status'), 'confirmed');
  assert.match(await page.locator('#timeline').textContent(), /Ben decided who keeps the seat/);
  await shot(page, 'seat-resolved-same-booking');
  await ctx.close();
});

test('two offline devices overspend the wallet: the balance ends at or above zero and the refund is shown', async () => {
  const { ctx, page } = await openDemo();
  assert.equal(await balanceOf(page, 'ana'), 100);
  await setOffline(page, 'ana', true);
  await setOffline(page, 'ben', true);
  await spend(page, 'ana', 'Dinner at Ramiro', 80);
  await spend(page, 'ben', 'Museum tickets', 70);
  assert.equal(await balanceOf(page, 'ana'), 20);
  assert.equal(await balanceOf(page, 'ben'), 30);
  await shot(page, 'wallet-offline-spends');

  await setOffline(page, 'ana', false);
  await setOffline(page, 'ben', false);
  for (const who of ['ana', 'ben']) {
    await waitFor(async () => (await device(page, who).locator('[data-entries] .entry.voided').count()) === 1, `${who} shows the refund`);
  }
  const [a, b] = [await balanceOf(page, 'ana'), await balanceOf(page, 'ben')];
  assert.equal(a, b, 'both devices agree');
  assert.ok(a >= 0, `balance ${a}`);
  assert.ok(a === 20 || a === 30, `one spend was voided: ${a}`);
  const loser = a === 20 ? 'ben' : 'ana';
  await waitFor(async () => (await device(page, loser).locator('.log-row[data-status="compensated"]').count()) === 1, `${loser}'s spend shows as undone`);
  assert.match(await device(page, loser).locator('.log-row[data-status="compensated"]').textContent(), /wallet never goes below zero/);
  assert.match(await page.locator('#timeline').textContent(), /Refunded .*'s spend of €(70|80)/);
  await shot(page, 'wallet-compensated');
  await page.setViewportSize(PHONE);
  await shot(page, 'wallet-compensated-phone');
  await ctx.close();
});

test('a payment recorded twice counts once; the trip cannot go backwards', async () => {
  const { ctx, page } = await openDemo();
  await setOffline(page, 'ana', true);
  await setOffline(page, 'ben', true);
  for (const who of ['ana', 'ben']) await device(page, who).getByRole('button', { name: 'Record payment' }).click();
  await setOffline(page, 'ana', false);
  await setOffline(page, 'ben', false);
  for (const who of ['ana', 'ben']) {
    await waitFor(async () => (await device(page, who).locator('[data-payments] .entry.voided').count()) === 1, `${who}: one copy dropped`);
    assert.match(await device(page, who).locator('[data-payments] .total').textContent(), /€240/);
  }
  // Ana moves the trip to Booked; Ben, having seen it, tries to go back to Planning.
  await device(page, 'ana').getByRole('button', { name: /Booked/ }).click();
  await waitFor(async () => (await device(page, 'ben').locator('.step.current').textContent()).includes('Booked'), 'Ben sees Booked');
  await device(page, 'ben').getByRole('button', { name: /Planning/ }).click();
  await waitFor(async () => /rejected|compensated/.test(await device(page, 'ben').locator('.log-row', { hasText: 'Set the trip to Planning' }).getAttribute('data-status')), "Ben's step back refused");
  for (const who of ['ana', 'ben']) {
    await waitFor(async () => (await device(page, who).locator('.step.current').textContent()).includes('Booked'), `${who}: still Booked`);
  }
  assert.match(await page.locator('#timeline').textContent(), /Counted payment once/);
  assert.match(await page.locator('#timeline').textContent(), /Kept the trip moving forward|Refused/);
  await shot(page, 'payment-once-and-status-forward');
  await ctx.close();
});

test('concurrent note edits merge with no conflict, also in another tab', async () => {
  const { ctx, page } = await openDemo();
  await setOffline(page, 'ana', true);
  await setOffline(page, 'ben', true);
  const notes = (who) => device(page, who).locator('textarea');
  await notes('ana').click();
  await page.keyboard.press('Control+End');
  await page.keyboard.type('- sunscreen (Ana)\n');
  await notes('ben').click();
  await page.keyboard.press('Control+Home');
  await page.keyboard.type('Ben: I have the train tickets\n');
  await shot(page, 'notes-offline-edits');

  await setOffline(page, 'ana', false);
  await setOffline(page, 'ben', false);
  const merged = await waitFor(async () => {
    const [x, y] = [await notes('ana').inputValue(), await notes('ben').inputValue()];
    return x === y && x.includes('sunscreen (Ana)') && x.includes('Ben: I have the train tickets') && x;
  }, 'notes merged');
  assert.ok(merged.startsWith('Ben: I have the train tickets\nPacking list:'), JSON.stringify(merged));
  assert.ok(merged.endsWith('- sunscreen (Ana)\n'), JSON.stringify(merged));
  for (const who of ['ana', 'ben']) {
    assert.equal(await device(page, who).locator('.question').count(), 0, 'no conflict');
    assert.equal(await device(page, who).locator('.log-row[data-status="compensated"], .log-row[data-status="rejected"]').count(), 0);
  }
  await shot(page, 'notes-merged');

  // The same trip in another tab (its devices get their own storage slots and replica ids).
  const { page: tab } = await openDemo(page.url(), ctx);
  assert.match(await device(tab, 'ana').locator('h2').textContent(), /Ana's phone · tab 2/);
  await waitFor(async () => (await device(tab, 'ben').locator('textarea').inputValue()) === merged, 'tab 2 has the notes');
  await device(tab, 'ana').getByRole('button', { name: 'Booked', exact: false }).first().click();
  await waitFor(async () => (await device(page, 'ben').locator('.step.current').textContent()).includes('Booked'), 'tab 1 sees the status from tab 2');
  await shot(tab, 'notes-second-tab');
  await ctx.close();
});
