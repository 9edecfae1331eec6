//! The web UI at `/gui` on the REST port: a few plain ES modules, a stylesheet and an
//! icon (`cp/gui/`), embedded in the binary, reading the same REST API as `ctl`.
//!
//! * `/gui`, `/gui/` and every other `/gui/...` path that is not an asset answer the page
//!   (the front end routes by path: `/gui/zones/zone-1` reloads as it was).
//! * Assets live under `/gui/assets/<version>/`, where `<version>` is a hash of every asset
//!   computed at compile time: the page names the current one, so assets are cached for a
//!   year (`immutable`) while the page itself is revalidated on every load (`no-cache`
//!   with an `ETag`). An asset asked for under another version is served uncached.
//! * Every answer carries a strict Content-Security-Policy: everything from this origin
//!   only, no inline script or style, no frames, no plugins.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Everything from this origin only; nothing inline, no frames, no plugins, no forms.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; font-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

const PAGE: &str = include_str!("../gui/index.html");
/// Where the page says its assets are; replaced by `/gui/assets/<version>`.
const ASSET_BASE_PLACEHOLDER: &str = "{{ASSETS}}";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    etag: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, in a `const fn` so that the hashes are computed by the compiler.
const fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

macro_rules! assets {
    ($($name:literal => $content_type:literal),+ $(,)?) => {
        const ASSETS: &[Asset] = &[$(Asset {
            name: $name,
            content_type: $content_type,
            body: include_bytes!(concat!("../gui/", $name)),
            etag: fnv1a(FNV_OFFSET, include_bytes!(concat!("../gui/", $name))),
        }),+];
    };
}

assets!(
    "app.js" => "text/javascript; charset=utf-8",
    "api.js" => "text/javascript; charset=utf-8",
    "dom.js" => "text/javascript; charset=utf-8",
    "format.js" => "text/javascript; charset=utf-8",
    "views.js" => "text/javascript; charset=utf-8",
    "style.css" => "text/css; charset=utf-8",
    "favicon.svg" => "image/svg+xml",
);

/// A hash of the page and every asset: the asset URLs change whenever any of them does.
const VERSION: u64 = {
    let mut h = fnv1a(FNV_OFFSET, PAGE.as_bytes());
    let mut i = 0;
    while i < ASSETS.len() {
        h = fnv1a(h, ASSETS[i].body);
        h = fnv1a(h, ASSETS[i].name.as_bytes());
        i += 1;
    }
    h
};

fn version() -> String {
    format!("{VERSION:016x}")
}

/// The page with its asset base filled in.
static PAGE_BODY: LazyLock<String> =
    LazyLock::new(|| PAGE.replace(ASSET_BASE_PLACEHOLDER, &format!("/gui/assets/{}", version())));

/// The routes of the UI, to merge into the REST API's router (before its fallback).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/gui", get(page)).route("/gui/", get(page)).route("/gui/{*path}", get(path))
}

async fn page(headers: HeaderMap) -> Response {
    respond("", headers.get(header::IF_NONE_MATCH))
}

async fn path(Path(path): Path<String>, headers: HeaderMap) -> Response {
    respond(&path, headers.get(header::IF_NONE_MATCH))
}

/// The answer to `GET /gui/<path>`.
fn respond(path: &str, if_none_match: Option<&HeaderValue>) -> Response {
    let Some(rest) = path.strip_prefix("assets/") else {
        // Any other path is one of the front end's own routes: the page routes it.
        return file(PAGE_BODY.as_bytes(), "text/html; charset=utf-8", VERSION, "no-cache", if_none_match);
    };
    let (version, name) = rest.split_once('/').unwrap_or(("", rest));
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) if version == self::version() => {
            file(a.body, a.content_type, a.etag, "public, max-age=31536000, immutable", if_none_match)
        }
        // A page loaded before an upgrade asks for the old version: serve what there is, uncached.
        Some(a) => file(a.body, a.content_type, a.etag, "no-cache", if_none_match),
        None => with_security_headers(
            (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "404: no such asset")
                .into_response(),
            "no-store",
        ),
    }
}

fn file(
    body: &'static [u8],
    content_type: &'static str,
    etag: u64,
    cache: &'static str,
    if_none_match: Option<&HeaderValue>,
) -> Response {
    let etag = format!("\"{etag:016x}\"");
    let fresh = if_none_match
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().trim_start_matches("W/") == etag || t.trim() == "*"));
    let mut r = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&etag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    with_security_headers(r, cache)
}

fn with_security_headers(mut r: Response, cache: &'static str) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(r: &Response, name: header::HeaderName) -> &str {
        r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    #[test]
    fn the_page_names_the_current_asset_version_and_is_revalidated() {
        for path in ["", "zones", "zones/zone-1", "zone-ingresses"] {
            let r = respond(path, None);
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(header(&r, header::CONTENT_TYPE), "text/html; charset=utf-8");
            assert_eq!(header(&r, header::CACHE_CONTROL), "no-cache");
            assert_eq!(header(&r, header::CONTENT_SECURITY_POLICY), CONTENT_SECURITY_POLICY);
            assert_eq!(header(&r, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
        }
        assert!(PAGE_BODY.contains(&format!("/gui/assets/{}/app.js", version())));
        assert!(!PAGE_BODY.contains(ASSET_BASE_PLACEHOLDER));
    }

    #[test]
    fn assets_are_immutable_under_their_version_and_answer_304_to_their_etag() {
        let v = version();
        let r = respond(&format!("assets/{v}/app.js"), None);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, header::CONTENT_TYPE), "text/javascript; charset=utf-8");
        assert_eq!(header(&r, header::CACHE_CONTROL), "public, max-age=31536000, immutable");
        let etag = HeaderValue::from_str(header(&r, header::ETAG)).unwrap();
        let again = respond(&format!("assets/{v}/app.js"), Some(&etag));
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(header(&again, header::CONTENT_SECURITY_POLICY), CONTENT_SECURITY_POLICY);

        let old = respond("assets/0000000000000000/style.css", None);
        assert_eq!(old.status(), StatusCode::OK);
        assert_eq!(header(&old, header::CONTENT_TYPE), "text/css; charset=utf-8");
        assert_eq!(header(&old, header::CACHE_CONTROL), "no-cache");

        let missing = respond(&format!("assets/{v}/nope.js"), None);
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert_eq!(header(&missing, header::CONTENT_SECURITY_POLICY), CONTENT_SECURITY_POLICY);
    }

    /// Every asset the page or a module names is embedded, and nothing is fetched from
    /// elsewhere (the SVG namespace is a name, not a fetch).
    #[test]
    fn the_assets_are_complete_and_self_contained() {
        let page_refs: Vec<&str> =
            PAGE.split(ASSET_BASE_PLACEHOLDER).skip(1).filter_map(|s| s.split('"').next()).collect();
        assert!(page_refs.contains(&"/app.js") && page_refs.contains(&"/style.css"), "{page_refs:?}");
        for r in page_refs {
            let name = r.trim_start_matches('/');
            assert!(ASSETS.iter().any(|a| a.name == name), "the page names {name}, which is not embedded");
        }
        for a in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            let text = std::str::from_utf8(a.body).unwrap();
            for import in text.split("from './").skip(1) {
                let name = import.split('\'').next().unwrap();
                assert!(ASSETS.iter().any(|b| b.name == name), "{} imports {name}, which is not embedded", a.name);
            }
        }
        for (name, text) in std::iter::once(("index.html", PAGE))
            .chain(ASSETS.iter().map(|a| (a.name, std::str::from_utf8(a.body).unwrap())))
        {
            let outside = text.replace("http://www.w3.org/2000/svg", "");
            assert!(!outside.contains("http://") && !outside.contains("https://"), "{name} names another origin");
            assert!(!outside.contains("//fonts.") && !outside.contains("@import"), "{name} loads a font or a sheet");
        }
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let lower = PAGE.to_lowercase();
        for tag in lower.split("<script").skip(1) {
            let (attrs, rest) = tag.split_once('>').unwrap();
            assert!(attrs.contains("src="), "an inline <script>");
            assert!(rest.trim_start().starts_with("</script>"), "a <script> with a body");
        }
        assert!(!lower.contains("<style") && !lower.contains(" style="), "inline style");
        // No `onclick=`-like handler attribute.
        let handler = lower.split(" on").skip(1).find(|s| {
            let name: String = s.chars().take_while(char::is_ascii_alphabetic).collect();
            !name.is_empty() && s[name.len()..].starts_with('=')
        });
        assert!(handler.is_none(), "an inline event handler: on{}", handler.unwrap_or_default());
    }
}
