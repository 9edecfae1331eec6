//! MeshAccessLog on a sidecar's TCP listeners, as Kuma 2.14's plugin writes it: a file
//! access logger per backend on the listener's tcp_proxy.
//! * `File` backends log to their `path`, in their format or Kuma's default TCP line;
//! * `Tcp` backends log JSON lines `{"address": …, "message": …}` into the proxy's
//!   access-log pipe (`<workdir>/kuma-al-<name>-<mesh>.sock`), which the proxy sends on;
//! * `OpenTelemetry` backends are left out (said in the debug log).
//!
//! `%KUMA_*%` values are filled in here, as Kuma does. Outbounds take the `to` entries
//! (mesh-wide, then for the service); inbounds take `rules` (and the older `from`) with
//! the mesh as the target. Backends of every matching entry add up.

use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, SubstitutionFormatString, data_source, substitution_format_string,
};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{FileAccessLog, file_access_log};
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
use serde_json::Value;

use crate::model::Resource;

/// Kuma's default line for TCP traffic.
const DEFAULT_TCP_FORMAT: &str = "[%START_TIME%] %RESPONSE_FLAGS% %KUMA_MESH% %KUMA_SOURCE_ADDRESS_WITHOUT_PORT%(%KUMA_SOURCE_SERVICE%)->%UPSTREAM_HOST%(%KUMA_DESTINATION_SERVICE%) took %DURATION%ms, sent %BYTES_SENT% bytes, received: %BYTES_RECEIVED% bytes";

/// Kuma's default line for HTTP traffic.
const DEFAULT_HTTP_FORMAT: &str = r#"[%START_TIME%] %KUMA_MESH% "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-B3-TRACEID?X-DATADOG-TRACEID)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%KUMA_SOURCE_SERVICE%" "%KUMA_DESTINATION_SERVICE%" "%KUMA_SOURCE_ADDRESS_WITHOUT_PORT%" "%UPSTREAM_HOST%""#;

/// Kuma's `KumaValues`: what a line's `%KUMA_*%` operators stand for.
pub struct KumaValues<'a> {
    /// The listener is HTTP: the default line is Kuma's HTTP one.
    pub http: bool,
    pub mesh: &'a str,
    pub source_ip: &'a str,
    pub source_service: &'a str,
    pub destination_service: &'a str,
    pub zone: &'a str,
}

impl KumaValues<'_> {
    fn default_format(&self) -> String {
        format!("{}\n", if self.http { DEFAULT_HTTP_FORMAT } else { DEFAULT_TCP_FORMAT })
    }

    fn interpolate(&self, format: &str) -> String {
        let host_port = if self.source_ip.contains(':') {
            format!("[{}]:0", self.source_ip)
        } else {
            format!("{}:0", self.source_ip)
        };
        format
            .replace("%KUMA_SOURCE_ADDRESS%", &host_port)
            .replace("%KUMA_SOURCE_ADDRESS_WITHOUT_PORT%", self.source_ip)
            .replace("%KUMA_SOURCE_SERVICE%", self.source_service)
            .replace("%KUMA_DESTINATION_SERVICE%", self.destination_service)
            .replace("%KUMA_MESH%", self.mesh)
            .replace("%KUMA_ZONE%", self.zone)
    }
}

/// The backends of the `to` entries for an outbound to `service`.
pub fn outbound_backends(policies: &[Resource], service: &str) -> Vec<Value> {
    let mut out = vec![];
    for spec in super::resilience::mesh_wide(policies) {
        for to in spec["to"].as_array().into_iter().flatten() {
            let t = &to["targetRef"];
            let hit = match t["kind"].as_str() {
                Some("Mesh") => true,
                Some("MeshService") => t["name"].as_str() == Some(service),
                _ => false,
            };
            if hit {
                out.extend(to["default"]["backends"].as_array().into_iter().flatten().cloned());
            }
        }
    }
    out
}

/// The backends of the `rules` (and `from` entries from the mesh) for an inbound.
pub fn inbound_backends(policies: &[Resource]) -> Vec<Value> {
    let mut out = vec![];
    for spec in super::resilience::mesh_wide(policies) {
        for rule in spec["rules"].as_array().into_iter().flatten() {
            // Rules that match on something (a SPIFFE ID) need a filter state dp's TCP
            // inbounds do not set; only the catch-all applies.
            if rule["matches"].as_array().is_none_or(|m| m.is_empty()) {
                out.extend(rule["default"]["backends"].as_array().into_iter().flatten().cloned());
            }
        }
        for from in spec["from"].as_array().into_iter().flatten() {
            if from["targetRef"]["kind"].as_str() == Some("Mesh") {
                out.extend(from["default"]["backends"].as_array().into_iter().flatten().cloned());
            }
        }
    }
    out
}

/// The file access loggers for `backends`; `pipe` is the proxy's access-log pipe.
pub fn loggers(backends: &[Value], values: &KumaValues<'_>, pipe: &str) -> Vec<AccessLog> {
    let mut out = vec![];
    for b in backends {
        let (path, format) = match b["type"].as_str() {
            Some("File") => {
                let Some(path) = b["file"]["path"].as_str() else { continue };
                (path.to_string(), file_format(&b["file"]["format"], values))
            }
            Some("Tcp") => {
                let Some(address) = b["tcp"]["address"].as_str() else { continue };
                (pipe.to_string(), tcp_format(address, &b["tcp"]["format"], values))
            }
            other => {
                tracing::debug!(backend = ?other, "MeshAccessLog backend not generated");
                continue;
            }
        };
        let file = FileAccessLog { path, access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(format)) };
        out.push(AccessLog {
            name: "envoy.access_loggers.file".into(),
            filter: None,
            config_type: Some(access_log::ConfigType::TypedConfig(envoy_types::util::pack_any(file))),
        });
    }
    out
}

fn omit_empty(format: &Value) -> bool {
    format["omitEmptyValues"].as_bool().unwrap_or(false)
}

fn file_format(format: &Value, values: &KumaValues<'_>) -> SubstitutionFormatString {
    match (format["plain"].as_str(), format["json"].as_array()) {
        (Some(plain), _) => text(&values.interpolate(&format!("{plain}\n")), omit_empty(format)),
        (None, Some(json)) => json_format(json_fields(json, values), omit_empty(format)),
        (None, None) => text(&values.interpolate(&values.default_format()), false),
    }
}

fn tcp_format(address: &str, format: &Value, values: &KumaValues<'_>) -> SubstitutionFormatString {
    let string = |s: String| PbValue { kind: Some(Kind::StringValue(s)) };
    let message = match (format["plain"].as_str(), format["json"].as_array()) {
        (Some(plain), _) => string(values.interpolate(&format!("{plain}\n"))),
        (None, Some(json)) => PbValue { kind: Some(Kind::StructValue(json_fields(json, values))) },
        (None, None) => string(values.interpolate(&values.default_format())),
    };
    let fields = [("address".to_string(), string(address.to_string())), ("message".to_string(), message)];
    json_format(Struct { fields: fields.into_iter().collect() }, omit_empty(format))
}

fn json_fields(json: &[Value], values: &KumaValues<'_>) -> Struct {
    let fields = json.iter().filter_map(|kv| {
        let (k, v) = (kv["key"].as_str()?, kv["value"].as_str()?);
        Some((k.to_string(), PbValue { kind: Some(Kind::StringValue(values.interpolate(v))) }))
    });
    Struct { fields: fields.collect() }
}

fn text(s: &str, omit_empty_values: bool) -> SubstitutionFormatString {
    SubstitutionFormatString {
        format: Some(substitution_format_string::Format::TextFormatSource(DataSource {
            specifier: Some(data_source::Specifier::InlineString(s.to_string())),
            ..Default::default()
        })),
        omit_empty_values,
        ..Default::default()
    }
}

fn json_format(s: Struct, omit_empty_values: bool) -> SubstitutionFormatString {
    SubstitutionFormatString {
        format: Some(substitution_format_string::Format::JsonFormat(s)),
        omit_empty_values,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, spec: Value) -> Resource {
        Resource::from_json(&json!({"type": "MeshAccessLog", "mesh": "default", "name": name, "spec": spec})).unwrap()
    }

    fn values() -> KumaValues<'static> {
        KumaValues {
            http: false,
            mesh: "default",
            source_ip: "10.0.0.1",
            source_service: "web",
            destination_service: "backend",
            zone: "z",
        }
    }

    #[test]
    fn entries_select_backends_and_formats_are_kumas() {
        let policies = [
            policy(
                "a",
                json!({"targetRef": {"kind": "Mesh"}, "to": [
                {"targetRef": {"kind": "Mesh"}, "default": {"backends": [{"type": "File", "file": {"path": "/tmp/all"}}]}},
                {"targetRef": {"kind": "MeshService", "name": "backend"}, "default": {"backends": [
                    {"type": "Tcp", "tcp": {"address": "logs:5000", "format": {"type": "Plain", "plain": "%KUMA_MESH% %DURATION%"}}}]}}],
                "rules": [{"default": {"backends": [{"type": "File", "file": {"path": "/tmp/in",
                    "format": {"type": "Json", "json": [{"key": "src", "value": "%KUMA_SOURCE_SERVICE%"}]}}}]}}]}),
            ),
            policy(
                "b",
                json!({"targetRef": {"kind": "MeshSubset"}, "to": [
                {"targetRef": {"kind": "Mesh"}, "default": {"backends": [{"type": "File", "file": {"path": "/tmp/no"}}]}}]}),
            ),
        ];
        let to_backend = outbound_backends(&policies, "backend");
        assert_eq!(to_backend.len(), 2);
        assert_eq!(outbound_backends(&policies, "other").len(), 1);
        assert_eq!(inbound_backends(&policies).len(), 1);
        let logs = loggers(&to_backend, &values(), "/w/kuma-al-web-default.sock");
        let decode = |a: &AccessLog| -> FileAccessLog {
            let Some(access_log::ConfigType::TypedConfig(any)) = &a.config_type else { panic!() };
            prost::Message::decode(&any.value[..]).unwrap()
        };
        let file = decode(&logs[0]);
        assert_eq!(file.path, "/tmp/all");
        let Some(file_access_log::AccessLogFormat::LogFormat(f)) = file.access_log_format else { panic!() };
        let Some(substitution_format_string::Format::TextFormatSource(ds)) = f.format else { panic!() };
        assert_eq!(
            ds.specifier,
            Some(data_source::Specifier::InlineString(
                "[%START_TIME%] %RESPONSE_FLAGS% default 10.0.0.1(web)->%UPSTREAM_HOST%(backend) took %DURATION%ms, sent %BYTES_SENT% bytes, received: %BYTES_RECEIVED% bytes\n".into()
            ))
        );
        let tcp = decode(&logs[1]);
        assert_eq!(tcp.path, "/w/kuma-al-web-default.sock");
        let Some(file_access_log::AccessLogFormat::LogFormat(f)) = tcp.access_log_format else { panic!() };
        let Some(substitution_format_string::Format::JsonFormat(s)) = f.format else { panic!() };
        assert_eq!(s.fields["address"].kind, Some(Kind::StringValue("logs:5000".into())));
        assert_eq!(s.fields["message"].kind, Some(Kind::StringValue("default %DURATION%\n".into())));
    }
}
