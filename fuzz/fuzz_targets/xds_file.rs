//! An `--xds-file` document (YAML or JSON) decoded into Envoy resources and built
//! into a routing snapshot: never a panic, whatever the input; a decoded document
//! round-trips through its JSON form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::resources::Resources;
use proxy::snapshot::{DnsAnswers, build};
use proxy::stats::Registry;

fuzz_target!(|data: &[u8]| {
    let Ok(resources) = Resources::from_file_bytes(data, "fuzz") else { return };
    let json = serde_json::to_vec(&resources.to_json()).expect("JSON of decoded resources");
    let again = Resources::from_file_bytes(&json, "fuzz").expect("the JSON form decodes");
    assert_eq!(again, resources);
    let mut notes = vec![];
    let _ = build(&resources, &DnsAnswers::new(), &Registry::default(), &mut notes);
});
