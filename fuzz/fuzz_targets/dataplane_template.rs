//! A dataplane template with variables, rendered and parsed as a resource for each
//! proxy type: no panic, and an accepted resource has the type and a valid name.
#![no_main]

use kuma_model::proxy::ProxyType;
use kuma_model::resource::parse_resource;
use kuma_model::template::{parse_vars, render};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // The first line holds `k=v` variables separated by spaces, the rest is the template.
    let (vars_line, template) = text.split_once('\n').unwrap_or(("", text));
    let pairs: Vec<String> = vars_line.split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect();
    let Ok(vars) = parse_vars(&pairs) else { return };
    let Ok(rendered) = render(template, &vars) else { return };
    for proxy_type in ProxyType::ALL {
        if let Ok(r) = parse_resource(&rendered, proxy_type, "fuzz") {
            assert_eq!(r.kind, proxy_type.resource_type());
            assert!(!r.name.is_empty() && r.name.len() <= 253);
        }
    }
});
