//! Envoy access-log format strings (`proxy::access_log::format`), which come from the
//! control plane: parsing and formatting never panic, whatever the text and the request;
//! a format without `%` writes itself; `%%` writes one `%`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::access_log::format::Text;
use proxy::access_log::{HttpRecord, Record};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    // The text up to the first NUL is the format; the rest a header value.
    let (format, value) = s.split_once('\0').unwrap_or((s, ""));
    let mut request = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(value) {
        request.insert("x-fuzz", v);
    }
    let record = Record {
        response_code: Some(200),
        flags: "-",
        http: Some(HttpRecord {
            method: "GET",
            path: value,
            authority: "a",
            scheme: "http",
            protocol: "HTTP/1.1",
            route_name: value,
            request: &request,
            response: Some(&request),
            route_kri: None,
        }),
        ..Default::default()
    };
    let mut unknown = vec![];
    let Ok(text) = Text::parse(format, &mut unknown) else { return };
    let mut out = String::new();
    text.format(&record, false, &mut out);
    if !format.contains('%') {
        assert_eq!(out, format, "a format without operators writes itself");
    }
    let escaped = format.replace('%', "%%");
    let mut again = String::new();
    Text::parse(&escaped, &mut unknown).expect("an escaped text parses").format(&record, false, &mut again);
    assert_eq!(again, format, "%% writes one %");
});
