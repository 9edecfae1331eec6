// The control plane's REST API (the one `ctl` reads), from this page's own origin, and
// what the UI derives from its answers (the same rules as `ctl inspect`).

/** How long one request may take before the API counts as unreachable. */
const TIMEOUT_MS = 5000;

export class ApiError extends Error {
  /** `unreachable`: no HTTP answer at all (refused, reset, timed out). */
  constructor(message, { path, status = 0, unreachable = false } = {}) {
    super(message);
    this.name = 'ApiError';
    this.path = path;
    this.status = status;
    this.unreachable = unreachable;
  }
}

/** Only paths on this origin: never a full URL, whatever an answer's `next` says. */
function sameOrigin(path) {
  if (typeof path !== 'string' || !path.startsWith('/') || path.startsWith('//')) {
    throw new ApiError(`refusing to follow ${JSON.stringify(path)}: not a path on this control plane`, { path });
  }
  return path;
}

/** `GET path` as JSON; `signal` aborts it (a newer refresh replaced this one). */
export async function getJson(path, signal) {
  const timeout = AbortSignal.timeout(TIMEOUT_MS);
  const both = signal ? AbortSignal.any([signal, timeout]) : timeout;
  let res;
  try {
    res = await fetch(sameOrigin(path), {
      headers: { Accept: 'application/json' },
      cache: 'no-store',
      credentials: 'same-origin',
      signal: both,
    });
  } catch (e) {
    if (signal?.aborted) throw e;
    const why = timeout.aborted ? `no answer within ${TIMEOUT_MS / 1000} s` : e.message;
    throw new ApiError(`Cannot reach the control plane API (${why}).`, { path, unreachable: true });
  }
  if (!res.ok) {
    let detail = '';
    try {
      const body = await res.json();
      detail = body.detail || body.title || '';
    } catch {
      // not JSON: the status says enough
    }
    throw new ApiError(`The control plane answered ${res.status} to GET ${path}${detail ? `: ${detail}` : '.'}`, {
      path,
      status: res.status,
    });
  }
  try {
    return await res.json();
  } catch (e) {
    if (signal?.aborted) throw e;
    throw new ApiError(`The answer to GET ${path} is not JSON.`, { path, status: res.status });
  }
}

/** Every item of a list, following `next` (pages of 1000). */
export async function listAll(path, signal) {
  const items = [];
  let next = `${path}${path.includes('?') ? '&' : '?'}size=1000`;
  for (let pages = 0; next && pages < 100; pages++) {
    const page = await getJson(next, signal);
    items.push(...(page.items ?? []));
    next = page.next || null;
  }
  return items;
}

/** `GET path`, or `null` when the control plane answers 404. */
export async function getOrNull(path, signal) {
  try {
    return await getJson(path, signal);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) return null;
    throw e;
  }
}

export const enc = encodeURIComponent;

// --- What the answers mean ---------------------------------------------------------

/** A protojson uint64 (a string) or a number. */
export function counter(v) {
  const n = typeof v === 'number' ? v : Number.parseInt(v ?? '0', 10);
  return Number.isFinite(n) ? n : 0;
}

export function subscriptions(insight) {
  return Array.isArray(insight?.subscriptions) ? insight.subscriptions : [];
}

/** Kuma's `IsOnline`: some subscription connected and not disconnected. */
export function connected(insight) {
  return subscriptions(insight).some((s) => s.connectTime && !s.disconnectTime);
}

export function lastSubscription(insight) {
  const s = subscriptions(insight);
  return s.length ? s[s.length - 1] : null;
}

/** Sum of a `status.total` counter over every subscription. */
export function total(insight, key) {
  return subscriptions(insight).reduce((n, s) => n + counter(s.status?.total?.[key]), 0);
}

/** A zone overview item: 'disabled' (on global, whatever its CP does), 'online' or 'offline'. */
export function zoneStatus(item) {
  if (item.zone?.enabled === false) return 'disabled';
  return connected(item.zoneInsight) ? 'online' : 'offline';
}

/** The zone a resource belongs to: its `zone` field, else its `kuma.io/zone` label. */
export function zoneOf(spec, labels) {
  return spec?.zone || labels?.['kuma.io/zone'] || '';
}

/**
 * A zone ingress or egress overview: 'online', 'offline', or 'remote' on a zone control
 * plane for one of another zone (its insight is reported to global, not here).
 */
export function proxyStatus(insight, zone, ctx) {
  if (connected(insight)) return 'online';
  if (ctx.mode === 'zone' && zone && zone !== ctx.zone && subscriptions(insight).length === 0) return 'remote';
  return 'offline';
}

/** A data plane overview: 'online' or 'offline' (Kuma's rule for `inspect dataplanes`). */
export function dataplaneStatus(item) {
  return connected(item.dataplaneInsight) ? 'online' : 'offline';
}

/** The name a user gave a synced resource (global adds a hash suffix). */
export function displayName(item) {
  return item.labels?.['kuma.io/display-name'] || item.name;
}

/** `{mesh, services: [...]}` for every mesh: its expanded ServiceInsights. */
export async function servicesOf(meshes, signal) {
  const lists = await Promise.all(
    meshes.map((m) => listAll(`/meshes/${enc(m)}/service-insights`, signal).then((items) => ({ mesh: m, items }))),
  );
  return lists.flatMap((l) => l.items.map((s) => ({ ...s, mesh: s.mesh || l.mesh })));
}
