// Building DOM nodes without innerHTML: every name and value from the API ends up as text.

/**
 * `h('a', {href: '/gui/zones', class: 'x'}, 'Zones', child, [more])`: an element with
 * attributes (null, undefined and false are left out, true is an empty attribute) and
 * children (strings become text nodes; null, undefined and false are skipped; arrays are
 * flattened).
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === null || v === undefined || v === false) continue;
    el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of [children].flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

/** A fragment of nodes. */
export function frag(...children) {
  return append(document.createDocumentFragment(), children);
}
