//! SAN extraction from arbitrary "certificate" bytes: never a panic, and every SAN
//! returned lies inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::tls::san::{San, sans};

fuzz_target!(|data: &[u8]| {
    if let Some(list) = sans(data) {
        for s in list {
            let (San::Dns(v) | San::Uri(v)) = s;
            assert!(v.len() <= data.len());
        }
    }
});
