// The pages. Each is `{title, load, render}`: `load(ctx, params, signal)` reads the API
// and returns plain data, `render(data, ctx, params)` returns the page's nodes. The app
// calls both on every refresh, so a page shows what the control plane says now.

import {
  connected,
  counter,
  dataplaneStatus,
  displayName,
  enc,
  getJson,
  getOrNull,
  lastSubscription,
  listAll,
  proxyStatus,
  servicesOf,
  subscriptions,
  total,
  zoneOf,
  zoneStatus,
} from './api.js';
import { frag, h } from './dom.js';
import { absolute, badge, hostPort, plural, relative, tags, when } from './format.js';

const link = (path, text, attrs = {}) => h('a', { href: `/gui/${path}`, ...attrs }, text);

function heading(text, sub) {
  return frag(h('h1', { tabindex: '-1', 'data-key': 'title' }, text), sub ? h('p', { class: 'lede' }, sub) : null);
}

/**
 * A table that turns into one card per row on a narrow screen (each cell labelled by its
 * column). `columns`: `[{label, cell(row) -> node|string, class?}]`.
 */
function table({ caption, columns, rows, rowKey, empty }) {
  if (!rows.length) return h('p', { class: 'empty' }, empty);
  return h(
    'div',
    { class: 'table-wrap' },
    h(
      'table',
      {},
      h('caption', {}, caption),
      h(
        'thead',
        {},
        h(
          'tr',
          {},
          columns.map((c) => h('th', { scope: 'col', class: c.class }, c.label)),
        ),
      ),
      h(
        'tbody',
        {},
        rows.map((r) =>
          h(
            'tr',
            { 'data-row': rowKey(r) },
            columns.map((c, i) =>
              h(
                i === 0 ? 'th' : 'td',
                { 'data-label': c.label, class: c.class, scope: i === 0 ? 'row' : null },
                h('div', { class: 'cell' }, c.cell(r)),
              ),
            ),
          ),
        ),
      ),
    ),
  );
}

/** A `<dl>` of label/value pairs. */
function facts(pairs) {
  return h(
    'dl',
    { class: 'facts' },
    pairs.filter(Boolean).map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', {}, v))),
  );
}

function note(...children) {
  return h('p', { class: 'note' }, children);
}

const byName = (a, b) => a.name.localeCompare(b.name);

async function meshNames(signal) {
  return (await listAll('/meshes', signal)).map((m) => m.name).sort();
}

/** Mesh filter links (`?mesh=`) above a per-mesh list. */
function meshFilter(path, meshes, current) {
  if (meshes.length < 2) return null;
  const item = (name, href) =>
    h(
      'li',
      {},
      h('a', { href, 'aria-current': (current || '') === (name || '') ? 'page' : null }, name || 'All meshes'),
    );
  return h(
    'nav',
    { class: 'filter', 'aria-label': 'Mesh' },
    h(
      'ul',
      {},
      item('', `/gui/${path}`),
      meshes.map((m) => item(m, `/gui/${path}?mesh=${enc(m)}`)),
    ),
  );
}

function counts(items) {
  const up = items.filter((i) => i.up).length;
  return { up, all: items.length };
}

// --- Overview -----------------------------------------------------------------------

const overview = {
  title: () => 'Overview',
  async load(ctx, _params, signal) {
    const meshes = await meshNames(signal);
    const [zones, ingresses, egresses, dataplanes, services] = await Promise.all([
      listAll('/zones/_overview', signal),
      listAll('/zoneingresses/_overview', signal),
      listAll('/zoneegresses/_overview', signal),
      listAll('/dataplanes/_overview', signal),
      servicesOf(meshes, signal),
    ]);
    return { meshes, zones, ingresses, egresses, dataplanes, services };
  },
  render(d, ctx) {
    const card = (key, title, path, big, small, extra) =>
      h(
        'section',
        { class: 'card', 'data-card': key, 'aria-labelledby': `card-${key}` },
        h('h2', { id: `card-${key}` }, link(path, title)),
        h('p', { class: 'big' }, h('span', { class: 'num' }, big), ' ', h('span', { class: 'of' }, small)),
        extra,
      );
    const zones = counts(d.zones.map((z) => ({ up: zoneStatus(z) === 'online' })));
    // On a zone CP, other zones' ingresses come from global without their status.
    const proxies = (items, key) => {
      const statuses = items.map((i) => proxyStatus(i[`${key}Insight`], zoneOf(i[key], i.labels), ctx));
      const here = statuses.filter((s) => s !== 'remote');
      const remote = statuses.length - here.length;
      const up = here.filter((s) => s === 'online').length;
      return { up, text: `of ${here.length} online${remote ? ` (+${remote} in other zones)` : ''}` };
    };
    const ingresses = proxies(d.ingresses, 'zoneIngress');
    const egresses = proxies(d.egresses, 'zoneEgress');
    const dps = counts(d.dataplanes.map((i) => ({ up: dataplaneStatus(i) === 'online' })));
    const svcs = counts(d.services.map((s) => ({ up: s.status === 'online' })));
    const self = d.zones.find((z) => z.name === ctx.zone);
    let connection = 'standalone';
    if (ctx.globalAddress)
      connection = self && zoneStatus(self) === 'online' ? 'synced with global' : 'not connected to global';
    const zoneCard =
      ctx.mode === 'global'
        ? card('zones', 'Zones', 'zones', zones.up, `of ${zones.all} online`, null)
        : card('zones', 'This zone', 'zones', ctx.zone, connection, null);
    return frag(
      heading(
        'Overview',
        ctx.mode === 'global'
          ? 'The global control plane: every zone, mesh, service and data plane.'
          : `The zone control plane of ${ctx.zone}.`,
      ),
      h(
        'div',
        { class: 'cards' },
        zoneCard,
        card('ingresses', 'Zone Ingresses', 'zone-ingresses', ingresses.up, ingresses.text),
        card('egresses', 'Zone Egresses', 'zone-egresses', egresses.up, egresses.text),
        card('meshes', 'Meshes', 'meshes', d.meshes.length, d.meshes.length === 1 ? 'mesh' : 'meshes'),
        card('services', 'Services', 'services', svcs.up, `of ${svcs.all} online`),
        card('dataplanes', 'Data planes', 'dataplanes', dps.up, `of ${dps.all} online`),
      ),
    );
  },
};

// --- Zones --------------------------------------------------------------------------

function countByZone(items) {
  const m = new Map();
  for (const i of items) {
    const z = zoneOf(i, i.labels);
    m.set(z, (m.get(z) ?? 0) + 1);
  }
  return m;
}

const zones = {
  title: () => 'Zones',
  async load(ctx, _params, signal) {
    const [list, ingresses, egresses] = await Promise.all([
      listAll('/zones/_overview', signal),
      listAll('/zoneingresses', signal),
      listAll('/zoneegresses', signal),
    ]);
    return { list: list.sort(byName), ingresses: countByZone(ingresses), egresses: countByZone(egresses) };
  },
  render(d, ctx) {
    const since = (z) => {
      const s = lastSubscription(z.zoneInsight);
      if (!s) return h('span', { class: 'none' }, 'never connected');
      if (connected(z.zoneInsight)) return when(s.connectTime);
      return frag('disconnected ', when(s.disconnectTime || s.status?.lastUpdateTime));
    };
    const lede =
      ctx.mode === 'global' ? 'Every zone control plane that has connected to this global control plane.' : null;
    return frag(
      heading('Zones', lede),
      ctx.mode === 'zone'
        ? note(
            `This is the zone control plane of ${ctx.zone}: it lists only itself, `,
            'with its connection to the global control plane',
            ctx.globalAddress ? ` (${ctx.globalAddress})` : ' (none: this zone is standalone)',
            '. The list of every zone is on the global control plane.',
          )
        : null,
      table({
        caption: ctx.mode === 'global' ? 'Zones and their connection to global' : 'This zone',
        rowKey: (z) => z.name,
        empty:
          ctx.mode === 'global'
            ? 'No zone has connected yet.'
            : 'This zone has not connected to a global control plane.',
        rows: d.list,
        columns: [
          { label: 'Name', cell: (z) => link(`zones/${enc(z.name)}`, z.name) },
          { label: 'Status', class: 'status', cell: (z) => badge(zoneStatus(z)) },
          { label: 'CP version', cell: (z) => lastSubscription(z.zoneInsight)?.version?.kumaCp?.version || '-' },
          { label: 'Connected since', cell: since },
          { label: 'Ingresses', class: 'n', cell: (z) => String(d.ingresses.get(z.name) ?? 0) },
          { label: 'Egresses', class: 'n', cell: (z) => String(d.egresses.get(z.name) ?? 0) },
        ],
      }),
    );
  },
};

function storeOf(sub) {
  try {
    return JSON.parse(sub?.config || '{}')?.store?.type || '-';
  } catch {
    return '-';
  }
}

const zone = {
  title: (p) => `Zone ${p.name}`,
  async load(ctx, p, signal) {
    const [item, ingresses, egresses] = await Promise.all([
      getOrNull(`/zones/${enc(p.name)}/_overview`, signal),
      listAll('/zoneingresses/_overview', signal),
      listAll('/zoneegresses/_overview', signal),
    ]);
    const mine = (i, key) => zoneOf(i[key], i.labels) === p.name;
    return {
      item,
      ingresses: ingresses.filter((i) => mine(i, 'zoneIngress')).sort(byName),
      egresses: egresses.filter((i) => mine(i, 'zoneEgress')).sort(byName),
    };
  },
  render(d, ctx, p) {
    if (!d.item) {
      return frag(
        heading(`Zone ${p.name}`),
        h('p', { class: 'empty' }, `There is no zone named ${p.name}. `, link('zones', 'All zones')),
      );
    }
    const z = d.item;
    const insight = z.zoneInsight;
    const last = lastSubscription(insight);
    const status = zoneStatus(z);
    const subs = [...subscriptions(insight)].reverse();
    const proxies = (items, key) =>
      items.length
        ? h(
            'ul',
            { class: 'plain' },
            items.map((i) => h('li', {}, `${displayName(i)} `, badge(proxyStatus(i[`${key}Insight`], p.name, ctx)))),
          )
        : h('span', { class: 'none' }, 'none');
    const stats = Object.entries(last?.status?.stat ?? {}).sort(([a], [b]) => a.localeCompare(b));
    return frag(
      heading(`Zone ${z.name}`),
      h('p', {}, link('zones', '← All zones')),
      status === 'disabled'
        ? note(
            'This zone is disabled on global: its CP may still be connected, but global neither syncs it ',
            'nor sends its ingresses to the other zones.',
          )
        : null,
      facts([
        ['Status', badge(status)],
        ['Enabled', z.zone?.enabled === false ? 'no' : 'yes'],
        ['CP version', last?.version?.kumaCp?.version || '-'],
        ['Store', storeOf(last)],
        [
          'Connected since',
          connected(insight)
            ? when(last.connectTime, { withDate: true })
            : h('span', { class: 'none' }, 'not connected'),
        ],
        ['Last update', when(last?.status?.lastUpdateTime)],
        ['Responses sent', String(total(insight, 'responsesSent'))],
        ['Rejected', String(total(insight, 'responsesRejected'))],
        ['Zone ingresses', proxies(d.ingresses, 'zoneIngress')],
        ['Zone egresses', proxies(d.egresses, 'zoneEgress')],
      ]),
      h('h2', {}, 'KDS subscriptions'),
      table({
        caption: `KDS connections of ${z.name}, newest first`,
        rowKey: (s) => s.id,
        empty: 'This zone has never connected.',
        rows: subs,
        columns: [
          { label: 'ID', cell: (s) => h('code', {}, s.id || '-') },
          { label: 'Global instance', cell: (s) => s.globalInstanceId || '-' },
          { label: 'Zone instance', cell: (s) => s.zoneInstanceId || '-' },
          { label: 'Connected', cell: (s) => when(s.connectTime) },
          {
            label: 'Disconnected',
            cell: (s) => (s.disconnectTime ? when(s.disconnectTime) : h('span', { class: 'none' }, 'still connected')),
          },
          { label: 'Last update', cell: (s) => when(s.status?.lastUpdateTime) },
          { label: 'Sent', class: 'n', cell: (s) => String(counter(s.status?.total?.responsesSent)) },
          { label: 'Acked', class: 'n', cell: (s) => String(counter(s.status?.total?.responsesAcknowledged)) },
          { label: 'Rejected', class: 'n', cell: (s) => String(counter(s.status?.total?.responsesRejected)) },
        ],
      }),
      stats.length
        ? h(
            'details',
            { 'data-key': 'stats' },
            h('summary', {}, `Resources of the newest subscription (${stats.length} types)`),
            table({
              caption: 'Responses per resource type',
              rowKey: ([t]) => t,
              empty: '',
              rows: stats,
              columns: [
                { label: 'Type', cell: ([t]) => t },
                { label: 'Sent', class: 'n', cell: ([, s]) => String(counter(s.responsesSent)) },
                { label: 'Acked', class: 'n', cell: ([, s]) => String(counter(s.responsesAcknowledged)) },
                { label: 'Rejected', class: 'n', cell: ([, s]) => String(counter(s.responsesRejected)) },
              ],
            }),
          )
        : null,
    );
  },
};

// --- Zone ingresses and egresses ----------------------------------------------------

function groupByZone(items, key) {
  const groups = new Map();
  for (const i of items) {
    const z = zoneOf(i[key], i.labels);
    if (!groups.has(z)) groups.set(z, []);
    groups.get(z).push(i);
  }
  return [...groups.entries()]
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([zone, list]) => ({ zone, list: list.sort(byName) }));
}

function availableServices(list) {
  if (!list?.length) return h('span', { class: 'none' }, 'none');
  const sorted = [...list].sort((a, b) =>
    (a.tags?.['kuma.io/service'] ?? '').localeCompare(b.tags?.['kuma.io/service'] ?? ''),
  );
  return h(
    'ul',
    { class: 'services' },
    sorted.map((s) =>
      h(
        'li',
        { 'data-service': s.tags?.['kuma.io/service'] ?? '' },
        h('span', { class: 'svc' }, s.tags?.['kuma.io/service'] ?? '?'),
        h('span', { class: 'meta' }, ` ${plural(counter(s.instances), 'instance')} · mesh ${s.mesh || '-'}`),
      ),
    ),
  );
}

function proxyPage({ kind, title, path, key, lede, empty }) {
  return {
    title: () => title,
    async load(_ctx, _p, signal) {
      return groupByZone(await listAll(`/${path}/_overview`, signal), key);
    },
    render(groups, ctx) {
      const insightKey = `${key}Insight`;
      const columns = [
        { label: 'Name', cell: (i) => h('span', { title: i.name }, displayName(i)) },
        {
          label: 'Status',
          class: 'status',
          cell: (i) => badge(proxyStatus(i[insightKey], zoneOf(i[key], i.labels), ctx)),
        },
        { label: 'Address', cell: (i) => hostPort(i[key]?.networking?.address, i[key]?.networking?.port) },
        {
          label: 'Advertised address',
          class: 'advertised',
          cell: (i) => hostPort(i[key]?.networking?.advertisedAddress, i[key]?.networking?.advertisedPort),
        },
      ];
      if (kind === 'ingress') {
        columns.push({
          label: 'Available services',
          class: 'available',
          cell: (i) => availableServices(i[key]?.availableServices),
        });
      }
      columns.push({
        label: 'Connected since',
        cell: (i) =>
          connected(i[insightKey])
            ? when(lastSubscription(i[insightKey])?.connectTime)
            : h('span', { class: 'none' }, '-'),
      });
      columns.push({
        label: 'dp version',
        cell: (i) => lastSubscription(i[insightKey])?.version?.kumaDp?.version || '-',
      });
      return frag(
        heading(title, lede),
        groups.length
          ? groups.map(({ zone: z, list }) =>
              h(
                'section',
                { class: 'group', 'data-zone': z, 'aria-labelledby': `zone-${z}` },
                h('h2', { id: `zone-${z}` }, z ? frag('Zone ', link(`zones/${enc(z)}`, z)) : 'No zone'),
                table({
                  caption: `${title} of ${z || 'no zone'}`,
                  rowKey: (i) => i.name,
                  rows: list,
                  columns,
                  empty: '',
                }),
              ),
            )
          : h('p', { class: 'empty' }, empty),
      );
    },
  };
}

const ingresses = proxyPage({
  kind: 'ingress',
  title: 'Zone Ingresses',
  path: 'zoneingresses',
  key: 'zoneIngress',
  lede: 'Each zone’s entry point for traffic from the other zones, with the services it offers them.',
  empty: 'No zone ingress yet: start one with `dp run --proxy-type=ingress` against a zone control plane.',
});

const egresses = proxyPage({
  kind: 'egress',
  title: 'Zone Egresses',
  path: 'zoneegresses',
  key: 'zoneEgress',
  lede: 'Each zone’s exit for traffic to other zones and external services.',
  empty: 'No zone egress is registered.',
});

// --- Meshes, services, data planes --------------------------------------------------

function mtls(mesh) {
  const name = mesh.mtls?.enabledBackend;
  if (!name) return h('span', { class: 'none' }, 'off');
  const b = (mesh.mtls.backends ?? []).find((x) => x.name === name);
  return frag(h('code', {}, name), b?.type ? ` (${b.type})` : '');
}

const meshes = {
  title: () => 'Meshes',
  async load(_ctx, _p, signal) {
    const list = (await listAll('/meshes', signal)).sort(byName);
    const [services, dataplanes] = await Promise.all([
      servicesOf(
        list.map((m) => m.name),
        signal,
      ),
      listAll('/dataplanes/_overview', signal),
    ]);
    return { list, services, dataplanes };
  },
  render(d) {
    return frag(
      heading('Meshes'),
      table({
        caption: 'Meshes and their mTLS backend',
        rowKey: (m) => m.name,
        empty: 'No mesh yet.',
        rows: d.list,
        columns: [
          { label: 'Name', cell: (m) => m.name },
          { label: 'mTLS backend', cell: mtls },
          {
            label: 'Services',
            class: 'n',
            cell: (m) =>
              link(`services?mesh=${enc(m.name)}`, String(d.services.filter((s) => s.mesh === m.name).length)),
          },
          {
            label: 'Data planes online',
            class: 'n',
            cell: (m) => {
              const mine = d.dataplanes.filter((x) => x.mesh === m.name);
              const up = mine.filter((x) => dataplaneStatus(x) === 'online').length;
              return link(`dataplanes?mesh=${enc(m.name)}`, `${up} of ${mine.length}`);
            },
          },
          { label: 'Created', cell: (m) => when(m.creationTime) },
        ],
      }),
    );
  },
};

/** What a policy applies to: its top-level targetRef (legacy policies have selectors). */
function targetOf(p) {
  const t = p.spec?.targetRef;
  if (!t) return p.spec ? h('code', {}, 'Mesh') : h('span', { class: 'none' }, 'selectors');
  const what = t.name ?? (t.tags ? tags(t.tags) : t.labels ? tags(t.labels) : null);
  return frag(h('code', {}, t.kind ?? 'Mesh'), what ? frag(' ', what) : null, t.sectionName ? ` (${t.sectionName})` : '');
}

const policies = {
  title: () => 'Policies',
  async load(_ctx, p, signal) {
    const all = await meshNames(signal);
    const kinds = (await getJson('/policies', signal)).policies ?? [];
    const lists = await Promise.all(
      kinds.map(async (k) => {
        const path = p.mesh ? `/meshes/${enc(p.mesh)}/${k.path}` : `/${k.path}`;
        return (await listAll(path, signal)).map((item) => ({ ...item, kind: k.name }));
      }),
    );
    const list = lists.flat().sort((a, b) => a.kind.localeCompare(b.kind) || a.mesh.localeCompare(b.mesh) || byName(a, b));
    return { meshes: all, list };
  },
  render(d, _ctx, p) {
    return frag(
      heading('Policies', p.mesh ? `In mesh ${p.mesh}.` : null),
      meshFilter('policies', d.meshes, p.mesh),
      table({
        caption: 'Policies and what they apply to',
        rowKey: (x) => `${x.mesh}/${x.kind}/${x.name}`,
        empty: 'No policy yet.',
        rows: d.list,
        columns: [
          { label: 'Name', cell: (x) => x.name },
          { label: 'Type', cell: (x) => x.kind },
          { label: 'Mesh', cell: (x) => x.mesh },
          { label: 'Applies to', cell: targetOf },
          { label: 'Created', cell: (x) => when(x.creationTime) },
        ],
      }),
    );
  },
};

const services = {
  title: () => 'Services',
  async load(_ctx, p, signal) {
    const all = await meshNames(signal);
    const list = await servicesOf(p.mesh ? [p.mesh] : all, signal);
    return { meshes: all, list: list.sort((a, b) => a.name.localeCompare(b.name) || a.mesh.localeCompare(b.mesh)) };
  },
  render(d, _ctx, p) {
    return frag(
      heading('Services', p.mesh ? `In mesh ${p.mesh}.` : null),
      meshFilter('services', d.meshes, p.mesh),
      table({
        caption: 'Services and how many of their data plane proxies are online',
        rowKey: (s) => `${s.mesh}/${s.name}`,
        empty: 'No service yet.',
        rows: d.list,
        columns: [
          { label: 'Service', cell: (s) => s.name },
          { label: 'Mesh', cell: (s) => s.mesh },
          { label: 'Status', class: 'status', cell: (s) => badge(s.status) },
          {
            label: 'Data planes online',
            class: 'n',
            cell: (s) => `${counter(s.dataplanes?.online)} of ${counter(s.dataplanes?.total)}`,
          },
          { label: 'Zones', cell: (s) => (s.zones?.length ? s.zones.join(', ') : '-') },
          { label: 'Address', cell: (s) => (s.addressPort ? h('code', {}, s.addressPort) : '-') },
        ],
      }),
    );
  },
};

function certificate(item) {
  const exp = item.dataplaneInsight?.mTLS?.certificateExpirationTime;
  if (!exp || !relative(exp)) return h('span', { class: 'none' }, '-');
  const expired = Date.parse(exp) < Date.now();
  return h(
    'time',
    { datetime: exp, title: absolute(exp), class: expired ? 'expired' : null },
    expired ? `expired ${relative(exp)}` : `expires ${relative(exp)}`,
  );
}

const dataplanes = {
  title: () => 'Data planes',
  async load(_ctx, p, signal) {
    const [all, list] = await Promise.all([
      meshNames(signal),
      listAll(p.mesh ? `/meshes/${enc(p.mesh)}/dataplanes/_overview` : '/dataplanes/_overview', signal),
    ]);
    return {
      meshes: all,
      list: list.sort((a, b) => displayName(a).localeCompare(displayName(b)) || a.mesh.localeCompare(b.mesh)),
    };
  },
  render(d, _ctx, p) {
    return frag(
      heading('Data planes', p.mesh ? `In mesh ${p.mesh}.` : null),
      meshFilter('dataplanes', d.meshes, p.mesh),
      table({
        caption: 'Data plane proxies: status, tags and certificate',
        rowKey: (x) => `${x.mesh}/${x.name}`,
        empty: 'No data plane proxy yet.',
        rows: d.list,
        columns: [
          { label: 'Name', cell: (x) => h('span', { title: x.name }, displayName(x)) },
          { label: 'Mesh', cell: (x) => x.mesh },
          { label: 'Zone', cell: (x) => x.labels?.['kuma.io/zone'] || '-' },
          { label: 'Status', class: 'status', cell: (x) => badge(dataplaneStatus(x)) },
          { label: 'Address', cell: (x) => x.dataplane?.networking?.address || '-' },
          {
            label: 'Tags',
            cell: (x) => {
              const inbound = x.dataplane?.networking?.inbound ?? [];
              return inbound.length ? inbound.map((i) => tags(i.tags)) : tags(x.dataplane?.networking?.gateway?.tags);
            },
          },
          { label: 'Certificate', cell: certificate },
        ],
      }),
    );
  },
};

const notFound = {
  title: () => 'Not found',
  async load() {
    return null;
  },
  render() {
    return frag(heading('Not found'), h('p', {}, 'There is no such page. ', link('', 'Go to the overview.')));
  },
};

/** The page for a path below `/gui/` (no leading or trailing slash) and its query. */
export function route(path, query) {
  let parts;
  try {
    parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  } catch {
    parts = ['?'];
  }
  const mesh = query.get('mesh') || '';
  switch (parts[0] ?? '') {
    case '':
      return { view: overview, params: {}, nav: '' };
    case 'zones':
      if (parts.length === 1) return { view: zones, params: {}, nav: 'zones' };
      if (parts.length === 2) return { view: zone, params: { name: parts[1] }, nav: 'zones' };
      break;
    case 'zone-ingresses':
      if (parts.length === 1) return { view: ingresses, params: {}, nav: 'zone-ingresses' };
      break;
    case 'zone-egresses':
      if (parts.length === 1) return { view: egresses, params: {}, nav: 'zone-egresses' };
      break;
    case 'meshes':
      if (parts.length === 1) return { view: meshes, params: {}, nav: 'meshes' };
      break;
    case 'services':
      if (parts.length === 1) return { view: services, params: { mesh }, nav: 'services' };
      break;
    case 'dataplanes':
      if (parts.length === 1) return { view: dataplanes, params: { mesh }, nav: 'dataplanes' };
      break;
    case 'policies':
      if (parts.length === 1) return { view: policies, params: { mesh }, nav: 'policies' };
      break;
    default:
  }
  return { view: notFound, params: {}, nav: null };
}
