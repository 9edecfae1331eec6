// The app: routes `/gui/...` paths to pages, refreshes the current page from the REST API
// every POLL_MS (so a zone going offline shows within seconds, without a reload), says
// when the data was last refreshed, and says so plainly when the API cannot be reached.

import { ApiError, getJson } from './api.js';
import { h } from './dom.js';
import { time } from './format.js';
import { route } from './views.js';

const POLL_MS = 2000;
const BASE = '/gui';

const $ = (id) => document.getElementById(id);
const els = {
  view: $('view'),
  main: $('main'),
  problem: $('problem'),
  freshness: $('freshness'),
  mode: $('cp-mode'),
  version: $('cp-version'),
  nav: $('nav'),
};

/** What `GET /` and `GET /config` say: mode, zone name, versions, global address. */
let ctx = null;
/** Bumped by every refresh; an answer for an older one is dropped. */
let generation = 0;
let inflight = null;
let timer = null;
let lastOk = null;

function location_() {
  let path = window.location.pathname;
  if (path === BASE || path.startsWith(`${BASE}/`)) path = path.slice(BASE.length);
  return { path: path.replace(/^\/+|\/+$/g, ''), query: new URLSearchParams(window.location.search) };
}

async function loadContext(signal) {
  const [index, config] = await Promise.all([getJson('/', signal), getJson('/config', signal)]);
  const mode = index.mode === 'global' ? 'global' : 'zone';
  ctx = {
    mode,
    zone: index.zone || config?.multizone?.zone?.name || '',
    globalAddress: config?.multizone?.zone?.globalAddress || '',
    version: index.version || '',
    basedOnKuma: index.basedOnKuma || '',
    product: index.product || 'mesh-cp',
  };
  els.mode.textContent = mode === 'global' ? 'Global' : `Zone ${ctx.zone}`;
  els.mode.dataset.mode = mode;
  els.mode.hidden = false;
  const kuma = ctx.basedOnKuma ? ` · compatible with Kuma ${ctx.basedOnKuma}` : '';
  els.version.textContent = `${ctx.product} ${ctx.version}${kuma}`;
}

function markNav(current, scroll) {
  for (const a of els.nav.querySelectorAll('a')) {
    const target = a
      .getAttribute('href')
      .slice(BASE.length)
      .replace(/^\/+|\/+$/g, '');
    if (current !== null && target === current) {
      a.setAttribute('aria-current', 'page');
      if (scroll) a.scrollIntoView({ block: 'nearest', inline: 'nearest' });
    } else a.removeAttribute('aria-current');
  }
}

/** A key that finds "the same" element in a new rendering: data-key, href or row. */
function keyOf(el) {
  if (!el || el === document.body) return null;
  if (el.dataset?.key) return `[data-key="${CSS.escape(el.dataset.key)}"]`;
  const row = el.closest?.('[data-row]');
  const within = row ? `[data-row="${CSS.escape(row.dataset.row)}"] ` : '';
  if (el.getAttribute?.('href')) return `${within}a[href="${CSS.escape(el.getAttribute('href'))}"]`;
  return null;
}

/**
 * Shows a rendering. A refresh that changed nothing leaves the page alone; one that did
 * keeps focus and open disclosures where they were.
 */
function show(node, title, { navigated }) {
  const next = h('div', {}, node);
  if (!navigated && next.innerHTML === els.view.innerHTML) return;
  const focusKey = els.view.contains(document.activeElement) ? keyOf(document.activeElement) : null;
  const open = [...els.view.querySelectorAll('details[open][data-key]')].map((d) => d.dataset.key);
  els.view.replaceChildren(...next.childNodes);
  els.view.removeAttribute('aria-busy');
  for (const k of open) els.view.querySelector(`details[data-key="${CSS.escape(k)}"]`)?.setAttribute('open', '');
  document.title = `${title} · ${ctx?.mode === 'zone' ? `zone ${ctx.zone}` : 'global'} · mesh-cp`;
  if (navigated) {
    els.view.querySelector('h1')?.focus({ preventScroll: true });
  } else if (focusKey) {
    els.view.querySelector(focusKey)?.focus({ preventScroll: true });
  }
}

function setProblem(err) {
  document.body.classList.toggle('stale', Boolean(err));
  if (!err) {
    els.problem.hidden = true;
    els.problem.replaceChildren();
    return;
  }
  const message = err instanceof ApiError ? err.message : `Something went wrong: ${err.message || err}`;
  const shown = lastOk ? `The data below is from ${time(lastOk)}` : 'Nothing could be loaded yet';
  const text = `${message} ${shown}; retrying every ${POLL_MS / 1000} s.`;
  if (els.problem.textContent !== text) els.problem.replaceChildren(h('strong', {}, text));
  els.problem.hidden = false;
  els.freshness.textContent = lastOk ? `Not live: last refreshed at ${time(lastOk)}` : 'Not loaded';
  els.freshness.dataset.state = 'stale';
}

/** Loads and shows the current page; schedules the next refresh. */
async function refresh({ navigated = false } = {}) {
  const gen = ++generation;
  clearTimeout(timer);
  inflight?.abort();
  const controller = new AbortController();
  inflight = controller;
  const { path, query } = location_();
  const r = route(path, query);
  markNav(r.nav, navigated || !ctx);
  if (navigated) {
    els.view.setAttribute('aria-busy', 'true');
    document.title = `${r.view.title(r.params)} · mesh-cp`;
  }
  try {
    if (!ctx) await loadContext(controller.signal);
    const data = await r.view.load(ctx, r.params, controller.signal);
    if (gen !== generation) return;
    show(r.view.render(data, ctx, r.params), r.view.title(r.params), { navigated });
    lastOk = new Date();
    setProblem(null);
    els.freshness.replaceChildren(
      'Live · refreshed at ',
      h('time', { datetime: lastOk.toISOString() }, time(lastOk)),
      ` · every ${POLL_MS / 1000} s`,
    );
    els.freshness.dataset.state = 'live';
    document.body.dataset.ready = 'true';
  } catch (e) {
    if (gen !== generation || controller.signal.aborted) return;
    setProblem(e);
    if (navigated) {
      // Not the previous page's data under the new address: the new page's title, and why it is empty.
      els.view.replaceChildren(
        h('h1', { tabindex: '-1', 'data-key': 'title' }, r.view.title(r.params)),
        h(
          'p',
          { class: 'empty' },
          'This page could not be loaded yet; it will appear as soon as the control plane answers.',
        ),
      );
      els.view.querySelector('h1').focus({ preventScroll: true });
    }
    els.view.removeAttribute('aria-busy');
  } finally {
    if (gen === generation && document.visibilityState !== 'hidden') timer = setTimeout(() => refresh(), POLL_MS);
  }
}

function navigate(href) {
  window.history.pushState(null, '', href);
  window.scrollTo(0, 0);
  refresh({ navigated: true });
}

// Links within the UI change the page without a reload (keyboard Enter included: it
// clicks the focused link). Modified clicks (new tab, ...) are left to the browser.
document.addEventListener('click', (e) => {
  if (e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const a = e.target.closest?.('a[href]');
  if (!a || a.target || a.getAttribute('href').startsWith('#')) return;
  const url = new URL(a.href, window.location.href);
  if (url.origin !== window.location.origin) return;
  if (url.pathname !== BASE && !url.pathname.startsWith(`${BASE}/`)) return;
  e.preventDefault();
  if (url.pathname === window.location.pathname && url.search === window.location.search) {
    refresh({ navigated: true });
    return;
  }
  navigate(url.pathname + url.search);
});

window.addEventListener('popstate', () => refresh({ navigated: true }));

// A tab in the background need not poll; it catches up as soon as it is shown.
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible') refresh();
  else clearTimeout(timer);
});

refresh({ navigated: false });
