//! Envoy's `envoy.filters.network.set_filter_state`: named string values a connection
//! carries, made from a format string when the connection opens or after its TLS
//! handshake, and read by routes' `filter_state` matchers. Kuma writes the client's
//! SPIFFE ID (`%DOWNSTREAM_PEER_URI_SAN%`) so that MeshTimeout and MeshRateLimit rules can
//! match on it.
//!
//! Keys Envoy itself reads (`envoy.*`, such as `envoy.tcp_proxy.cluster`) change where
//! traffic goes; dp refuses them by name rather than set a value nothing reads.

use crate::access_log::Record;
use crate::access_log::format::Text;
use envoy_types::pb::envoy::config::core::v3::{SubstitutionFormatString, data_source, substitution_format_string};
use envoy_types::pb::envoy::extensions::filters::common::set_filter_state::v3::{FilterStateValue, filter_state_value};
use envoy_types::pb::envoy::extensions::filters::network::set_filter_state::v3::Config;
use std::net::SocketAddr;

/// A connection's values, in the order they were set.
pub type FilterState = Vec<(String, String)>;

#[derive(Debug)]
pub struct SetFilterState {
    on_new_connection: Vec<Entry>,
    on_tls_handshake: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    key: String,
    /// The access log's format strings ([`crate::access_log::format`]); an operator dp
    /// cannot evaluate is refused here, since routes match on the value.
    format: Text,
    omit_empty: bool,
    skip_if_empty: bool,
}

/// What the operators read from a connection.
#[derive(Debug, Default)]
pub struct Facts<'a> {
    pub peer: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub sni: Option<&'a str>,
    pub uri_sans: &'a [String],
    pub dns_sans: &'a [String],
}

impl SetFilterState {
    pub fn from_proto(c: &Config) -> Result<SetFilterState, String> {
        if !c.on_downstream_data.is_empty() {
            return Err("on_downstream_data is not supported".into());
        }
        let list = |values: &[FilterStateValue], field: &str| -> Result<Vec<Entry>, String> {
            values
                .iter()
                .enumerate()
                .map(|(i, v)| Entry::from_proto(v).map_err(|e| format!("{field}[{i}]: {e}")))
                .collect()
        };
        Ok(SetFilterState {
            on_new_connection: list(&c.on_new_connection, "on_new_connection")?,
            on_tls_handshake: list(&c.on_downstream_tls_handshake, "on_downstream_tls_handshake")?,
        })
    }

    /// The values set when the connection opens.
    pub fn on_new_connection(&self, facts: &Facts<'_>, state: &mut FilterState) {
        set_all(&self.on_new_connection, facts, state);
    }

    /// The values set after the downstream TLS handshake.
    pub fn on_tls_handshake(&self, facts: &Facts<'_>, state: &mut FilterState) {
        set_all(&self.on_tls_handshake, facts, state);
    }
}

fn set_all(entries: &[Entry], facts: &Facts<'_>, state: &mut FilterState) {
    for e in entries {
        let value = e.format(facts);
        if value.is_empty() && e.skip_if_empty {
            continue;
        }
        // A later value for the same key replaces it (Envoy ignores `read_only` now).
        match state.iter_mut().find(|(k, _)| *k == e.key) {
            Some((_, v)) => *v = value,
            None => state.push((e.key.clone(), value)),
        }
    }
}

impl Entry {
    fn from_proto(v: &FilterStateValue) -> Result<Entry, String> {
        let Some(filter_state_value::Key::ObjectKey(key)) = &v.key else {
            return Err("object_key is required".into());
        };
        if key.starts_with("envoy.") {
            return Err(format!("object_key `{key}` is read by Envoy itself and is not supported"));
        }
        if !v.factory_key.is_empty() && v.factory_key != "envoy.string" {
            return Err(format!("factory_key `{}` is not supported (only envoy.string)", v.factory_key));
        }
        let Some(filter_state_value::Value::FormatString(f)) = &v.value else {
            return Err("format_string is required".into());
        };
        Ok(Entry {
            key: key.clone(),
            format: parse(&text_of(f)?)?,
            omit_empty: f.omit_empty_values,
            skip_if_empty: v.skip_if_empty,
        })
    }

    fn format(&self, f: &Facts<'_>) -> String {
        let (uri, dns) = (f.uri_sans.join(","), f.dns_sans.join(","));
        let r = Record {
            remote: f.peer,
            direct_remote: f.peer,
            local: f.local,
            sni: f.sni,
            peer_uri_san: Some(uri.as_str()).filter(|s| !s.is_empty()),
            peer_dns_san: Some(dns.as_str()).filter(|s| !s.is_empty()),
            ..Default::default()
        };
        let mut out = String::new();
        self.format.format(&r, self.omit_empty, &mut out);
        out
    }
}

fn text_of(f: &SubstitutionFormatString) -> Result<String, String> {
    use substitution_format_string::Format;
    match &f.format {
        #[allow(deprecated)]
        Some(Format::TextFormat(t)) => Ok(t.clone()),
        Some(Format::TextFormatSource(ds)) => match &ds.specifier {
            Some(data_source::Specifier::InlineString(s)) => Ok(s.clone()),
            Some(data_source::Specifier::InlineBytes(b)) => {
                String::from_utf8(b.clone()).map_err(|_| "format_string: inline_bytes is not UTF-8".to_string())
            }
            _ => Err("format_string: only an inline text_format_source is supported".into()),
        },
        Some(Format::JsonFormat(_)) => Err("format_string: json_format is not supported".into()),
        None => Err("format_string has no format".into()),
    }
}

/// Parses a format string; operators dp does not evaluate are refused by name.
fn parse(s: &str) -> Result<Text, String> {
    let mut unknown = vec![];
    let t = Text::parse(s, &mut unknown)?;
    match unknown.first() {
        Some(op) => Err(format!("format_string: %{op}% is not supported")),
        None => Ok(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(format: &str, skip_if_empty: bool) -> Entry {
        Entry { key: "k".into(), format: parse(format).unwrap(), omit_empty: false, skip_if_empty }
    }

    #[test]
    fn formats_read_the_connection() {
        let sans = vec!["spiffe://default/client".to_string(), "spiffe://default/other".to_string()];
        let facts = Facts {
            peer: Some("10.0.0.2:5555".parse().unwrap()),
            local: Some("10.0.0.1:80".parse().unwrap()),
            sni: Some("backend"),
            uri_sans: &sans,
            dns_sans: &[],
        };
        let f = |s: &str| entry(s, false).format(&facts);
        assert_eq!(f("%DOWNSTREAM_PEER_URI_SAN%"), "spiffe://default/client,spiffe://default/other");
        assert_eq!(
            f("id=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% 100%% on %DOWNSTREAM_LOCAL_PORT%"),
            "id=10.0.0.2 100% on 80"
        );
        assert_eq!(f("%DOWNSTREAM_PEER_DNS_SAN%|%REQUESTED_SERVER_NAME%"), "-|backend");
        assert!(parse("%UPSTREAM_TRANSPORT_FAILURE_REASON%").unwrap_err().contains("is not supported"));
        assert!(parse("%DOWNSTREAM_PEER_URI_SAN").is_err());
    }

    #[test]
    fn later_values_replace_earlier_ones_and_empty_ones_may_be_skipped() {
        let mut state = FilterState::new();
        set_all(&[entry("first", false)], &Facts::default(), &mut state);
        set_all(&[entry("second", false)], &Facts::default(), &mut state);
        assert_eq!(state, [("k".to_string(), "second".to_string())]);
        let omit = Entry { omit_empty: true, ..entry("%DOWNSTREAM_PEER_URI_SAN%", true) };
        set_all(&[omit], &Facts::default(), &mut state);
        assert_eq!(state, [("k".to_string(), "second".to_string())], "no certificate, no value: skipped");
        // Without omit_empty_values the missing value is `-`, which is not empty.
        set_all(&[entry("%DOWNSTREAM_PEER_URI_SAN%", true)], &Facts::default(), &mut state);
        assert_eq!(state, [("k".to_string(), "-".to_string())]);
    }
}
