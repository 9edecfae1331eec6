// Formatting of times, addresses and statuses, and the small widgets every page uses.

import { h } from './dom.js';

const LABELS = {
  online: 'Online',
  offline: 'Offline',
  disabled: 'Disabled',
  partially_degraded: 'Partially degraded',
  remote: 'Reported to global',
};

/** A status as a badge: the word always, the colour only as a second cue. */
export function badge(status) {
  const known = Object.hasOwn(LABELS, status);
  return h(
    'span',
    { class: `badge badge-${known ? status : 'unknown'}`, 'data-status': status },
    known ? LABELS[status] : status || 'Unknown',
  );
}

/** Whole minutes, hours or days: a table that is polled does not change every second. */
export function relative(iso, now = Date.now()) {
  const t = Date.parse(iso);
  if (!Number.isFinite(t)) return null;
  const future = t > now;
  const s = Math.round(Math.abs(now - t) / 1000);
  let span;
  if (s < 60) return future ? 'in less than a minute' : 'less than a minute ago';
  if (s < 3600) span = `${Math.floor(s / 60)} min`;
  else if (s < 48 * 3600) span = `${Math.floor(s / 3600)} h`;
  else span = `${Math.floor(s / 86400)} days`;
  return future ? `in ${span}` : `${span} ago`;
}

/** `2026-12-06 05:52 UTC`. */
export function absolute(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '';
  return `${d.toISOString().slice(0, 16).replace('T', ' ')} UTC`;
}

/** A `<time>` that says how long ago, with the exact time as its tooltip; `-` when absent. */
export function when(iso, { withDate = false } = {}) {
  const rel = iso ? relative(iso) : null;
  if (!rel) return h('span', { class: 'none' }, '-');
  return h('time', { datetime: iso, title: absolute(iso) }, withDate ? `${absolute(iso)} (${rel})` : rel);
}

export function hostPort(host, port) {
  if (!host) return '-';
  const h6 = host.includes(':') ? `[${host}]` : host;
  return port ? `${h6}:${port}` : h6;
}

export function plural(n, one, many = `${one}s`) {
  return `${n} ${n === 1 ? one : many}`;
}

export function time(date) {
  return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' });
}

/** `key=value` chips of a tag map. */
export function tags(map) {
  const entries = Object.entries(map ?? {}).sort(([a], [b]) => a.localeCompare(b));
  if (!entries.length) return h('span', { class: 'none' }, '-');
  return h(
    'ul',
    { class: 'tags' },
    entries.map(([k, v]) => h('li', {}, h('code', {}, `${k}=${v}`))),
  );
}
