// The control plane's web UI in headless Chromium, driven by Playwright. Started by
// tests/tests/gui.rs against a real global control plane and two zones, which it tells
// what to break through a line protocol:
//
//   this script prints  `ACTION <name>`  and waits for `DONE <name>` on its standard input
//   (kill-zone-2, disable-zone-1, kill-global).
//
// Environment: GUI_GLOBAL and GUI_ZONE (origins of global's and zone-1's REST API),
// GUI_SCREENSHOTS (a folder), GUI_EXPECT (JSON: the zone ingresses to find, see gui.rs).
// Every wait is Playwright's own polling with a timeout; nothing sleeps. Exits 0 after
// printing `gui: all checks passed`, else 1 with the reason.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { chromium } from 'playwright-core';

const GLOBAL = mustEnv('GUI_GLOBAL');
const ZONE = mustEnv('GUI_ZONE');
const SHOTS = mustEnv('GUI_SCREENSHOTS');
const EXPECT = JSON.parse(mustEnv('GUI_EXPECT'));

const LAPTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };
/** The issue's bound for a zone going Offline on the open page. */
const LIVE_MS = 15_000;
const WAIT_MS = 15_000;
const OVERALL_MS = 240_000;

const PAGES = [
  { name: 'overview', path: '/gui/', title: 'Overview' },
  { name: 'zones', path: '/gui/zones', title: 'Zones' },
  { name: 'zone', path: '/gui/zones/zone-1', title: 'Zone zone-1' },
  { name: 'zone-ingresses', path: '/gui/zone-ingresses', title: 'Zone Ingresses' },
  { name: 'zone-egresses', path: '/gui/zone-egresses', title: 'Zone Egresses' },
  { name: 'meshes', path: '/gui/meshes', title: 'Meshes' },
  { name: 'services', path: '/gui/services', title: 'Services' },
  { name: 'dataplanes', path: '/gui/dataplanes', title: 'Data planes' },
  { name: 'policies', path: '/gui/policies', title: 'Policies' },
];

function mustEnv(k) {
  const v = process.env[k];
  if (!v) {
    console.log(`gui: FAILED: ${k} is not set (this script is started by tests/tests/gui.rs)`);
    process.exit(2);
  }
  return v;
}

const say = (...a) => console.log('gui:', ...a);

class Failure extends Error {}
function check(ok, message) {
  if (!ok) throw new Failure(message);
}

// --- The line protocol with the Rust test --------------------------------------------

const input = readline.createInterface({ input: process.stdin });
const lines = [];
let waiting = null;
input.on('line', (l) => {
  lines.push(l.trim());
  waiting?.();
});
input.on('close', () => {
  lines.push('EOF');
  waiting?.();
});

/** Asks the Rust side to do `action` and waits until it says it is done. */
async function act(action) {
  console.log(`ACTION ${action}`);
  for (;;) {
    const i = lines.findIndex((l) => l === `DONE ${action}` || l === 'EOF');
    if (i >= 0) {
      const [l] = lines.splice(i, 1);
      check(l !== 'EOF', `the test harness closed the pipe instead of doing ${action}`);
      return;
    }
    await new Promise((resolve) => {
      waiting = resolve;
    });
    waiting = null;
  }
}

// --- Pages, with every request and console error recorded ------------------------------

/** Requests that left their page's origin, console errors, requests counted. */
const offOrigin = [];
const consoleErrors = [];
let requestCount = 0;
let expectNetworkErrors = false;

async function open(context, origin, viewport) {
  const page = await context.newPage();
  await page.setViewportSize(viewport);
  page.on('request', (r) => {
    requestCount++;
    if (!r.url().startsWith(`${origin}/`)) offOrigin.push(`${r.method()} ${r.url()} (page on ${origin})`);
  });
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    if (expectNetworkErrors && /ERR_CONNECTION_REFUSED|Failed to load resource/.test(m.text())) return;
    consoleErrors.push(`${origin}: ${m.text()}`);
  });
  page.on('pageerror', (e) => consoleErrors.push(`${origin}: uncaught ${e.message}`));
  return page;
}

/** Waits until `locator` (the first of it) shows text matching `re`; says what it saw if not. */
async function waitText(locator, re, what, timeout = WAIT_MS) {
  try {
    await locator.filter({ hasText: re }).first().waitFor({ state: 'visible', timeout });
  } catch {
    const seen = await locator.allInnerTexts().catch(() => []);
    throw new Failure(`${what}: expected ${re} within ${timeout} ms, the page shows ${JSON.stringify(seen)}`);
  }
}

async function waitVisible(locator, what, timeout = WAIT_MS) {
  try {
    await locator.first().waitFor({ state: 'visible', timeout });
  } catch {
    throw new Failure(`${what}: not shown within ${timeout} ms`);
  }
}

/** Loads `path` and waits until the app has rendered the page titled `title` from the API. */
async function load(page, origin, path, title) {
  const res = await page.goto(`${origin}${path}`);
  check(res && res.ok(), `GET ${path}: ${res?.status()}`);
  await waitVisible(page.locator('body[data-ready="true"]'), `${path} loaded from the API`);
  await waitText(page.locator('main h1'), new RegExp(`^${title}$`), `${path}'s heading`);
  return res;
}

/** A regular expression matching exactly `text`. */
function exact(text) {
  const escaped = text.replace(/[.*+?^$|()[\]{}\\]/g, (c) => `\\${c}`);
  return new RegExp(`^${escaped}$`);
}
const zoneStatusCell = (page, zone) => page.locator(`tr[data-row="${zone}"] td.status`);

async function screenshot(page, file) {
  await page.screenshot({ path: path.join(SHOTS, file) });
  say(`screenshot ${file}`);
}

async function focusedText(page) {
  return page.evaluate(() => `${document.activeElement?.tagName}:${document.activeElement?.textContent?.trim()}`);
}

/**
 * The modules' rules on inputs the running control planes do not produce here (a disabled
 * zone that is still connected, a remote ingress on a zone CP, a certificate expiry, a
 * hostile name), checked in the page with the very modules it serves.
 */
async function unitChecks(page) {
  const got = await page.evaluate(async () => {
    const base = document.querySelector('script[type="module"]').src.replace(/app\.js$/, '');
    const api = await import(`${base}api.js`);
    const fmt = await import(`${base}format.js`);
    const { route } = await import(`${base}views.js`);
    const now = Date.parse('2026-01-01T12:00:00Z');
    const sub = (connectTime, disconnectTime) => ({ connectTime, disconnectTime });
    const render = (path, data, ctx, query = '') => {
      const r = route(path, new URLSearchParams(query));
      const div = document.createElement('div');
      div.append(r.view.render(data, ctx, r.params));
      return div;
    };
    const expires = new Date(Date.now() + 5.5 * 3600e3).toISOString();
    const dps = render(
      'dataplanes',
      {
        meshes: ['default'],
        list: [
          {
            name: 'a-1',
            mesh: 'default',
            dataplane: { networking: { address: '10.0.0.1', inbound: [{ tags: { 'kuma.io/service': 'a' } }] } },
            dataplaneInsight: { subscriptions: [sub('t')], mTLS: { certificateExpirationTime: expires } },
          },
        ],
      },
      { mode: 'global' },
    );
    const hostile = '<img src=x onerror="window.__owned=1">';
    const zones = render(
      'zones',
      {
        list: [{ name: hostile, zone: { enabled: true }, zoneInsight: {} }],
        ingresses: new Map(),
        egresses: new Map(),
      },
      { mode: 'global' },
    );
    return {
      counter: [api.counter('21'), api.counter(3), api.counter(undefined), api.counter('x')],
      zones: [
        api.zoneStatus({ zone: { enabled: false }, zoneInsight: { subscriptions: [sub('t')] } }),
        api.zoneStatus({ zone: { enabled: true }, zoneInsight: { subscriptions: [sub('t', 'u')] } }),
        api.zoneStatus({ zone: {}, zoneInsight: { subscriptions: [sub('t', 'u'), sub('v')] } }),
        api.zoneStatus({ zone: {}, zoneInsight: {} }),
      ],
      remote: api.proxyStatus({}, 'zone-2', { mode: 'zone', zone: 'zone-1' }),
      own: api.proxyStatus({}, 'zone-1', { mode: 'zone', zone: 'zone-1' }),
      relative: [
        fmt.relative('2026-01-01T11:59:30Z', now),
        fmt.relative('2026-01-01T11:55:00Z', now),
        fmt.relative('2026-01-02T11:00:00Z', now),
        fmt.relative('nope', now),
      ],
      cert: dps.querySelector('td[data-label="Certificate"]').textContent,
      status: dps.querySelector('td.status').textContent,
      hostile: [zones.querySelector('img') === null, zones.querySelector('tbody th').textContent],
      meshFilter: [
        ...render('services', { meshes: ['a', 'b'], list: [] }, { mode: 'global' }, 'mesh=b').querySelectorAll(
          'nav.filter a',
        ),
      ].map((a) => `${a.textContent}${a.getAttribute('aria-current') ? '*' : ''} ${a.getAttribute('href')}`),
      routes: ['', 'zones', 'zones/zone%2F1', 'zone-ingresses', 'dataplanes', 'nope', 'zones/a/b'].map((p) =>
        route(p, new URLSearchParams()).view.title({ name: 'x', ...route(p, new URLSearchParams()).params }),
      ),
    };
  });
  const want = {
    counter: [21, 3, 0, 0],
    zones: ['disabled', 'offline', 'online', 'offline'],
    remote: 'remote',
    own: 'offline',
    relative: ['less than a minute ago', '5 min ago', 'in 23 h', null],
    cert: 'expires in 5 h',
    status: 'Online',
    hostile: [true, '<img src=x onerror="window.__owned=1">'],
    meshFilter: ['All meshes /gui/services', 'a /gui/services?mesh=a', 'b* /gui/services?mesh=b'],
    routes: ['Overview', 'Zones', 'Zone zone/1', 'Zone Ingresses', 'Data planes', 'Not found', 'Not found'],
  };
  for (const [k, v] of Object.entries(want)) {
    check(
      JSON.stringify(got[k]) === JSON.stringify(v),
      `module check ${k}: got ${JSON.stringify(got[k])}, want ${JSON.stringify(v)}`,
    );
  }
  say(`module checks passed (${Object.keys(want).join(', ')})`);
}

// --- The test ----------------------------------------------------------------------------

async function run(context) {
  const page = await open(context, GLOBAL, LAPTOP);

  // The page and its headers: a strict CSP, revalidated.
  const res = await load(page, GLOBAL, '/gui', 'Overview');
  const csp = res.headers()['content-security-policy'] ?? '';
  check(
    csp.includes("default-src 'self'") && csp.includes("script-src 'self'") && !csp.includes('unsafe'),
    `CSP: ${csp}`,
  );
  check(res.headers()['cache-control'] === 'no-cache', `Cache-Control of the page: ${res.headers()['cache-control']}`);
  await waitText(page.locator('#cp-mode'), /^Global$/, 'the mode badge');
  await waitText(page.locator('[data-card="zones"] .big'), /^2 of 2 online$/, 'the overview’s zones');
  await waitText(page.locator('[data-card="meshes"] .big'), /^1 mesh$/, 'the overview’s meshes');
  await waitText(page.locator('#freshness'), /^Live · refreshed at /, 'the freshness line');

  await unitChecks(page);

  // Keyboard: the first Tab reaches the skip link, then the sections; Enter follows one
  // without a reload, and focus lands on the new page's heading.
  await page.keyboard.press('Tab');
  check((await focusedText(page)) === 'A:Skip to content', `first Tab focused ${await focusedText(page)}`);
  let tabs = 0;
  while ((await focusedText(page)) !== 'A:Zone Ingresses') {
    check(++tabs < 12, `Tab never reached the Zone Ingresses link (at ${await focusedText(page)})`);
    await page.keyboard.press('Tab');
  }
  await page.evaluate(() => {
    window.__sameDocument = true;
  });
  await page.keyboard.press('Enter');
  await page.waitForURL(`${GLOBAL}/gui/zone-ingresses`, { timeout: WAIT_MS });
  await waitText(page.locator('main h1'), /^Zone Ingresses$/, 'the heading after Enter');
  check((await focusedText(page)) === 'H1:Zone Ingresses', `focus after Enter: ${await focusedText(page)}`);
  check(await page.evaluate(() => window.__sameDocument === true), 'following a link reloaded the page');
  check(
    (await page.locator('nav a[aria-current="page"]').innerText()).trim() === 'Zone Ingresses',
    'the nav does not mark the current section',
  );

  // Acceptance 2: every zone's ingress, its advertised address and available services.
  for (const ing of EXPECT.ingresses) {
    const section = page.locator(`section[data-zone="${ing.zone}"]`);
    await waitVisible(section, `a section for ${ing.zone}'s ingresses`);
    await waitText(section.locator('td.advertised'), exact(ing.advertised), `${ing.zone}'s ingress advertised address`);
    for (const svc of ing.services) {
      await waitText(
        section.locator('td.available li'),
        new RegExp(`^${svc} `),
        `${ing.zone}'s ingress offering ${svc}`,
      );
    }
    await waitText(section.locator('td.status'), /^Online$/, `${ing.zone}'s ingress status`);
  }
  say(`zone ingresses: ${EXPECT.ingresses.map((i) => `${i.zone} at ${i.advertised} offers ${i.services}`).join('; ')}`);

  // Zones (a mouse click this time): both Online, with their ingress counts.
  await page.getByRole('link', { name: 'Zones', exact: true }).click();
  await waitText(page.locator('main h1'), /^Zones$/, 'the Zones heading');
  for (const z of ['zone-1', 'zone-2']) {
    await waitText(zoneStatusCell(page, z), /^Online$/, `${z} on the Zones page`);
    await waitText(page.locator(`tr[data-row="${z}"] td[data-label="Ingresses"]`), /^1$/, `${z}'s ingress count`);
  }
  // A zone's page: its KDS subscription.
  await page.getByRole('link', { name: 'zone-1', exact: true }).click();
  await waitText(page.locator('main h1'), /^Zone zone-1$/, 'the zone page heading');
  await waitVisible(page.locator('table tbody tr'), 'a KDS subscription of zone-1');
  await waitText(page.locator('td[data-label="Disconnected"]'), /still connected/, 'zone-1’s open KDS stream');

  // Acceptance 3: every page at both sizes.
  for (const [size, viewport] of [
    ['laptop', LAPTOP],
    ['phone', PHONE],
  ]) {
    await page.setViewportSize(viewport);
    for (const p of PAGES) {
      await load(page, GLOBAL, p.path, p.title);
      await screenshot(page, `${size}-${p.name}.png`);
    }
  }

  // The policies: the allow-all MeshTrafficPermission applied with the mesh.
  await page.setViewportSize(LAPTOP);
  await load(page, GLOBAL, '/gui/policies', 'Policies');
  await waitText(
    page.locator('tbody tr', { hasText: 'allow-all' }).locator('td[data-label="Type"]'),
    /^MeshTrafficPermission$/,
    'the allow-all MeshTrafficPermission on the policies page',
  );

  // A zone CP's UI: it lists exactly one zone, itself, and says where the others are.
  const zonePage = await open(context, ZONE, LAPTOP);
  await load(zonePage, ZONE, '/gui/zones', 'Zones');
  await waitText(zonePage.locator('#cp-mode'), /^Zone zone-1$/, 'the zone CP’s mode badge');
  await waitText(zonePage.locator('.note'), /zone control plane of zone-1/, 'the zone CP’s note');
  await waitText(zoneStatusCell(zonePage, 'zone-1'), /^Online$/, 'zone-1 on its own CP');
  const rows = await zonePage.locator('tbody tr').count();
  check(rows === 1, `the zone CP lists ${rows} zones`);
  // Its own ingress with its status; zone-2's (synced from global) without one.
  await load(zonePage, ZONE, '/gui/', 'Overview');
  await waitText(
    zonePage.locator('[data-card="ingresses"] .big'),
    /^1 of 1 online \(\+1 in other zones\)$/,
    'the zone CP’s ingress count',
  );
  await load(zonePage, ZONE, '/gui/zone-ingresses', 'Zone Ingresses');
  await waitText(zonePage.locator('section[data-zone="zone-1"] td.status'), /^Online$/, 'zone-1’s ingress on its CP');
  await waitText(
    zonePage.locator('section[data-zone="zone-2"] td.status'),
    /^Reported to global$/,
    'zone-2’s ingress on zone-1’s CP',
  );
  for (const [size, viewport] of [
    ['laptop', LAPTOP],
    ['phone', PHONE],
  ]) {
    await zonePage.setViewportSize(viewport);
    await load(zonePage, ZONE, '/gui/', 'Overview');
    await screenshot(zonePage, `${size}-zone-cp-overview.png`);
    await load(zonePage, ZONE, '/gui/zones', 'Zones');
    await screenshot(zonePage, `${size}-zone-cp-zones.png`);
  }
  await zonePage.close();

  // Acceptance 1: live, on the open page, without a reload.
  await page.setViewportSize(LAPTOP);
  await load(page, GLOBAL, '/gui/zones', 'Zones');
  await waitText(zoneStatusCell(page, 'zone-2'), /^Online$/, 'zone-2 before its CP is killed');
  await page.evaluate(() => {
    window.__sameDocument = true;
  });
  await act('kill-zone-2');
  let t0 = Date.now();
  await waitText(zoneStatusCell(page, 'zone-2'), /^Offline$/, 'zone-2 after its CP was killed', LIVE_MS);
  say(`zone-2 Offline on the open page ${Date.now() - t0} ms after its CP was killed`);
  await waitText(zoneStatusCell(page, 'zone-1'), /^Online$/, 'zone-1 while zone-2 is down');
  await screenshot(page, 'laptop-zones-zone-2-offline.png');

  await act('disable-zone-1');
  t0 = Date.now();
  await waitText(zoneStatusCell(page, 'zone-1'), /^Disabled$/, 'zone-1 after it was disabled', LIVE_MS);
  say(`zone-1 Disabled on the open page ${Date.now() - t0} ms after the API call`);
  await waitText(zoneStatusCell(page, 'zone-2'), /^Offline$/, 'zone-2 still Offline');
  check(await page.evaluate(() => window.__sameDocument === true), 'the page reloaded while following the zones');
  await screenshot(page, 'laptop-zones-live.png');
  await page.setViewportSize(PHONE);
  await waitText(zoneStatusCell(page, 'zone-1'), /^Disabled$/, 'zone-1 on a phone');
  await screenshot(page, 'phone-zones-live.png');
  await page.setViewportSize(LAPTOP);

  // The API going away: a clear message, the last data kept.
  expectNetworkErrors = true;
  await act('kill-global');
  await waitText(
    page.locator('#problem'),
    /^Cannot reach the control plane API/,
    'the message when the API is gone',
    WAIT_MS,
  );
  await waitText(
    page.locator('#freshness'),
    /^Not live: last refreshed at /,
    'the freshness line once the API is gone',
  );
  await waitVisible(page.locator('tr[data-row="zone-1"]'), 'the last data while the API is gone');
  check(await page.evaluate(() => window.__sameDocument === true), 'the page reloaded when the API went away');
  await screenshot(page, 'laptop-api-unreachable.png');

  // Acceptance 4: nothing left the CP's origin; no script error, no CSP violation.
  check(requestCount > 20, `only ${requestCount} requests were recorded`);
  check(offOrigin.length === 0, `requests that left the CP's origin:\n  ${offOrigin.join('\n  ')}`);
  check(consoleErrors.length === 0, `console errors:\n  ${consoleErrors.join('\n  ')}`);
  say(`${requestCount} requests, every one to its page's CP origin (${GLOBAL} or ${ZONE})`);
}

async function main() {
  const deadline = setTimeout(() => {
    console.log(`gui: FAILED: the browser test took longer than ${OVERALL_MS / 1000} s`);
    process.exit(1);
  }, OVERALL_MS);
  fs.mkdirSync(SHOTS, { recursive: true });
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'gui-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--no-first-run',
      '--disable-sync',
    ],
  });
  let code = 0;
  try {
    await run(context);
    say(
      `all checks passed (${fs.readdirSync(SHOTS).filter((f) => f.endsWith('.png')).length} screenshots in ${SHOTS})`,
    );
  } catch (e) {
    code = 1;
    console.log(`gui: FAILED: ${e instanceof Failure ? e.message : e.stack || e}`);
    for (const p of context.pages().filter((x) => x.url() !== 'about:blank')) {
      const file = path.join(SHOTS, `failure-${context.pages().indexOf(p)}.png`);
      await p.screenshot({ path: file }).catch(() => {});
      const text = await p
        .locator('body')
        .innerText()
        .catch(() => '');
      console.log(`gui: page ${p.url()} (screenshot ${file}):\n${text}`);
    }
  } finally {
    await context.close().catch(() => {});
    fs.rmSync(profile, { recursive: true, force: true });
    clearTimeout(deadline);
    input.close();
  }
  process.exit(code);
}

main();
